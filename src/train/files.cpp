// Whole-file reads and fsynced writes (src/train/files.h).
#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include "../internal.h"
#include "files.h"
#include "vlmkit/models/build.h"
#include "vlmkit/runtime.h"
#include "vlmkit/train/checkpoint.h"
#include "vlmkit/train/lora.h"
#include "vlmkit/train/trainer.h"

namespace fs = std::filesystem;

namespace vlmkit {
namespace detail {
std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw NotFound("no such file: '" + path + "'");
  std::ostringstream out;
  out << in.rdbuf();
  TORCH_CHECK(!in.bad(), "could not read '", path, "'");
  return out.str();
}

namespace {
[[noreturn]] void io_error(const char* what, const std::string& path) {
  TORCH_CHECK(false, what, " '", path, "': ", std::strerror(errno));
}
}  // namespace

void write_synced(const std::string& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_error("cannot create", path);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      io_error("cannot write", path);
    }
    done += size_t(n);
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    io_error("cannot fsync", path);
  }
  if (::close(fd) != 0) io_error("cannot close", path);
}

void fsync_dir(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) io_error("cannot open directory", path);
  ::fsync(fd);
  ::close(fd);
}
}  // namespace detail
}  // namespace vlmkit
