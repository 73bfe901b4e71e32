#include "helpers.h"
#include "vlmkit/runtime.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

TEST_CASE("runtime: OpenBLAS serves LibTorch and the thread policy applies", "[runtime]") {
  auto info = vlmkit::apply_default_threads();
  // The Debian set-up guarantees OpenBLAS (make test sets VLMKIT_EXPECT_BLAS);
  // PyTorch wheels elsewhere bring MKL instead.
  const char* expected = std::getenv("VLMKIT_EXPECT_BLAS");
  if (expected) REQUIRE(info.blas == expected);
  REQUIRE(info.torch_threads == 1);
  REQUIRE(info.blas_threads >= 1);
  vlmkit::set_num_threads(1, 1);
  REQUIRE(vlmkit::thread_info().blas_threads == 1);
  REQUIRE(std::string(vlmkit::torch_version()).find('.') != std::string::npos);
}

// Built with AddressSanitizer or ThreadSanitizer (GCC defines the macros,
// clang answers __has_feature).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define VLMKIT_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define VLMKIT_TEST_SANITIZED 1
#endif
#endif

TEST_CASE("runtime: the heap policy applies once and reports itself", "[runtime]") {
  const auto info = vlmkit::apply_default_allocator();
#if defined(VLMKIT_TEST_SANITIZED)
  // The sanitizers' allocators take malloc over and refuse mallopt: reported, not hidden.
  REQUIRE_FALSE(info.tuned);
  REQUIRE_FALSE(info.reason.empty());
#elif defined(__GLIBC__)
  if (!std::getenv("VLMKIT_MALLOC")) {
    REQUIRE(info.tuned);
    REQUIRE(info.mmap_threshold == (int64_t(32) << 20));
    REQUIRE(info.trim_threshold > info.mmap_threshold);
    REQUIRE(info.reason.empty());
  }
#endif
  const auto again = vlmkit::apply_default_allocator();
  REQUIRE(again.tuned == info.tuned);
  REQUIRE(again.reason == info.reason);
}

TEST_CASE("runtime: run_parallel runs every unit once, nested and concurrent calls included", "[runtime]") {
  for (int threads : {1, 2, 4}) {
    for (int64_t units : {int64_t(0), int64_t(1), int64_t(7), int64_t(1000)}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(units));
      vlmkit::run_parallel(units, threads, [&](int64_t u) {
        // a nested call runs inline on this thread
        vlmkit::run_parallel(3, threads, [&](int64_t) {});
        hits[static_cast<size_t>(u)]++;
      });
      for (auto& h : hits) REQUIRE(h.load() == 1);
    }
  }
  // The pool takes part: with units that take a while, a second thread runs
  // some of them (cores permitting), so the work is not all done inline.
  if (std::thread::hardware_concurrency() >= 2) {
    std::mutex seen_mutex;
    std::set<std::thread::id> seen;
    vlmkit::run_parallel(16, 2, [&](int64_t) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      std::lock_guard<std::mutex> lock(seen_mutex);
      seen.insert(std::this_thread::get_id());
    });
    REQUIRE(seen.size() == 2);
    REQUIRE(seen.count(std::this_thread::get_id()) == 1);
  }
  // two threads calling at once: one gets the pool, the other runs inline
  std::atomic<int64_t> sum{0};
  auto work = [&] {
    for (int r = 0; r < 50; ++r) vlmkit::run_parallel(64, 2, [&](int64_t u) { sum += u; });
  };
  std::thread a(work), b(work);
  a.join();
  b.join();
  REQUIRE(sum.load() == 2 * 50 * (63 * 64 / 2));
  // an exception in a unit reaches the caller, and the pool still works afterwards
  REQUIRE_THROWS_WITH(vlmkit::run_parallel(100, 2,
                                           [](int64_t u) {
                                             if (u == 37) throw std::runtime_error("unit 37 failed");
                                           }),
                      "unit 37 failed");
  std::atomic<int> after{0};
  vlmkit::run_parallel(10, 2, [&](int64_t) { after++; });
  REQUIRE(after.load() == 10);
}
