// Version strings and the thread policy (see runtime.h for the measurements).
#include "vlmkit/runtime.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#ifndef VLMKIT_VERSION
#define VLMKIT_VERSION "0.0.0"
#endif

namespace vlmkit {
namespace {
// OpenBLAS entry points, looked up at run time so vlmkit does not link BLAS
// itself: LibTorch already loaded whichever BLAS the system provides.
using SetThreads = void (*)(int);
using GetThreads = int (*)();
using GetConfig = char* (*)();

template <class Fn>
Fn blas_symbol(const char* name) {
  return reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, name));
}

int env_int(const char* name) {
  const char* value = std::getenv(name);
  if (!value || !*value) return 0;
  char* end = nullptr;
  long parsed = std::strtol(value, &end, 10);
  return (end && *end == '\0' && parsed > 0 && parsed < 4096) ? static_cast<int>(parsed) : 0;
}

int cpu_count() {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

// The pool behind run_parallel: cpu_count() - 1 workers, started on first
// use, never destroyed (they sleep until the process exits).
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool(std::max(0, cpu_count() - 1));
    return *pool;
  }

  void run(int64_t units, int threads, const std::function<void(int64_t)>& fn) {
    if (in_unit_ || getpid() != pid_ || workers_ == 0) return inline_run(units, fn);
    std::unique_lock<std::mutex> call(call_, std::try_to_lock);
    if (!call.owns_lock()) return inline_run(units, fn);
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      units_ = units;
      next_.store(0);
      wanted_ = std::min(threads - 1, workers_);
      joined_ = finished_ = 0;
      closed_ = false;
      error_ = nullptr;
      ++generation_;
    }
    work_.notify_all();
    drain();
    std::unique_lock<std::mutex> lk(m_);
    closed_ = true;  // workers that have not joined yet skip this call
    done_.wait(lk, [&] { return finished_ == joined_; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

  static void inline_run(int64_t units, const std::function<void(int64_t)>& fn) {
    for (int64_t u = 0; u < units; ++u) fn(u);
  }

 private:
  explicit Pool(int n) : workers_(n), pid_(getpid()) {
    for (int i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
  }

  // Takes units until none is left; the first exception stops the hand-out.
  void drain() {
    in_unit_ = true;
    for (int64_t u = next_.fetch_add(1); u < units_; u = next_.fetch_add(1)) {
      try {
        (*fn_)(u);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m_);
        if (!error_) error_ = std::current_exception();
        next_.store(units_);
      }
    }
    in_unit_ = false;
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      work_.wait(lk, [&] { return generation_ != seen && !closed_ && joined_ < wanted_; });
      seen = generation_;
      ++joined_;
      lk.unlock();
      drain();
      lk.lock();
      if (++finished_ == joined_) done_.notify_one();
    }
  }

  std::mutex call_;  // one run at a time; others run inline
  std::mutex m_;
  std::condition_variable work_, done_;
  const int workers_;  // detached threads, never joined
  const pid_t pid_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t units_ = 0;
  int wanted_ = 0, joined_ = 0, finished_ = 0;
  bool closed_ = true;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
  static thread_local bool in_unit_;
};
thread_local bool Pool::in_unit_ = false;
}  // namespace

void run_parallel(int64_t units, int threads, const std::function<void(int64_t)>& fn) {
  if (units <= 0) return;
  if (threads <= 1 || units == 1) return Pool::inline_run(units, fn);
  Pool::get().run(units, threads, fn);
}

const char* version() { return VLMKIT_VERSION; }

const char* torch_version() {
#define VLMKIT_STR2(x) #x
#define VLMKIT_STR(x) VLMKIT_STR2(x)
  return VLMKIT_STR(TORCH_VERSION_MAJOR) "." VLMKIT_STR(TORCH_VERSION_MINOR) "." VLMKIT_STR(
      TORCH_VERSION_PATCH);
#undef VLMKIT_STR
#undef VLMKIT_STR2
}

int compute_threads() {
  static const auto get = blas_symbol<GetThreads>("openblas_get_num_threads");
  const int blas = get ? get() : 1;
  return std::max(at::get_num_threads(), blas);
}

void set_num_threads(int torch_threads, int blas_threads) {
  if (torch_threads > 0) at::set_num_threads(torch_threads);
  if (blas_threads > 0) {
    if (auto set = blas_symbol<SetThreads>("openblas_set_num_threads")) set(blas_threads);
  }
}

ThreadInfo apply_default_threads() {
  int torch_threads = env_int("VLMKIT_TORCH_THREADS");
  int blas_threads = env_int("VLMKIT_BLAS_THREADS");
  set_num_threads(torch_threads > 0 ? torch_threads : 1,
                  blas_threads > 0 ? blas_threads : cpu_count());
  return thread_info();
}

AllocatorInfo apply_default_allocator() {
  static const AllocatorInfo applied = [] {
    AllocatorInfo info;
    const char* env = std::getenv("VLMKIT_MALLOC");
    if (env && std::string(env) == "system") {
      info.reason = "VLMKIT_MALLOC=system";
      return info;
    }
#if defined(__GLIBC__)
    constexpr int64_t kMmap = int64_t(32) << 20, kTrim = int64_t(1) << 30;
    // Setting M_MMAP_THRESHOLD also turns off glibc's dynamic threshold.
    if (mallopt(M_MMAP_THRESHOLD, static_cast<int>(kMmap)) == 1 &&
        mallopt(M_TRIM_THRESHOLD, static_cast<int>(kTrim)) == 1) {
      info.tuned = true;
      info.mmap_threshold = kMmap;
      info.trim_threshold = kTrim;
    } else {
      info.reason = "mallopt refused the thresholds";
    }
#else
    info.reason = "not glibc's malloc";
#endif
    return info;
  }();
  return applied;
}

ThreadInfo thread_info() {
  ThreadInfo info;
  info.torch_threads = at::get_num_threads();
  auto get = blas_symbol<GetThreads>("openblas_get_num_threads");
  auto config = blas_symbol<GetConfig>("openblas_get_config");
  info.blas = get ? "openblas" : "unknown";
  info.blas_threads = get ? get() : -1;
  info.blas_config = config ? std::string(config()) : std::string();
  return info;
}

}  // namespace vlmkit
