// Version strings and the thread policy (see runtime.h for the measurements).
#include "vlmkit/runtime.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>

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
}  // namespace

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
