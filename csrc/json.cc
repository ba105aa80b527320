// Strict RFC 8259 parser behind json.h: one recursive-descent pass over the bytes, positions tracked as
// (line, byte offset of the line start), UTF-8 validated inside strings, depth bounded. Hand-written
// rather than a library because every value needs its line:column and every error must name one.
#include "json.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <functional>
#include <vector>

namespace fastchat::json {

ParseError::ParseError(uint32_t line_, uint32_t column_, std::string reason_)
    : std::runtime_error(std::to_string(line_) + ":" + std::to_string(column_) + ": " + reason_),
      line(line_), column(column_), reason(std::move(reason_)) {}

const Value* Value::find(std::string_view key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& kv : object)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

const char* type_name(Type t) {
  switch (t) {
    case Type::Null: return "null";
    case Type::Bool: return "boolean";
    case Type::Number: return "number";
    case Type::String: return "string";
    case Type::Array: return "array";
    case Type::Object: return "object";
  }
  return "unknown";
}

namespace {

// Objects up to this many members check duplicates by a linear scan; larger ones (a tokenizer vocab) by hash.
constexpr size_t kLinearDuplicateScan = 24;
// Containers at least this large take over the scratch buffer instead of being copied out of it.
constexpr size_t kAdoptScratch = 4096;

std::string describe_byte(unsigned char c) {
  if (c >= 0x20 && c < 0x7f) return std::string("'") + static_cast<char>(c) + "'";
  static const char* hex = "0123456789abcdef";
  std::string s = "byte 0x";
  s += hex[c >> 4];
  s += hex[c & 15];
  return s;
}

class Parser {
 public:
  Parser(std::string_view text, uint32_t first_line, int max_depth)
      : p_(text.data()), begin_(text.data()), end_(text.data() + text.size()), line_(first_line),
        line_start_(text.data()), max_depth_(max_depth) {
    if (text.size() >= 3 && static_cast<unsigned char>(p_[0]) == 0xEF &&
        static_cast<unsigned char>(p_[1]) == 0xBB && static_cast<unsigned char>(p_[2]) == 0xBF) {
      p_ += 3;
      line_start_ = p_;  // editors show the first character after a BOM as column 1
    }
  }

  ~Parser() {
    // An error leaves children behind; a huge document (a tokenizer vocab) leaves huge buffers: drop both.
    constexpr size_t kKeep = 1 << 16;
    for (auto& a : array_scratch_) {
      a.clear();
      if (a.capacity() > kKeep) std::vector<Value>().swap(a);
    }
    for (auto& o : object_scratch_) {
      o.clear();
      if (o.capacity() > kKeep) std::vector<std::pair<std::string, Value>>().swap(o);
    }
    for (auto& k : key_pos_scratch_) k.clear();
    if (dup_table_.capacity() > kKeep) std::vector<uint32_t>().swap(dup_table_);
  }

  Value run() {
    Value v;
    skip_ws();
    if (p_ == end_) fail(p_, "empty input: expected a JSON value");
    parse_value(v, 0);
    skip_ws();
    if (p_ != end_) fail(p_, "unexpected " + describe_byte(*p_) + " after the JSON value (one value per document/line)");
    return v;
  }

 private:
  struct KeyPos { uint32_t line, column; };

  const char* p_;
  const char* begin_;
  const char* end_;
  uint32_t line_;
  const char* line_start_;
  int max_depth_;
  // Per-thread scratch, reused across parses so that JSONL records (many small documents) allocate little.
  struct Scratch {
    std::vector<std::vector<Value>> arrays;
    std::vector<std::vector<std::pair<std::string, Value>>> objects;
    std::vector<std::vector<KeyPos>> key_positions;
    std::vector<uint32_t> dup_table;
  };
  static Scratch& scratch() {
    thread_local Scratch s;
    return s;
  }
  std::vector<std::vector<Value>>& array_scratch_ = scratch().arrays;
  std::vector<std::vector<std::pair<std::string, Value>>>& object_scratch_ = scratch().objects;
  std::vector<std::vector<KeyPos>>& key_pos_scratch_ = scratch().key_positions;
  std::vector<uint32_t>& dup_table_ = scratch().dup_table;

  [[noreturn]] void fail(const char* at, const std::string& reason) const {
    throw ParseError(line_, static_cast<uint32_t>(at - line_start_) + 1, reason);
  }

  void skip_ws() {
    while (p_ < end_) {
      char c = *p_;
      if (c == ' ' || c == '\t' || c == '\r') {
        ++p_;
      } else if (c == '\n') {
        ++p_;
        ++line_;
        line_start_ = p_;
      } else {
        break;
      }
    }
  }

  void set_pos(Value& v, const char* at) const {
    v.line = line_;
    v.column = static_cast<uint32_t>(at - line_start_) + 1;
  }

  void expect_literal(const char* word, size_t n) {
    if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0) {
      // Point at the first byte that differs so "tru" or "nul" errors land on the right column.
      const char* q = p_;
      for (size_t i = 0; i < n && q < end_ && *q == word[i]; ++i) ++q;
      if (q == end_) fail(q, std::string("unexpected end of input inside '") + word + "'");
      fail(q, "invalid literal: expected '" + std::string(word) + "'");
    }
    p_ += n;
  }

  void parse_value(Value& v, int depth) {
    if (p_ == end_) fail(p_, "unexpected end of input: expected a value");
    set_pos(v, p_);
    char c = *p_;
    switch (c) {
      case '{': parse_object(v, depth + 1); return;
      case '[': parse_array(v, depth + 1); return;
      case '"':
        v.type = Type::String;
        parse_string(v.string);
        return;
      case 't': expect_literal("true", 4); v.type = Type::Bool; v.boolean = true; return;
      case 'f': expect_literal("false", 5); v.type = Type::Bool; v.boolean = false; return;
      case 'n': expect_literal("null", 4); v.type = Type::Null; return;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) {
          parse_number(v);
          return;
        }
        if (c == 'N' || c == 'I')
          fail(p_, "NaN and Infinity are not valid JSON numbers; write null or a string");
        if (c == '\'') fail(p_, "strings must use double quotes, not single quotes");
        if (c == ']' || c == '}') fail(p_, "unexpected '" + std::string(1, c) + "': expected a value (trailing comma?)");
        fail(p_, "unexpected " + describe_byte(static_cast<unsigned char>(c)) + ": expected a value");
    }
  }

  void check_depth(int depth) const {
    if (depth > max_depth_)
      fail(p_, "nesting deeper than " + std::to_string(max_depth_) + " levels");
  }

  // Children are parsed into a per-depth scratch vector and moved into an exactly sized one at the close:
  // one allocation per container instead of a doubling series (a tokenizer.json holds ~10^6 values).
  std::vector<Value>& array_scratch(int depth) {
    if (static_cast<size_t>(depth) >= array_scratch_.size()) array_scratch_.resize(depth + 1);
    return array_scratch_[depth];
  }

  void parse_array(Value& v, int depth) {
    check_depth(depth);
    v.type = Type::Array;
    ++p_;  // '['
    skip_ws();
    if (p_ < end_ && *p_ == ']') {
      ++p_;
      return;
    }
    size_t base = array_scratch(depth).size();  // 0 unless a caller re-enters parse() on this thread
    for (;;) {
      skip_ws();
      // Parse into a local, then append: deeper levels use other scratch vectors, so none is resized under us.
      Value item;
      parse_value(item, depth);
      array_scratch(depth).push_back(std::move(item));
      skip_ws();
      if (p_ == end_) fail(p_, "unexpected end of input: expected ',' or ']' to continue the array");
      if (*p_ == ',') {
        ++p_;
        skip_ws();
        if (p_ < end_ && *p_ == ']') fail(p_, "trailing comma before ']' is not allowed in JSON");
        continue;
      }
      if (*p_ == ']') {
        ++p_;
        auto& scratch = array_scratch(depth);
        if (base == 0 && scratch.size() >= kAdoptScratch) {
          v.array.swap(scratch);  // a big array keeps the scratch buffer: no second copy to allocate and fault in
          return;
        }
        v.array.reserve(scratch.size() - base);
        for (size_t i = base; i < scratch.size(); ++i) v.array.push_back(std::move(scratch[i]));
        scratch.resize(base);
        return;
      }
      fail(p_, "unexpected " + describe_byte(static_cast<unsigned char>(*p_)) + ": expected ',' or ']' in the array");
    }
  }

  std::vector<std::pair<std::string, Value>>& object_scratch(int depth) {
    if (static_cast<size_t>(depth) >= object_scratch_.size()) {
      object_scratch_.resize(depth + 1);
      key_pos_scratch_.resize(depth + 1);
    }
    return object_scratch_[depth];
  }

  void parse_object(Value& v, int depth) {
    check_depth(depth);
    v.type = Type::Object;
    ++p_;  // '{'
    skip_ws();
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      return;
    }
    size_t base = object_scratch(depth).size();
    for (;;) {
      skip_ws();
      if (p_ == end_) fail(p_, "unexpected end of input: expected a member name");
      if (*p_ != '"') {
        if (*p_ == '}') fail(p_, "trailing comma before '}' is not allowed in JSON");
        if (*p_ == '\'') fail(p_, "member names must use double quotes, not single quotes");
        fail(p_, "unexpected " + describe_byte(static_cast<unsigned char>(*p_)) + ": expected a member name in double quotes");
      }
      std::pair<std::string, Value> member;
      KeyPos key_pos{line_, static_cast<uint32_t>(p_ - line_start_) + 1};
      parse_string(member.first);
      skip_ws();
      if (p_ == end_) fail(p_, "unexpected end of input: expected ':' after the member name");
      if (*p_ != ':') fail(p_, "unexpected " + describe_byte(static_cast<unsigned char>(*p_)) + ": expected ':' after the member name");
      ++p_;
      skip_ws();
      parse_value(member.second, depth);
      object_scratch(depth).push_back(std::move(member));
      key_pos_scratch_[depth].push_back(key_pos);
      skip_ws();
      if (p_ == end_) fail(p_, "unexpected end of input: expected ',' or '}' to continue the object");
      if (*p_ == ',') {
        ++p_;
        continue;
      }
      if (*p_ == '}') {
        ++p_;
        auto& scratch = object_scratch(depth);
        auto& positions = key_pos_scratch_[depth];
        check_duplicates(scratch, positions, base);
        positions.resize(base);
        if (base == 0 && scratch.size() >= kAdoptScratch) {
          v.object.swap(scratch);
          return;
        }
        v.object.reserve(scratch.size() - base);
        for (size_t i = base; i < scratch.size(); ++i) v.object.push_back(std::move(scratch[i]));
        scratch.resize(base);
        return;
      }
      fail(p_, "unexpected " + describe_byte(static_cast<unsigned char>(*p_)) + ": expected ',' or '}' in the object");
    }
  }

  // Reports the first member (in document order) whose name appeared before. Small objects scan linearly;
  // large ones (a tokenizer vocab) use an open-addressing table of indices, rebuilt per object.
  void check_duplicates(const std::vector<std::pair<std::string, Value>>& members,
                        const std::vector<KeyPos>& positions, size_t base) {
    size_t n = members.size() - base;
    auto report = [&](size_t i) {
      line_ = positions[i].line;
      throw ParseError(positions[i].line, positions[i].column,
                       "duplicate member name \"" + members[i].first + "\" in the object");
    };
    if (n <= kLinearDuplicateScan) {
      for (size_t i = base + 1; i < members.size(); ++i)
        for (size_t j = base; j < i; ++j)
          if (members[i].first == members[j].first) report(i);
      return;
    }
    size_t cap = 1;
    while (cap < 2 * n) cap <<= 1;
    dup_table_.assign(cap, UINT32_MAX);
    std::hash<std::string_view> hasher;
    for (size_t i = base; i < members.size(); ++i) {
      std::string_view key = members[i].first;
      size_t h = hasher(key) & (cap - 1);
      while (dup_table_[h] != UINT32_MAX) {
        if (members[dup_table_[h]].first == key) report(i);
        h = (h + 1) & (cap - 1);
      }
      dup_table_[h] = static_cast<uint32_t>(i);
    }
  }

  void parse_number(Value& v) {
    const char* start = p_;
    const char* q = p_;
    if (*q == '-') ++q;
    if (q == end_ || !(*q >= '0' && *q <= '9')) fail(q, "invalid number: expected a digit after '-'");
    if (*q == '0') {
      ++q;
      if (q < end_ && *q >= '0' && *q <= '9') fail(start, "invalid number: leading zeros are not allowed");
    } else {
      while (q < end_ && *q >= '0' && *q <= '9') ++q;
    }
    bool integral = true;
    if (q < end_ && *q == '.') {
      integral = false;
      ++q;
      if (q == end_ || !(*q >= '0' && *q <= '9')) fail(q, "invalid number: expected a digit after '.'");
      while (q < end_ && *q >= '0' && *q <= '9') ++q;
    }
    if (q < end_ && (*q == 'e' || *q == 'E')) {
      integral = false;
      ++q;
      if (q < end_ && (*q == '+' || *q == '-')) ++q;
      if (q == end_ || !(*q >= '0' && *q <= '9')) fail(q, "invalid number: expected a digit in the exponent");
      while (q < end_ && *q >= '0' && *q <= '9') ++q;
    }
    v.type = Type::Number;
    size_t len = static_cast<size_t>(q - start);
    const char* d = start + (*start == '-');
    if (integral && q - d <= 19) {
      // Up to 19 digits fit uint64; the sign decides which magnitudes fit int64.
      uint64_t mag = 0;
      for (const char* r = d; r < q; ++r) mag = mag * 10 + static_cast<uint64_t>(*r - '0');
      bool neg = *start == '-';
      if ((!neg && mag <= static_cast<uint64_t>(INT64_MAX)) || (neg && mag <= static_cast<uint64_t>(INT64_MAX) + 1)) {
        v.is_integer = true;
        v.integer = neg ? static_cast<int64_t>(0 - mag) : static_cast<int64_t>(mag);
        v.number = static_cast<double>(v.integer);
        p_ = q;
        return;
      }
    }
    std::string buf(start, len);  // strtod needs a terminated buffer
    v.number = std::strtod(buf.c_str(), nullptr);
    p_ = q;
  }

  static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  uint32_t read_hex4(const char* at) {
    if (end_ - at < 4) fail(at, "unexpected end of input inside a \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      int h = hex_value(at[i]);
      if (h < 0) fail(at + i, "invalid \\u escape: expected 4 hex digits");
      cp = (cp << 4) | static_cast<uint32_t>(h);
    }
    return cp;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  // Length of the valid UTF-8 sequence starting at q (a non-ASCII lead byte), or fails naming the bad byte.
  size_t utf8_length(const char* q) {
    const unsigned char* u = reinterpret_cast<const unsigned char*>(q);
    size_t avail = static_cast<size_t>(end_ - q);
    unsigned char c = u[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 3;
      if (c == 0xE0) lo = 0xA0;       // no overlong 3-byte forms
      else if (c == 0xED) hi = 0x9F;  // no UTF-8-encoded surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 4;
      if (c == 0xF0) lo = 0x90;       // no overlong 4-byte forms
      else if (c == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
    } else {
      fail(q, "invalid UTF-8 " + describe_byte(c) + " in a string (the file must be UTF-8)");
    }
    if (avail < n) fail(q, "truncated UTF-8 sequence at the end of input (the file must be UTF-8)");
    // Errors point at the lead byte: that is the character an editor shows as broken.
    auto bad = [&](size_t i) {
      fail(q, "invalid UTF-8 sequence in a string: " + describe_byte(c) + " followed by " + describe_byte(u[i]) +
                  " (the file must be UTF-8)");
    };
    if (u[1] < lo || u[1] > hi) bad(1);
    for (size_t i = 2; i < n; ++i)
      if (u[i] < 0x80 || u[i] > 0xBF) bad(i);
    return n;
  }

  void parse_string(std::string& out) {
    ++p_;  // opening quote
    const char* q = p_;
    for (;;) {
      // Copy the longest run of plain ASCII in one go; stop on quote, backslash, control or non-ASCII bytes.
      const char* run = q;
      while (q < end_) {
        unsigned char c = static_cast<unsigned char>(*q);
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
        ++q;
      }
      out.append(run, static_cast<size_t>(q - run));
      if (q == end_) fail(q, "unexpected end of input inside a string (missing closing quote)");
      unsigned char c = static_cast<unsigned char>(*q);
      if (c == '"') {
        p_ = q + 1;
        return;
      }
      if (c >= 0x80) {
        size_t n = utf8_length(q);
        out.append(q, n);
        q += n;
        continue;
      }
      if (c < 0x20) {
        if (c == '\n') fail(q, "unescaped newline inside a string (missing closing quote, or write \\n)");
        fail(q, "unescaped control character " + describe_byte(c) + " inside a string (escape it as \\u00XX)");
      }
      // Backslash escape.
      if (q + 1 == end_) fail(q, "unexpected end of input inside an escape");
      char e = q[1];
      switch (e) {
        case '"': out += '"'; q += 2; break;
        case '\\': out += '\\'; q += 2; break;
        case '/': out += '/'; q += 2; break;
        case 'b': out += '\b'; q += 2; break;
        case 'f': out += '\f'; q += 2; break;
        case 'n': out += '\n'; q += 2; break;
        case 'r': out += '\r'; q += 2; break;
        case 't': out += '\t'; q += 2; break;
        case 'u': {
          uint32_t cp = read_hex4(q + 2);
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail(q, "lone low surrogate in a \\u escape (not valid Unicode)");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (end_ - q < 12 || q[6] != '\\' || q[7] != 'u')
              fail(q, "lone high surrogate in a \\u escape: it must be followed by a \\uDC00-\\uDFFF escape");
            uint32_t lo = read_hex4(q + 8);
            if (lo < 0xDC00 || lo > 0xDFFF)
              fail(q + 6, "high surrogate followed by a non-low-surrogate \\u escape (not valid Unicode)");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            q += 12;
          } else {
            q += 6;
          }
          append_utf8(out, cp);
          break;
        }
        default:
          fail(q, "invalid escape: backslash followed by " + describe_byte(static_cast<unsigned char>(e)) + " (allowed: \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)");
      }
    }
  }
};

}  // namespace

Value parse(std::string_view text, uint32_t first_line, int max_depth) {
  Parser parser(text, first_line, max_depth);
  return parser.run();
}

}  // namespace fastchat::json
