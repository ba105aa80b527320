// Strict JSON (RFC 8259) parsing into a small DOM, with 1-based line:column positions on every value and
// in every error. Used for tokenizer.json and for each record of a JSONL/JSON dataset. Knows nothing of
// tokenizers, chats or Python.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fastchat::json {

enum class Type : uint8_t { Null, Bool, Number, String, Array, Object };

struct Value {
  Type type = Type::Null;
  bool boolean = false;
  bool is_integer = false;   // the number was written without fraction or exponent and fits int64
  int64_t integer = 0;       // valid when is_integer
  double number = 0.0;       // valid for every Number
  std::string string;        // decoded UTF-8 (escapes resolved) for String
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // document order; duplicate keys are an error
  uint32_t line = 0, column = 0;  // where the value starts (1-based; column counts bytes)

  bool is_null() const { return type == Type::Null; }
  bool is_string() const { return type == Type::String; }
  bool is_array() const { return type == Type::Array; }
  bool is_object() const { return type == Type::Object; }
  // Member lookup on an object; nullptr when absent or when this is not an object.
  const Value* find(std::string_view key) const;
};

struct ParseError : std::runtime_error {
  uint32_t line, column;
  std::string reason;
  ParseError(uint32_t line_, uint32_t column_, std::string reason_);
};

// Parses exactly one JSON value (surrounding whitespace allowed, anything else after it is an error).
// `first_line` numbers the lines of `text` (a JSONL record on line 120 passes 120). A UTF-8 BOM at the
// start is accepted. Invalid UTF-8 inside strings and lone surrogate escapes are errors. Nesting deeper
// than `max_depth` is an error, never a stack overflow.
Value parse(std::string_view text, uint32_t first_line = 1, int max_depth = 512);

// A short human name for a type ("string", "array", ...), for error messages.
const char* type_name(Type t);

}  // namespace fastchat::json
