#pragma once
/// Slot registries. A slot (the projector, ...) has one table; each row names
/// one implementation and carries everything the rest of vlmkit needs to know
/// about it: the config name, the Python class name, a one-line description,
/// the option fields with their defaults, and the factory. Rows register
/// themselves from the implementation's own source file, so the JSON configs,
/// the bindings, the CLI, the benchmark suite and the generic tests pick up a
/// new implementation without an edit (docs/CONTRIBUTING.md).
#include <c10/util/Exception.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "vlmkit/config.h"

namespace vlmkit {

namespace detail {
/// config["type"] as a string, or `fallback` when the config or its type is
/// absent; `path` names the config object in errors.
inline std::string slot_type(const json& config, const std::string& path, const std::string& fallback) {
  if (!config.is_object()) return fallback;
  auto it = config.find("type");
  if (it == config.end() || it->is_null()) return fallback;
  const std::string at = path.empty() ? "type" : path + ".type";
  TORCH_CHECK_TYPE(it->is_string(), "config key '", at, "': expected a string, got ", json_kind(*it));
  return it->get<std::string>();
}
}  // namespace detail

/// One implementation of a slot whose factory takes (config, path, args...).
template <class Module, class... Args>
struct SlotRow {
  /// The config's "type" (snake_case).
  std::string name;
  /// The class vlmkit exposes in Python (vlmkit.<python_class>).
  std::string python_class;
  /// One line: what it is and where it comes from.
  std::string doc;
  /// The option fields the config reads, with their defaults.
  json defaults = json::object();
  /// The same fields' names in their declaration order (constructor order in Python).
  std::vector<std::string> fields;
  /// Builds it from a config object (null: all defaults); `path` names the
  /// config object in error messages.
  std::function<std::shared_ptr<Module>(const json& config, const std::string& path, Args...)> make;
};

/// A table of rows by name (`Row` has a `std::string name`), kept sorted by
/// name: the lookup, the refusal of unknown names and the name list that every
/// slot table shares.
template <class Row>
class NamedTable {
 public:
  /// `what` names the table's rows in error messages ("projector").
  explicit NamedTable(const char* what) : what_(what) {}

  /// Adds a row; a name may be registered once. Returns true (for static
  /// registration: `static const bool registered = table.add(...)`).
  bool add(Row row) {
    TORCH_CHECK_VALUE(!row.name.empty(), "a ", what_, " row needs a name");
    TORCH_CHECK_VALUE(find(row.name) == nullptr, what_, " '", row.name, "' is registered twice");
    auto at = std::lower_bound(rows_.begin(), rows_.end(), row.name,
                               [](const Row& r, const std::string& name) { return r.name < name; });
    rows_.insert(at, std::move(row));
    return true;
  }

  const Row* find(const std::string& name) const {
    for (const auto& row : rows_)
      if (row.name == name) return &row;
    return nullptr;
  }

  /// The row of `name`; an unknown name raises ValueError listing the known
  /// ones, prefixed by `at` (the config key) when given.
  const Row& at(const std::string& name, const std::string& at = "") const {
    if (const Row* row = find(name)) return *row;
    TORCH_CHECK_VALUE(false, at.empty() ? "" : "config key '" + at + "': ", "unknown ", what_, " '", name,
                      "'; expected one of ", detail::join_names(names()));
  }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& row : rows_) out.push_back(row.name);
    return out;
  }

  const std::vector<Row>& rows() const { return rows_; }
  const char* what() const { return what_; }

 private:
  const char* what_;
  std::vector<Row> rows_;
};

/// The table of one module slot: rows that build an implementation.
template <class Module, class... Args>
class SlotRegistry : public NamedTable<SlotRow<Module, Args...>> {
 public:
  using Row = SlotRow<Module, Args...>;
  using NamedTable<Row>::NamedTable;

  bool add(Row row) {
    TORCH_CHECK_VALUE(static_cast<bool>(row.make), "a ", this->what(), " row needs a factory");
    return NamedTable<Row>::add(std::move(row));
  }

  /// Builds the implementation config["type"] names (`fallback` when the
  /// config or its type is absent) from `config`.
  std::shared_ptr<Module> make(const json& config, const std::string& path, const std::string& fallback,
                               Args... args) const {
    const auto name = detail::slot_type(config, path, fallback);
    return this->at(name, path.empty() ? "type" : path + ".type").make(config, path, args...);
  }
};

/// The row of an implementation class `Impl` of slot `Module` with:
///   using Options = ...;  // constructible from the factory's Args, with visit_fields
///   static constexpr const char* kName = "...";
///   explicit Impl(Options);
/// `defaults` are the fields of Options(default_args...).
template <class Impl, class Module, class... Args>
SlotRow<Module, Args...> slot_row(std::string python_class, std::string doc, Args... default_args) {
  using Options = typename Impl::Options;
  SlotRow<Module, Args...> row;
  row.name = Impl::kName;
  row.python_class = std::move(python_class);
  row.doc = std::move(doc);
  row.defaults = options_to_json(Options(default_args...));
  row.fields = option_names(Options(default_args...));
  row.make = [](const json& config, const std::string& path, Args... args) -> std::shared_ptr<Module> {
    Options options(args...);
    read_options(config, path, options);
    return std::make_shared<Impl>(options);
  };
  return row;
}

/// {"type": Impl::kName, ...the fields of its options}: the config() of a
/// slot implementation.
template <class Impl>
json slot_config(const Impl& module) {
  json out = options_to_json(module.options);
  out["type"] = Impl::kName;
  return out;
}


}  // namespace vlmkit

#define VLMKIT_CONCAT_INNER(a, b) a##b
#define VLMKIT_CONCAT(a, b) VLMKIT_CONCAT_INNER(a, b)
/// Adds a row to a registry during static initialisation, from the source
/// file of the implementation: VLMKIT_REGISTER(projector_registry(), row).
/// At namespace scope; each use makes its own variable (__COUNTER__), so
/// several may share a translation unit (unity builds).
#define VLMKIT_REGISTER(registry, ...)                                       \
  namespace {                                                                \
  [[maybe_unused]] const bool VLMKIT_CONCAT(vlmkit_registered_, __COUNTER__) = \
      (registry).add(__VA_ARGS__);                                           \
  }
