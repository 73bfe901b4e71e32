#pragma once
/// JSON-schema constrained decoding: a character-level matcher that only
/// lets through text that completes to JSON valid under the schema, written
/// compactly (no whitespace) with object properties in schema order.
///
/// Supported: type object (properties, all emitted in order), array (items,
/// minItems, maxItems), string (minLength, maxLength), integer (minimum,
/// maximum), number, boolean, null, enum, const. Unbounded strings and arrays
/// get the defaults below so generation always terminates, and the constraint
/// knows the remaining token budget: it steers towards the shortest completion
/// in time, so the value always closes.
#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

#include "vlmkit/generate/generate.h"

namespace vlmkit {

using ordered_json = nlohmann::ordered_json;

constexpr int64_t kDefaultMaxStringLength = 32;
constexpr int64_t kDefaultMaxItems = 8;

class JsonSchemaMatcher {
 public:
  /// Unsupported schema constructs raise ValueError naming them.
  explicit JsonSchemaMatcher(const ordered_json& schema);
  /// Consumes c if allowed; returns false (state unchanged) otherwise.
  bool feed(char c);
  bool feed(const std::string& text);
  /// The text so far is a complete value.
  bool can_finish() const;
  /// Fewest characters that complete the value from here (0 when complete).
  int64_t min_completion() const;
  /// Upper bound on the characters of any accepted value.
  static int64_t max_length(const ordered_json& schema);
  /// Length of the shortest accepted value.
  static int64_t min_length(const ordered_json& schema);

  /// One open value on the matcher's stack.
  struct Frame {
    enum class Kind { literal, object, array, string, integer, number, choice };
    Kind kind = Kind::literal;
    const ordered_json* schema = nullptr;
    int stage = 0;
    int64_t index = 0;        // object: next property; array: items so far
    int64_t length = 0;       // string length; number digits
    int64_t value = 0;        // integer magnitude so far
    bool negative = false;
    std::string text;         // literal text / choice prefix
    size_t pos = 0;           // literal position
    std::vector<std::string> options;  // choice alternatives
  };

 private:
  bool feed_raw(char c);
  void push_value(const ordered_json& schema);
  void normalize();
  void child_done();
  std::shared_ptr<const ordered_json> schema_;  // keeps frame pointers valid
  std::vector<Frame> stack_;
};

/// TokenConstraint over a vocabulary given as the text of each token ("" for
/// special tokens); the stop token is allowed exactly when the value is
/// complete.
class JsonSchemaConstraint final : public TokenConstraint {
 public:
  JsonSchemaConstraint(const ordered_json& schema,
                       std::shared_ptr<const std::vector<std::string>> token_texts,
                       int64_t stop_token);
  std::unique_ptr<TokenConstraint> clone() const override;
  void allowed(std::vector<char>& allowed, int64_t remaining) const override;
  void advance(int64_t token) override;
  int64_t min_tokens() const override { return matcher_->min_completion() + 1; }

 private:
  std::shared_ptr<JsonSchemaMatcher> matcher_;
  std::shared_ptr<const std::vector<std::string>> token_texts_;
  int64_t stop_token_;
};

}  // namespace vlmkit
