// The built-in chat templates (chatml, llama3, llama2, mistral, alpaca), written to produce byte-for-byte
// the text that the reference Jinja templates produce, while recording which bytes are control tokens and
// which are trainable. Tool formats for chatml/llama3 follow the Hermes / Llama-3.1 conventions.
#include "chat.h"

#include <charconv>
#include <cmath>
#include <cstdio>

namespace fastchat::chat {

void Rendered::clear() {
  text.clear();
  control.clear();
  train.clear();
  turn_ends.clear();
}

// ------------------------------------------------------------------------------------ text helpers

namespace {

// Decodes the code point ending at s[end) (UTF-8, already validated by the JSON parser); returns its start.
size_t prev_cp(std::string_view s, size_t end, uint32_t& cp) {
  size_t b = end - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
  size_t n = end - b;
  const unsigned char* u = reinterpret_cast<const unsigned char*>(s.data() + b);
  if (n == 1) cp = u[0];
  else if (n == 2) cp = ((u[0] & 0x1Fu) << 6) | (u[1] & 0x3Fu);
  else if (n == 3) cp = ((u[0] & 0x0Fu) << 12) | ((u[1] & 0x3Fu) << 6) | (u[2] & 0x3Fu);
  else cp = ((u[0] & 0x07u) << 18) | ((u[1] & 0x3Fu) << 12) | ((u[2] & 0x3Fu) << 6) | (u[3] & 0x3Fu);
  return b;
}

size_t next_cp(std::string_view s, size_t b, uint32_t& cp) {
  const unsigned char* u = reinterpret_cast<const unsigned char*>(s.data() + b);
  if (u[0] < 0x80) { cp = u[0]; return b + 1; }
  if (u[0] < 0xE0) { cp = ((u[0] & 0x1Fu) << 6) | (u[1] & 0x3Fu); return b + 2; }
  if (u[0] < 0xF0) { cp = ((u[0] & 0x0Fu) << 12) | ((u[1] & 0x3Fu) << 6) | (u[2] & 0x3Fu); return b + 3; }
  cp = ((u[0] & 0x07u) << 18) | ((u[1] & 0x3Fu) << 12) | ((u[2] & 0x3Fu) << 6) | (u[3] & 0x3Fu);
  return b + 4;
}

// Python's str.isspace(): Unicode White_Space plus the information separators U+001C..U+001F.
bool py_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

void dump_string(std::string_view s, std::string& out) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// Python's repr(float): shortest round-trip digits, fixed notation for exponents in [-4, 16).
void dump_float(double v, std::string& out) {
  if (std::isnan(v)) { out += "NaN"; return; }
  if (std::isinf(v)) { out += v > 0 ? "Infinity" : "-Infinity"; return; }
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  int exp = std::stoi(sci.substr(e + 1));
  bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant) if (c != '.') digits += c;
  if (neg) out += '-';
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out += "0.";
      out.append(static_cast<size_t>(-exp - 1), '0');
      out += digits;
    } else {
      size_t int_len = static_cast<size_t>(exp) + 1;
      if (digits.size() <= int_len) {
        out += digits;
        out.append(int_len - digits.size(), '0');
        out += ".0";
      } else {
        out += digits.substr(0, int_len);
        out += '.';
        out += digits.substr(int_len);
      }
    }
  } else {
    out += digits[0];
    if (digits.size() > 1) {
      out += '.';
      out += digits.substr(1);
    }
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += eb;
  }
}

}  // namespace

std::string_view py_strip(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e) {
    uint32_t cp;
    size_t nb = next_cp(s, b, cp);
    if (!py_space(cp)) break;
    b = nb;
  }
  while (e > b) {
    uint32_t cp;
    size_t pb = prev_cp(s, e, cp);
    if (!py_space(cp)) break;
    e = pb;
  }
  return s.substr(b, e - b);
}

void dump_json(const json::Value& v, std::string& out) {
  switch (v.type) {
    case json::Type::Null: out += "null"; return;
    case json::Type::Bool: out += v.boolean ? "true" : "false"; return;
    case json::Type::Number:
      if (v.is_integer) out += std::to_string(v.integer);
      else dump_float(v.number, out);
      return;
    case json::Type::String: dump_string(v.string, out); return;
    case json::Type::Array:
      out += '[';
      for (size_t i = 0; i < v.array.size(); ++i) {
        if (i) out += ", ";
        dump_json(v.array[i], out);
      }
      out += ']';
      return;
    case json::Type::Object:
      out += '{';
      for (size_t i = 0; i < v.object.size(); ++i) {
        if (i) out += ", ";
        dump_string(v.object[i].first, out);
        out += ": ";
        dump_json(v.object[i].second, out);
      }
      out += '}';
      return;
  }
}

// ------------------------------------------------------------------------------------ rendering

namespace {

std::string strip_think(std::string_view content) {
  std::string out;
  size_t i = 0;
  for (;;) {
    size_t open = content.find("<think>", i);
    if (open == std::string_view::npos) break;
    size_t close = content.find("</think>", open);
    if (close == std::string_view::npos) break;
    out.append(content.substr(i, open - i));
    i = close + 8;
    while (i < content.size() && (content[i] == '\n' || content[i] == ' ' || content[i] == '\t' || content[i] == '\r')) ++i;
  }
  out.append(content.substr(i));
  return out;
}

class Renderer {
 public:
  Renderer(const Conversation& conv, const RenderOptions& opt, Rendered& out) : conv_(conv), opt_(opt), r_(out) {
    r_.clear();
    const auto& ms = conv.messages;
    for (size_t i = 0; i < ms.size(); ++i) {
      if (ms[i].role == Role::Assistant && ms[i].trainable) last_assistant_ = static_cast<int>(i);
      if (ms[i].role == Role::User) last_user_ = static_cast<int>(i);
    }
  }

  void run() {
    switch (opt_.tmpl) {
      case Template::ChatML: chatml(); break;
      case Template::Llama3: llama3(); break;
      case Template::Llama2: llama2(); break;
      case Template::Mistral: mistral(); break;
      case Template::Alpaca: alpaca(); break;
    }
  }

 private:
  const Conversation& conv_;
  const RenderOptions& opt_;
  Rendered& r_;
  int last_assistant_ = -1, last_user_ = -1;

  uint32_t pos() const { return static_cast<uint32_t>(r_.text.size()); }
  void text(std::string_view s) { r_.text.append(s); }
  void control(std::string_view s) {
    uint32_t b = pos();
    r_.text.append(s);
    r_.control.emplace_back(b, pos());
  }
  void turn_end() { r_.turn_ends.push_back(pos()); }

  bool trains(int i) const {
    if (i < 0) return false;
    const Message& m = conv_.messages[static_cast<size_t>(i)];
    if (!m.trainable) return false;
    switch (opt_.train_on) {
      case TrainOn::Assistant: return m.role == Role::Assistant;
      case TrainOn::All: return true;
      case TrainOn::LastAssistant: return i == last_assistant_;
    }
    return false;
  }
  void train(int i, uint32_t begin) {
    if (trains(i) && pos() > begin) r_.train.push_back(Span{begin, pos(), i});
  }

  [[noreturn]] void unsupported(const Message& m, int i, const std::string& reason, const std::string& fix) const {
    throw RecordError(m.line, m.column, "messages[" + std::to_string(i) + "]", reason, fix);
  }

  // The content the template sees: reasoning stripped from past assistant turns when asked.
  std::string content_of(int i) const {
    const Message& m = conv_.messages[static_cast<size_t>(i)];
    if (opt_.think == Think::StripHistory && m.role == Role::Assistant && i < last_user_) return strip_think(m.content);
    return m.content;
  }

  std::string bos(const char* fallback) const { return opt_.bos.empty() ? std::string(fallback) : opt_.bos; }
  std::string eos(const char* fallback) const { return opt_.eos.empty() ? std::string(fallback) : opt_.eos; }

  // Tool calls as a JSON object per call: {"name": ..., <args_key>: arguments}; string arguments are JSON text.
  static void call_json(const json::Value& call, const char* args_key, std::string& out) {
    const json::Value& fn = *call.find("function");
    out += "{\"name\": ";
    dump_string(fn.find("name")->string, out);
    out += ", \"";
    out += args_key;
    out += "\": ";
    const json::Value* args = fn.find("arguments");
    if (!args) args = fn.find("parameters");
    if (!args || args->is_null()) out += "{}";
    else if (args->is_string()) out += args->string;
    else dump_json(*args, out);
    out += '}';
  }

  std::string tools_block(const char* intro) const {
    std::string s = intro;
    for (const auto& t : conv_.tools->array) {
      s += '\n';
      dump_json(t, s);
    }
    return s;
  }

  // ---- chatml: <|im_start|>role\ncontent<|im_end|>\n ; tools listed in the system turn (Hermes style)
  void chatml() {
    const auto& ms = conv_.messages;
    bool has_system = !ms.empty() && ms[0].role == Role::System;
    std::string tools = conv_.tools ? tools_block("You can call these functions. To call one, reply with "
                                                  "<tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call>. Functions:")
                                    : std::string();
    if (!has_system && (!opt_.default_system.empty() || conv_.tools)) {
      std::string sys = opt_.default_system;
      if (!tools.empty()) sys += (sys.empty() ? "" : "\n\n") + tools;
      control("<|im_start|>");
      text("system\n");
      text(sys);
      control("<|im_end|>");
      text("\n");
      turn_end();
    }
    for (size_t k = 0; k < ms.size(); ++k) {
      int i = static_cast<int>(k);
      const Message& m = ms[k];
      control("<|im_start|>");
      text(m.role_text);
      text("\n");
      uint32_t begin = pos();
      text(content_of(i));
      if (k == 0 && has_system && !tools.empty()) text("\n\n" + tools);
      if (m.tool_calls) {
        bool first = m.content.empty();
        for (const auto& call : m.tool_calls->array) {
          std::string s = first ? "<tool_call>\n" : "\n<tool_call>\n";
          call_json(call, "arguments", s);
          s += "\n</tool_call>";
          text(s);
          first = false;
        }
      }
      control("<|im_end|>");
      train(i, begin);
      text("\n");
      turn_end();
    }
  }

  // ---- llama3: <|begin_of_text|> then <|start_header_id|>role<|end_header_id|>\n\n trim(content) <|eot_id|>
  void llama3() {
    const auto& ms = conv_.messages;
    control(bos("<|begin_of_text|>"));
    bool has_system = !ms.empty() && ms[0].role == Role::System;
    std::string tools = conv_.tools ? tools_block("You can call these functions; to call one, reply with "
                                                  "{\"name\": ..., \"parameters\": {...}}. Functions:")
                                    : std::string();
    auto header = [&](std::string_view role) {
      control("<|start_header_id|>");
      text(role);
      control("<|end_header_id|>");
      text("\n\n");
    };
    if (!has_system && (!opt_.default_system.empty() || conv_.tools)) {
      header("system");
      std::string sys = opt_.default_system;
      if (!tools.empty()) sys += (sys.empty() ? "" : "\n\n") + tools;
      text(py_strip(sys));
      control("<|eot_id|>");
      turn_end();
    }
    for (size_t k = 0; k < ms.size(); ++k) {
      int i = static_cast<int>(k);
      const Message& m = ms[k];
      header(m.role == Role::Tool ? "ipython" : m.role_text);
      uint32_t begin = pos();
      std::string body(py_strip(content_of(i)));
      if (k == 0 && has_system && !tools.empty()) body = std::string(py_strip(body + "\n\n" + tools));
      if (m.tool_calls) {
        for (const auto& call : m.tool_calls->array) {
          if (!body.empty()) body += '\n';
          call_json(call, "parameters", body);
        }
      }
      text(body);
      control("<|eot_id|>");
      train(i, begin);
      turn_end();
    }
  }

  void no_tools(const char* name) const {
    const auto& ms = conv_.messages;
    for (size_t k = 0; k < ms.size(); ++k)
      if (ms[k].role == Role::Tool || ms[k].tool_calls)
        unsupported(ms[k], static_cast<int>(k), std::string("the ") + name + " template has no tool turns",
                    "use template=\"chatml\", \"llama3\", \"mistral\" or \"tokenizer\" for tool-calling data");
  }

  // Roles after an optional system turn must go user, assistant, user, ... (what the reference templates raise on).
  void check_alternating(size_t first, bool skip_tools) const {
    const auto& ms = conv_.messages;
    size_t n = 0;
    for (size_t k = first; k < ms.size(); ++k) {
      const Message& m = ms[k];
      if (skip_tools && (m.role == Role::Tool || m.tool_calls)) continue;
      bool want_user = n % 2 == 0;
      if ((m.role == Role::User) != want_user || (m.role != Role::User && m.role != Role::Assistant))
        unsupported(m, static_cast<int>(k),
                    std::string("this template needs turns to alternate user/assistant after an optional system turn; turn ") +
                        std::to_string(k) + " is " + m.role_text,
                    "merge consecutive turns of the same role, or use template=\"chatml\"");
      ++n;
    }
  }

  // ---- llama2: <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s>
  void llama2() {
    const auto& ms = conv_.messages;
    no_tools("llama2");
    bool has_system = ms[0].role == Role::System;
    size_t first = has_system ? 1 : 0;
    std::string system = has_system ? content_of(0) : opt_.default_system;
    bool use_system = has_system || !opt_.default_system.empty();
    check_alternating(first, false);
    for (size_t k = first; k < ms.size(); ++k) {
      int i = static_cast<int>(k);
      std::string content = content_of(i);
      if (k == first && use_system) content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content;
      if (ms[k].role == Role::User) {
        uint32_t begin = pos();
        control(bos("<s>"));
        text("[INST] ");
        text(py_strip(content));
        text(" [/INST]");
        train(i, begin);
      } else {
        uint32_t begin = pos();  // the space before the answer is glued to its first word by SentencePiece
        text(" ");
        text(py_strip(content));
        text(" ");
        control(eos("</s>"));
        train(i, begin);
      }
      turn_end();
    }
  }

  // ---- mistral (v0.3 template): system joins the last user turn; [AVAILABLE_TOOLS] before the last user turn
  void mistral() {
    const auto& ms = conv_.messages;
    bool has_system = ms[0].role == Role::System;
    size_t first = has_system ? 1 : 0;
    check_alternating(first, true);
    int last_user = -1;
    for (size_t k = first; k < ms.size(); ++k)
      if (ms[k].role == Role::User) last_user = static_cast<int>(k);
    control(bos("<s>"));
    const std::string eos_copy = eos("</s>");
    for (size_t k = first; k < ms.size(); ++k) {
      int i = static_cast<int>(k);
      const Message& m = ms[k];
      uint32_t begin = pos();
      if (m.role == Role::User) {
        // The reference compares message dicts: an earlier identical user turn also gets the tool list.
        bool same_as_last = last_user >= 0 && m.content == ms[static_cast<size_t>(last_user)].content;
        if (conv_.tools && same_as_last) mistral_tools();
        control("[INST]");
        text(" ");
        if (k + 1 == ms.size() && has_system) {
          text(content_of(0));
          text("\n\n");
        }
        text(content_of(i));
        control("[/INST]");
      } else if (m.tool_calls) {
        control("[TOOL_CALLS]");
        std::string s = " [";
        for (size_t c = 0; c < m.tool_calls->array.size(); ++c) {
          const json::Value& call = m.tool_calls->array[c];
          std::string fn;
          dump_json(*call.find("function"), fn);
          fn.pop_back();
          s += fn;
          const json::Value* id = call.find("id");
          if (!id || !id->is_string() || id->string.size() != 9)
            unsupported(m, i, "the mistral template needs tool call ids of exactly 9 characters",
                        "shorten the ids (e.g. the last 9 characters), or use template=\"chatml\"");
          s += ", \"id\": \"" + id->string + "\"}";
          s += c + 1 < m.tool_calls->array.size() ? ", " : "]";
        }
        text(s);
        control(eos_copy);
      } else if (m.role == Role::Assistant) {
        text(" ");
        text(py_strip(content_of(i)));
        control(eos_copy);
      } else if (m.role == Role::Tool) {
        control("[TOOL_RESULTS]");
        text(" {\"content\": " + content_of(i) + ", ");
        if (m.tool_call_id.size() != 9)
          unsupported(m, i, "the mistral template needs a 9-character tool_call_id on tool turns",
                      "shorten the ids, or use template=\"chatml\"");
        text("\"call_id\": \"" + m.tool_call_id + "\"}");
        control("[/TOOL_RESULTS]");
      } else {
        unsupported(m, i, "the mistral template supports a system turn only first", "move the system turn to the start");
      }
      train(i, begin);
      turn_end();
    }
  }

  void mistral_tools() {
    control("[AVAILABLE_TOOLS]");
    std::string s = " [";
    const auto& tools = conv_.tools->array;
    for (size_t t = 0; t < tools.size(); ++t) {
      const json::Value& fn = *tools[t].find("function");
      s += "{\"type\": \"function\", \"function\": {";
      bool first = true;
      for (const auto& kv : fn.object) {
        if (kv.first == "return") continue;
        if (!first) s += ", ";
        first = false;
        if (kv.second.is_string()) s += "\"" + kv.first + "\": \"" + kv.second.string + "\"";
        else {
          s += "\"" + kv.first + "\": ";
          dump_json(kv.second, s);
        }
      }
      s += "}}";
      s += t + 1 < tools.size() ? ", " : "]";
    }
    text(s);
    control("[/AVAILABLE_TOOLS]");
  }

  // ---- alpaca: preamble, then "### Instruction:\n...\n\n### Response:\n...<eos>\n\n" per exchange
  void alpaca() {
    const auto& ms = conv_.messages;
    no_tools("alpaca");
    bool has_system = ms[0].role == Role::System;
    std::string preamble = has_system ? content_of(0)
                           : !opt_.default_system.empty()
                               ? opt_.default_system
                               : "Below is an instruction that describes a task. Write a response that appropriately "
                                 "completes the request.";
    text(preamble);
    text("\n\n");
    turn_end();
    for (size_t k = has_system ? 1 : 0; k < ms.size(); ++k) {
      int i = static_cast<int>(k);
      if (ms[k].role == Role::System)
        unsupported(ms[k], i, "the alpaca template supports a system turn only first", "move the system turn to the start");
      if (ms[k].role == Role::User) {
        text("### Instruction:\n");
        uint32_t begin = pos();
        text(content_of(i));
        train(i, begin);
        text("\n\n");
      } else {
        text("### Response:\n");
        uint32_t begin = pos();
        text(content_of(i));
        control(eos("</s>"));
        train(i, begin);
        text("\n\n");
      }
      turn_end();
    }
  }
};

}  // namespace

void render(const Conversation& conv, const RenderOptions& options, Rendered& out) {
  Renderer(conv, options, out).run();
}

}  // namespace fastchat::chat
