#pragma once
/// Library version and the thread policy.
///
/// vlmkit's default: torch intra-op threads = 1, BLAS threads = number of
/// cores. fp32 training spends its time in BLAS GEMMs, and both pools on every
/// core oversubscribe them (docs/benchmarks.md, "threads", has the numbers). VLMKIT_TORCH_THREADS and VLMKIT_BLAS_THREADS
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
/// Threads a vlmkit CPU kernel runs on: the larger of torch's intra-op
/// threads and BLAS's (under the fp32 policy torch has one and BLAS the cores).
int compute_threads();

}  // namespace vlmkit
