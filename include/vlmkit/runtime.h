#pragma once
/// Library version and the thread policy.
///
/// vlmkit's default: torch intra-op threads = 1, BLAS threads = number of
/// cores. fp32 training spends its time in BLAS GEMMs, and both pools on every
/// core oversubscribe them (docs/benchmarks.md, "threads", has the numbers). VLMKIT_TORCH_THREADS and VLMKIT_BLAS_THREADS
/// override it; set_num_threads() changes it at any time.
#include <cstdint>
#include <functional>
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

/// The heap policy. glibc's malloc hands blocks above a dynamic threshold
/// to mmap and returns free memory at the top of the heap to the system
/// (trimming), so a training step that frees and re-allocates the same
/// few-MB activations every step takes fresh page faults for them: on these
/// 2-core machines ~9,700 faults per step of the small VLM at batch 32, a
/// third of the step (373 ms against 215 ms without them; docs/benchmarks.md,
/// "Page faults of a training step"). The policy keeps freed memory in the
/// process: blocks below 32 MB come from the heap and the heap is not trimmed,
/// so the resident size stays at its high-water mark, which a training loop
/// reaches in its first step anyway. glibc only; VLMKIT_MALLOC=system skips it.
struct AllocatorInfo {
  /// Whether vlmkit's settings are in force (false: the C library's own).
  bool tuned = false;
  /// Blocks of at least this many bytes are mmap'd (0: not set by vlmkit).
  int64_t mmap_threshold = 0;
  /// Free heap top above this many bytes is returned to the system.
  int64_t trim_threshold = 0;
  /// Why not tuned, or "".
  std::string reason;
};
/// Applies the heap policy above once per process (later calls report it).
AllocatorInfo apply_default_allocator();

/// Runs fn(u) for every u in [0, units) on up to `threads` threads: the
/// caller and threads - 1 workers of a small pool, units handed out one at a
/// time (dynamic scheduling). The workers sleep on a condition variable
/// between calls, where an OpenMP team (libgomp's default wait policy) spins
/// for a while after each region on the core that OpenBLAS's second thread
/// needs under the fp32 policy: the fused attention kernel forced on in the
/// small VLM's fp32 training step at batch 1 took 123 ms per step on an
/// OpenMP team against 29 ms with ATen's attention, and 20.5 against 20.0 ms
/// on this pool (interleaved in one process; docs/benchmarks.md, "Fused
/// attention: a pool that sleeps").
/// Runs inline when threads <= 1 or units <= 1, when called from inside a
/// run_parallel unit or while another thread holds the pool, and in a forked
/// child. An exception thrown by fn is rethrown in the caller after every
/// started unit has finished.
void run_parallel(int64_t units, int threads, const std::function<void(int64_t)>& fn);

}  // namespace vlmkit
