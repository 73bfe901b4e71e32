#pragma once
/// Library version and the thread policy.
///
/// Measured on the 2-core reference machine (../shared/ENVIRONMENT.md): a small
/// VLM trains 2.1x faster with 1 torch intra-op thread and OpenBLAS on every
/// core than with both at 1, and 2.7x faster than with both on every core
/// (oversubscription). vlmkit's default is therefore: torch threads = 1, BLAS
/// threads = number of cores. VLMKIT_TORCH_THREADS and VLMKIT_BLAS_THREADS
/// override it; set_num_threads() changes it at any time.
#include <string>

namespace vlmkit {

/// "0.1.0".
const char* version();
/// The LibTorch version vlmkit was compiled against, e.g. "1.13.0".
const char* torch_version();

struct ThreadInfo {
  int torch_threads = 0;
  /// -1 when the BLAS in use cannot report it (not OpenBLAS).
  int blas_threads = -1;
  /// "openblas" when OpenBLAS serves LibTorch's BLAS calls, else "unknown".
  std::string blas;
  /// OpenBLAS's own description (architecture, threading), or "".
  std::string blas_config;
};

/// Sets torch intra-op threads and BLAS threads; a value <= 0 leaves that one
/// unchanged.
void set_num_threads(int torch_threads, int blas_threads = 0);
/// Applies the default policy above (honouring the environment variables).
/// Returns what is in force afterwards.
ThreadInfo apply_default_threads();
ThreadInfo thread_info();

}  // namespace vlmkit
