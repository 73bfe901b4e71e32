#include "helpers.h"
#include "vlmkit/runtime.h"

#include <cstdlib>

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
