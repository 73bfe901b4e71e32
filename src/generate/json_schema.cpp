// JSON-schema constrained decoding (see generate/json_schema.h). No torch
// here beyond c10's exceptions, so this translation unit compiles quickly.
#include "vlmkit/generate/json_schema.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace vlmkit {
namespace {
using Frame = JsonSchemaMatcher::Frame;
using Kind = Frame::Kind;

// Object stages.
constexpr int kObjNeedKey = 0, kObjInKey = 1, kObjNeedValue = 2, kObjInValue = 3, kObjInClose = 4,
              kObjDone = 5;
// Array stages.
constexpr int kArrOpen = 0, kArrFirst = 1, kArrItem = 2, kArrAfter = 3, kArrNeedItem = 4;
// Number stages.
constexpr int kNumStart = 0, kNumSign = 1, kNumZero = 2, kNumInt = 3, kNumDot = 4, kNumFrac = 5;

int64_t get_int(const ordered_json& schema, const char* key, int64_t fallback) {
  auto it = schema.find(key);
  if (it == schema.end()) return fallback;
  TORCH_CHECK_VALUE(it->is_number_integer() && it->get<int64_t>() >= 0, "JSON schema: '", key,
                    "' must be a non-negative integer, got ", it->dump());
  return it->get<int64_t>();
}

std::string type_of(const ordered_json& schema) {
  TORCH_CHECK_VALUE(schema.is_object(), "JSON schema: expected a schema object, got ", schema.dump());
  // A keyword that would constrain the value but is not enforced here is an
  // error, not silently ignored (the output would not honour it).
  static const std::vector<std::string> supported = {
      "type", "properties", "required", "items", "minItems", "maxItems", "minLength", "maxLength", "minimum",
      "maximum", "enum", "const", "additionalProperties", "title", "description", "default", "examples",
      "$schema", "$id", "$comment"};
  for (const auto& item : schema.items()) {
    TORCH_CHECK_VALUE(std::find(supported.begin(), supported.end(), item.key()) != supported.end(),
                      "JSON schema: keyword '", item.key(),
                      "' is not supported (supported: type, properties, required, items, minItems, maxItems, "
                      "minLength, maxLength, minimum, maximum, enum, const; title/description/default are ignored)");
  }
  auto extra = schema.find("additionalProperties");
  TORCH_CHECK_VALUE(extra == schema.end() || (extra->is_boolean() && !extra->get<bool>()),
                    "JSON schema: only additionalProperties: false is supported (outputs hold exactly the listed "
                    "properties), got ", extra == schema.end() ? "" : extra->dump());
  if (schema.contains("enum") || schema.contains("const")) return "enum";
  auto it = schema.find("type");
  TORCH_CHECK_VALUE(it != schema.end(), "JSON schema: every schema needs a 'type' (or 'enum'/'const'), got ",
                    schema.dump());
  TORCH_CHECK_VALUE(it->is_string(), "JSON schema: 'type' must be one string (unions are not supported), got ",
                    it->dump());
  const auto type = it->get<std::string>();
  static const std::vector<std::string> known = {"object", "array", "string", "integer",
                                                 "number", "boolean", "null"};
  TORCH_CHECK_VALUE(std::find(known.begin(), known.end(), type) != known.end(), "JSON schema: unsupported type '",
                    type, "'; supported: object, array, string, integer, number, boolean, null, enum, const");
  return type;
}

bool string_char_ok(char c) { return c >= 0x20 && c <= 0x7e && c != '"' && c != '\\'; }

bool can_end(const Frame& f) {
  switch (f.kind) {
    case Kind::integer:
    case Kind::number:
      if (!(f.stage == kNumZero || f.stage == kNumInt || f.stage == kNumFrac)) return false;
      if (f.kind == Kind::integer && f.schema) {
        const int64_t v = f.negative ? -f.value : f.value;
        auto mn = f.schema->find("minimum");
        if (mn != f.schema->end() && mn->is_number() && double(v) < mn->get<double>()) return false;
      }
      return true;
    case Kind::choice: return std::find(f.options.begin(), f.options.end(), f.text) != f.options.end();
    default: return false;
  }
}
}  // namespace

JsonSchemaMatcher::JsonSchemaMatcher(const ordered_json& schema)
    : schema_(std::make_shared<const ordered_json>(schema)) {
  max_length(*schema_);  // validates the whole schema up front
  push_value(*schema_);
}

void JsonSchemaMatcher::push_value(const ordered_json& schema) {
  Frame f;
  f.schema = &schema;
  const auto type = type_of(schema);
  if (type == "enum") {
    f.kind = Kind::choice;
    if (schema.contains("const")) {
      f.options.push_back(schema["const"].dump());
    } else {
      TORCH_CHECK_VALUE(schema["enum"].is_array() && !schema["enum"].empty(),
                        "JSON schema: 'enum' must be a non-empty array");
      for (const auto& v : schema["enum"]) f.options.push_back(v.dump());
    }
  } else if (type == "object") {
    f.kind = Kind::object;
  } else if (type == "array") {
    f.kind = Kind::array;
  } else if (type == "string") {
    f.kind = Kind::string;
  } else if (type == "integer") {
    f.kind = Kind::integer;
  } else if (type == "number") {
    f.kind = Kind::number;
  } else if (type == "boolean") {
    f.kind = Kind::choice;
    f.options = {"true", "false"};
  } else {
    f.kind = Kind::choice;
    f.options = {"null"};
  }
  stack_.push_back(std::move(f));
}

/// Structural frames expand into their next child; finished frames pop.
void JsonSchemaMatcher::normalize() {
  while (!stack_.empty()) {
    const size_t top = stack_.size() - 1;
    Frame& f = stack_[top];
    if (f.kind != Kind::object) return;
    const ordered_json* props = nullptr;
    if (f.schema->contains("properties")) props = &(*f.schema)["properties"];
    const int64_t n = props ? int64_t(props->size()) : 0;
    if (f.stage == kObjNeedKey) {
      Frame lit;
      if (f.index < n) {
        auto it = props->begin();
        std::advance(it, f.index);
        lit.text = std::string(f.index == 0 ? "{" : ",") + ordered_json(it.key()).dump() + ":";
        f.stage = kObjInKey;
      } else {
        lit.text = n == 0 ? "{}" : "}";
        f.stage = kObjInClose;
      }
      stack_.push_back(std::move(lit));
      return;
    }
    if (f.stage == kObjNeedValue) {
      auto it = props->begin();
      std::advance(it, f.index);
      f.stage = kObjInValue;
      push_value(it.value());
      continue;  // the value may itself be an object
    }
    if (f.stage == kObjDone) {
      stack_.pop_back();
      child_done();
      continue;
    }
    return;
  }
}

/// The top frame's child finished: advance the parent.
void JsonSchemaMatcher::child_done() {
  if (stack_.empty()) return;
  Frame& f = stack_.back();
  if (f.kind == Kind::object) {
    if (f.stage == kObjInKey) f.stage = kObjNeedValue;
    else if (f.stage == kObjInValue) ++f.index, f.stage = kObjNeedKey;
    else if (f.stage == kObjInClose) f.stage = kObjDone;
  } else if (f.kind == Kind::array && f.stage == kArrItem) {
    ++f.index;
    f.stage = kArrAfter;
  }
}

bool JsonSchemaMatcher::feed(char c) {
  auto saved = stack_;
  if (feed_raw(c)) return true;
  stack_ = std::move(saved);
  return false;
}

bool JsonSchemaMatcher::feed(const std::string& text) {
  auto saved = stack_;
  for (char c : text)
    if (!feed_raw(c)) {
      stack_ = std::move(saved);
      return false;
    }
  return true;
}

bool JsonSchemaMatcher::feed_raw(char c) {
  normalize();
  while (!stack_.empty()) {
    Frame& f = stack_.back();
    bool consumed = false, done = false, retry = false;
    switch (f.kind) {
      case Kind::literal:
        if (f.pos < f.text.size() && f.text[f.pos] == c) {
          consumed = true;
          done = ++f.pos == f.text.size();
        }
        break;
      case Kind::object:
        return false;  // normalize() always leaves a child on top of an object
      case Kind::array: {
        const int64_t min_items = get_int(*f.schema, "minItems", 0);
        const int64_t max_items = get_int(*f.schema, "maxItems", kDefaultMaxItems);
        if (f.stage == kArrOpen) {
          consumed = c == '[';
          if (consumed) f.stage = kArrFirst;
        } else if (f.stage == kArrFirst || f.stage == kArrNeedItem) {
          if (c == ']' && f.stage == kArrFirst && min_items == 0) {
            consumed = done = true;
          } else if (max_items > 0) {
            f.stage = kArrItem;
            const ordered_json& items = f.schema->contains("items") ? (*f.schema)["items"] : *f.schema;
            TORCH_CHECK_VALUE(f.schema->contains("items"), "JSON schema: arrays need 'items'");
            push_value(items);
            retry = true;
          }
        } else if (f.stage == kArrAfter) {
          if (c == ',' && f.index < max_items) {
            consumed = true;
            f.stage = kArrNeedItem;
          } else if (c == ']' && f.index >= min_items) {
            consumed = done = true;
          }
        }
        break;
      }
      case Kind::string: {
        const int64_t min_len = get_int(*f.schema, "minLength", 0);
        const int64_t max_len = get_int(*f.schema, "maxLength", kDefaultMaxStringLength);
        // Stage 0: before the opening quote; 1: inside; 2: after a backslash. An
        // escape (\" \\ \/ \b \f \n \r \t) is one character of the value, as JSON
        // Schema's lengths count it; \u escapes are not written (values are ASCII).
        if (f.stage == 0) {
          consumed = c == '"';
          if (consumed) f.stage = 1;
        } else if (f.stage == 2) {
          consumed = std::strchr("\"\\/bfnrt", c) != nullptr && c != '\0';
          if (consumed) {
            f.stage = 1;
            ++f.length;
          }
        } else if (c == '"') {
          consumed = done = f.length >= min_len;
        } else if (c == '\\' && f.length < max_len) {
          consumed = true;
          f.stage = 2;
        } else if (string_char_ok(c) && f.length < max_len) {
          consumed = true;
          ++f.length;
        }
        break;
      }
      case Kind::integer:
      case Kind::number: {
        const bool is_int = f.kind == Kind::integer;
        auto mn = f.schema->find("minimum");
        auto mx = f.schema->find("maximum");
        const bool allow_negative = mn == f.schema->end() || !mn->is_number() || mn->get<double>() < 0;
        const bool digit = c >= '0' && c <= '9';
        auto within_max = [&](int64_t v) {
          return f.negative || mx == f.schema->end() || !mx->is_number() || double(v) <= mx->get<double>();
        };
        switch (f.stage) {
          case kNumStart:
            if (c == '-' && allow_negative) consumed = true, f.negative = true, f.stage = kNumSign;
            else if (c == '0') consumed = true, f.stage = kNumZero, f.length = 1;
            else if (digit && within_max(c - '0'))
              consumed = true, f.value = c - '0', f.stage = kNumInt, f.length = 1;
            break;
          case kNumSign:
            if (digit && c != '0') consumed = true, f.value = c - '0', f.stage = kNumInt, f.length = 1;
            break;
          case kNumZero:
          case kNumInt:
            if (f.stage == kNumInt && digit && f.length < 12 && within_max(f.value * 10 + (c - '0'))) {
              consumed = true;
              f.value = f.value * 10 + (c - '0');
              ++f.length;
            } else if (!is_int && c == '.') {
              consumed = true;
              f.stage = kNumDot;
              f.length = 0;
            }
            break;
          case kNumDot:
          case kNumFrac:
            if (digit && f.length < 6) consumed = true, f.stage = kNumFrac, ++f.length;
            break;
        }
        break;
      }
      case Kind::choice: {
        const std::string next = f.text + c;
        for (const auto& option : f.options)
          if (option.compare(0, next.size(), next) == 0) {
            consumed = true;
            break;
          }
        if (consumed) f.text = next;
        break;
      }
    }
    if (retry) {
      normalize();  // an object item expands into its opening literal
      continue;
    }
    if (consumed) {
      if (done) {
        stack_.pop_back();
        child_done();
      }
      normalize();
      return true;
    }
    // Not consumed: an open-ended value (number, enum) may end here and the
    // character belongs to its parent.
    if (!can_end(f)) return false;
    stack_.pop_back();
    child_done();
    normalize();
  }
  return false;
}

bool JsonSchemaMatcher::can_finish() const {
  JsonSchemaMatcher copy = *this;
  copy.normalize();
  while (!copy.stack_.empty()) {
    if (!can_end(copy.stack_.back())) return false;
    copy.stack_.pop_back();
    copy.child_done();
    copy.normalize();
  }
  return true;
}

int64_t JsonSchemaMatcher::min_length(const ordered_json& schema) {
  const auto type = type_of(schema);
  if (type == "enum") {
    if (schema.contains("const")) return int64_t(schema["const"].dump().size());
    size_t shortest = std::numeric_limits<size_t>::max();
    for (const auto& v : schema["enum"]) shortest = std::min(shortest, v.dump().size());
    return int64_t(shortest);
  }
  if (type == "object") {
    if (!schema.contains("properties") || schema["properties"].empty()) return 2;
    int64_t total = 1;  // "{", then each ("key": value) and one separator or "}"
    for (auto it = schema["properties"].begin(); it != schema["properties"].end(); ++it)
      total += int64_t(ordered_json(it.key()).dump().size()) + 1 + min_length(it.value()) + 1;
    return total;
  }
  if (type == "array") {
    const int64_t n = get_int(schema, "minItems", 0);
    return n == 0 ? 2 : 1 + n * (min_length(schema["items"]) + 1);
  }
  if (type == "string") return 2 + get_int(schema, "minLength", 0);
  if (type == "integer" || type == "number") return 1;
  if (type == "boolean") return 4;
  return 4;  // null
}

int64_t JsonSchemaMatcher::min_completion() const {
  int64_t total = 0;
  for (size_t i = 0; i < stack_.size(); ++i) {
    const Frame& f = stack_[i];
    switch (f.kind) {
      case Kind::literal: total += int64_t(f.text.size() - f.pos); break;
      case Kind::string:
        if (f.stage == 0) {
          total += 2 + get_int(*f.schema, "minLength", 0);
        } else {  // the escaped character still to come counts towards minLength
          const int64_t pending = f.stage == 2 ? 1 : 0;
          total += pending + std::max<int64_t>(0, get_int(*f.schema, "minLength", 0) - f.length - pending) + 1;
        }
        break;
      case Kind::integer:
      case Kind::number: total += can_end(f) ? 0 : 1; break;
      case Kind::choice: {
        size_t best = std::numeric_limits<size_t>::max();
        for (const auto& o : f.options)
          if (o.compare(0, f.text.size(), f.text) == 0) best = std::min(best, o.size() - f.text.size());
        total += int64_t(best == std::numeric_limits<size_t>::max() ? 0 : best);
        break;
      }
      case Kind::array: {
        const int64_t min_items = get_int(*f.schema, "minItems", 0);
        const int64_t item = min_length((*f.schema)["items"]) + 1;  // the item and its separator
        if (f.stage == kArrOpen) total += min_items == 0 ? 2 : 1 + min_items * item;
        else if (f.stage == kArrFirst) total += min_items == 0 ? 1 : min_items * item;
        else if (f.stage == kArrItem) total += 1 + std::max<int64_t>(0, min_items - f.index - 1) * item;
        else if (f.stage == kArrAfter) total += 1 + std::max<int64_t>(0, min_items - f.index) * item;
        else total += std::max<int64_t>(1, min_items - f.index) * item;  // after ','
        break;
      }
      case Kind::object: {
        const ordered_json* props = f.schema->contains("properties") ? &(*f.schema)["properties"] : nullptr;
        const int64_t n = props ? int64_t(props->size()) : 0;
        auto property = [&](int64_t j) {
          auto it = props->begin();
          std::advance(it, j);
          return std::make_pair(int64_t(ordered_json(it.key()).dump().size()) + 2, min_length(it.value()));
        };
        int64_t from = f.index;  // properties not started yet
        if (f.stage == kObjInKey || f.stage == kObjNeedValue) {
          total += property(f.index).second;  // the key literal is the child frame
          from = f.index + 1;
        } else if (f.stage == kObjInValue) {
          from = f.index + 1;
        }
        if (f.stage == kObjInClose || f.stage == kObjDone) break;  // the child literal counts
        for (int64_t j = from; j < n; ++j) total += property(j).first + property(j).second;
        total += (f.stage == kObjNeedKey && n == 0) ? 2 : 1;  // "}" (or "{}")
        break;
      }
    }
  }
  return total;
}

int64_t JsonSchemaMatcher::max_length(const ordered_json& schema) {
  const auto type = type_of(schema);
  if (type == "enum") {
    size_t longest = 0;
    if (schema.contains("const")) return int64_t(schema["const"].dump().size());
    TORCH_CHECK_VALUE(schema["enum"].is_array() && !schema["enum"].empty(),
                      "JSON schema: 'enum' must be a non-empty array");
    for (const auto& v : schema["enum"]) longest = std::max(longest, v.dump().size());
    return int64_t(longest);
  }
  if (type == "object") {
    int64_t total = 2;
    if (schema.contains("properties")) {
      TORCH_CHECK_VALUE(schema["properties"].is_object(), "JSON schema: 'properties' must be an object");
      for (auto it = schema["properties"].begin(); it != schema["properties"].end(); ++it)
        total += int64_t(ordered_json(it.key()).dump().size()) + 2 + max_length(it.value());
    }
    return total;
  }
  if (type == "array") {
    TORCH_CHECK_VALUE(schema.contains("items"), "JSON schema: arrays need 'items'");
    const int64_t max_items = get_int(schema, "maxItems", kDefaultMaxItems);
    TORCH_CHECK_VALUE(get_int(schema, "minItems", 0) <= max_items,
                      "JSON schema: minItems exceeds maxItems");
    return 2 + max_items * (max_length(schema["items"]) + 1);
  }
  if (type == "string") {
    TORCH_CHECK_VALUE(get_int(schema, "minLength", 0) <= get_int(schema, "maxLength", kDefaultMaxStringLength),
                      "JSON schema: minLength exceeds maxLength");
    return 2 + 2 * get_int(schema, "maxLength", kDefaultMaxStringLength);  // every character may be escaped
  }
  if (type == "integer") return 13;
  if (type == "number") return 20;
  if (type == "boolean") return 5;
  return 4;  // null
}

JsonSchemaConstraint::JsonSchemaConstraint(const ordered_json& schema,
                                           std::shared_ptr<const std::vector<std::string>> token_texts,
                                           int64_t stop_token)
    : matcher_(std::make_shared<JsonSchemaMatcher>(schema)),
      token_texts_(std::move(token_texts)),
      stop_token_(stop_token) {}

std::unique_ptr<TokenConstraint> JsonSchemaConstraint::clone() const {
  auto copy = std::make_unique<JsonSchemaConstraint>(*this);
  copy->matcher_ = std::make_shared<JsonSchemaMatcher>(*matcher_);
  return copy;
}

void JsonSchemaConstraint::allowed(std::vector<char>& allowed, int64_t remaining) const {
  const auto& texts = *token_texts_;
  const size_t n = std::min(allowed.size(), texts.size());
  // A token is allowed when it continues valid JSON and what it leaves can
  // still close (plus the stop token) within the remaining budget.
  auto fits = [&](const std::string& text) {
    JsonSchemaMatcher next(*matcher_);
    return next.feed(text) && next.min_completion() + 1 <= remaining - 1;
  };
  int cache[256];  // single-character tokens share the answer for their character
  std::fill(std::begin(cache), std::end(cache), -1);
  for (size_t v = 0; v < n; ++v) {
    const auto& text = texts[v];
    if (text.empty()) continue;
    if (text.size() == 1) {
      auto& known = cache[static_cast<unsigned char>(text[0])];
      if (known < 0) known = fits(text) ? 1 : 0;
      allowed[v] = char(known);
    } else {
      allowed[v] = fits(text) ? 1 : 0;
    }
  }
  if (stop_token_ >= 0 && size_t(stop_token_) < allowed.size() && matcher_->can_finish())
    allowed[stop_token_] = 1;
}

void JsonSchemaConstraint::advance(int64_t token) {
  if (token == stop_token_) return;
  TORCH_CHECK_INDEX(token >= 0 && size_t(token) < token_texts_->size(), "JsonSchemaConstraint: token ", token,
                    " outside the vocabulary");
  TORCH_CHECK_VALUE(matcher_->feed((*token_texts_)[token]), "JsonSchemaConstraint: token ", token,
                    " does not continue valid JSON");
}

}  // namespace vlmkit
