#pragma once
/// JSON configs: one reader and one writer driven by each options struct's
/// `visit_fields`, so the list of keys is written once per block. Unknown keys
/// raise ValueError listing the allowed ones; wrong JSON types raise TypeError.
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "vlmkit/detail/enum_names.h"

namespace vlmkit {

using json = nlohmann::json;

namespace detail {
std::string json_kind(const json& value);
std::string join_keys(const std::vector<std::string>& keys);

template <class T, class = void>
struct has_enum_names : std::false_type {};
template <class T>
struct has_enum_names<T, std::void_t<decltype(EnumNames<T>::table())>> : std::true_type {};
}  // namespace detail

/// A JSON string naming an enum value; `at` names the config key in errors
/// (TypeError for a non-string, ValueError listing the names for an unknown one).
template <class E>
E enum_from_json(const json& v, const std::string& at) {
  TORCH_CHECK_TYPE(v.is_string(), "config key '", at, "': expected a string naming a ", EnumNames<E>::what,
                   " (one of ", detail::join_names(enum_names<E>()), "), got ", detail::json_kind(v));
  const auto name = v.get<std::string>();
  for (const auto& entry : EnumNames<E>::table())
    if (name == entry.second) return entry.first;
  TORCH_CHECK_VALUE(false, "config key '", at, "': unknown ", EnumNames<E>::what, " '", name,
                    "'; expected one of ", detail::join_names(enum_names<E>()));
}

/// Reads fields of a JSON object into options; `path` names the object in
/// error messages ("image_encoder").
class ConfigReader {
 public:
  ConfigReader(const json& object, std::string path);

  template <class T>
  void operator()(const char* key, T& value) {
    known_.emplace_back(key);
    auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return;
    read(*it, where(key), value);
  }
  /// Accepts a key that is handled elsewhere (for example "type").
  void allow(const std::string& key) { known_.push_back(key); }
  /// Raises ValueError for keys that no field and no allow() claimed.
  void finish() const;

  const json& object() const { return object_; }
  std::string where(const std::string& key) const {
    return path_.empty() ? key : path_ + "." + key;
  }

 private:
  static void read(const json& v, const std::string& at, int64_t& out);
  static void read(const json& v, const std::string& at, uint64_t& out);
  static void read(const json& v, const std::string& at, double& out);
  static void read(const json& v, const std::string& at, bool& out);
  static void read(const json& v, const std::string& at, std::string& out);
  static void read(const json& v, const std::string& at, std::vector<int64_t>& out);
  static void read(const json& v, const std::string& at, std::vector<std::string>& out);
  static void read(const json& v, const std::string& at, std::map<std::string, double>& out);
  template <class E, std::enable_if_t<detail::has_enum_names<E>::value, int> = 0>
  static void read(const json& v, const std::string& at, E& out) {
    out = enum_from_json<E>(v, at);
  }

  const json& object_;
  std::string path_;
  std::vector<std::string> known_;
};

/// Writes fields into a JSON object.
class ConfigWriter {
 public:
  explicit ConfigWriter(json& out) : out_(out) {}
  template <class T>
  void operator()(const char* key, const T& value) {
    if constexpr (detail::has_enum_names<T>::value) {
      out_[key] = to_name(value);
    } else {
      out_[key] = value;
    }
  }

 private:
  json& out_;
};

/// Reads `object` (may be null: all defaults) into `options`, rejecting
/// unknown keys other than those in `also_allowed`.
template <class Options>
void read_options(const json& object, const std::string& path, Options& options,
                  std::initializer_list<const char*> also_allowed = {"type"}) {
  if (object.is_null()) return;
  ConfigReader reader(object, path);
  for (const char* key : also_allowed) reader.allow(key);
  visit_fields(options, reader);
  reader.finish();
}

template <class Options>
json options_to_json(const Options& options) {
  json out = json::object();
  ConfigWriter writer(out);
  Options copy = options;
  visit_fields(copy, writer);
  return out;
}

/// The options' field names in their visit order (a JSON object sorts them).
namespace detail {
struct FieldNames {
  std::vector<std::string> out;
  template <class T>
  void operator()(const char* name, T&) { out.emplace_back(name); }
};
}  // namespace detail

template <class Options>
std::vector<std::string> option_names(const Options& options) {
  detail::FieldNames names;
  Options copy = options;
  visit_fields(copy, names);
  return names.out;
}

/// Parses JSON text; malformed text raises ValueError with the parser's
/// position.
json parse_json(const std::string& text, const std::string& what = "config");

/// Returns object[key] if present, else null; raises TypeError when the value
/// exists but is not an object.
const json& sub_object(const json& object, const std::string& key, const std::string& path);

}  // namespace vlmkit
