#pragma once
// Name tables for the enums that appear in configs: one table per enum, so the
// JSON reader, the Python bindings and error messages all agree on spelling
// (the llama.cpp PROJECTOR_TYPE_* pattern).
#include <c10/util/Exception.h>

#include <string>
#include <utility>
#include <vector>

namespace vlmkit {

/// Specialise with `static const std::vector<std::pair<E, const char*>>& table()`
/// and `static constexpr const char* what` (a human name for error messages).
template <class E>
struct EnumNames;

namespace detail {
inline std::string join_names(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i) out += ", ";
    out += "'" + names[i] + "'";
  }
  return out;
}
}  // namespace detail

template <class E>
std::vector<std::string> enum_names() {
  std::vector<std::string> out;
  for (const auto& entry : EnumNames<E>::table()) out.emplace_back(entry.second);
  return out;
}

template <class E>
const char* to_name(E value) {
  for (const auto& entry : EnumNames<E>::table())
    if (entry.first == value) return entry.second;
  TORCH_CHECK_VALUE(false, "invalid ", EnumNames<E>::what, " value ", static_cast<int>(value));
}

/// Parses a name; unknown names raise ValueError listing the known ones.
template <class E>
E from_name(const std::string& name) {
  for (const auto& entry : EnumNames<E>::table())
    if (name == entry.second) return entry.first;
  TORCH_CHECK_VALUE(false, "unknown ", EnumNames<E>::what, " '", name,
                    "'; expected one of ", detail::join_names(enum_names<E>()));
}

}  // namespace vlmkit

#define VLMKIT_ENUM_NAMES(E, WHAT, ...)                                   \
  template <>                                                             \
  struct EnumNames<E> {                                                   \
    static constexpr const char* what = WHAT;                             \
    static const std::vector<std::pair<E, const char*>>& table() {        \
      static const std::vector<std::pair<E, const char*>> t{__VA_ARGS__}; \
      return t;                                                           \
    }                                                                     \
  }
