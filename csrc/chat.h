// Chat records -> rendered template text with byte spans: which ranges are template control tokens, which
// are trainable (assistant content + end-of-turn), where each turn ends. Schema detection (OpenAI messages,
// ShareGPT conversations) lives here too. Knows nothing of tokenizers beyond the control-token strings.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "json.h"

namespace fastchat::chat {

// A record that parses as JSON but is not a usable conversation. `field` is a path like messages[2].role.
struct RecordError : std::runtime_error {
  uint32_t line, column;
  std::string field, reason, fix;
  RecordError(uint32_t line_, uint32_t column_, std::string field_, std::string reason_, std::string fix_);
};

enum class Role : uint8_t { System, User, Assistant, Tool };
const char* role_name(Role r);

struct Message {
  Role role = Role::User;
  std::string role_text;       // the role as the template prints it ("user", "assistant", ...)
  std::string content;         // text parts joined; empty when null
  bool content_null = false;
  const json::Value* tool_calls = nullptr;  // non-empty array or nullptr
  std::string tool_call_id, name;
  bool trainable = true;       // "weight"/"loss_weight" > 0 (absent: true)
  uint32_t line = 0, column = 0;
};

struct Conversation {
  json::Value record;          // owns the DOM the pointers below point into
  std::vector<Message> messages;
  const json::Value* tools = nullptr;  // non-empty array or nullptr
  uint32_t line = 0;
};

// Detects the schema and validates the record; throws RecordError naming the field and a fix.
void read_record(json::Value&& record, Conversation& out);

enum class Template : uint8_t { ChatML, Llama3, Llama2, Mistral, Alpaca };
enum class TrainOn : uint8_t { Assistant, All, LastAssistant };
enum class Think : uint8_t { Keep, StripHistory };

struct RenderOptions {
  Template tmpl = Template::ChatML;
  TrainOn train_on = TrainOn::Assistant;
  Think think = Think::Keep;
  std::string default_system;  // used when the conversation has no system message ("" = none)
  std::string bos, eos;        // "" = the template's usual strings
};

struct Span {
  uint32_t begin, end;
  int32_t message;  // index into Conversation::messages
};

struct Rendered {
  std::string text;
  std::vector<std::pair<uint32_t, uint32_t>> control;  // template control-token candidates, sorted
  std::vector<Span> train;                             // trainable byte ranges, sorted
  std::vector<uint32_t> turn_ends;                     // byte offset after each rendered turn
  std::vector<std::string> expected;                   // per train span: the text it must decode to
  void clear();
};

// Renders `conv`; throws RecordError when the template cannot express it (e.g. Llama-2 needs alternating
// user/assistant turns).
void render(const Conversation& conv, const RenderOptions& options, Rendered& out);

// Python's str.strip() (Jinja's `trim`): strips Unicode whitespace at both ends of UTF-8 text.
std::string_view py_strip(std::string_view s);

// json.dumps(value, ensure_ascii=False) as Python writes it (", " and ": " separators, document order).
void dump_json(const json::Value& v, std::string& out);

}  // namespace fastchat::chat
