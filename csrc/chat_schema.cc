// Schema detection and validation of one chat record: OpenAI {"messages": [...], "tools": [...]} (content a
// string or a list of text parts; tool_calls; per-message weight) and ShareGPT {"conversations": [{from,
// value}]}. Every error names the field, where it is, and how to fix it.
#include "chat.h"

#include <cmath>

namespace fastchat::chat {

RecordError::RecordError(uint32_t line_, uint32_t column_, std::string field_, std::string reason_, std::string fix_)
    : std::runtime_error(reason_), line(line_), column(column_), field(std::move(field_)), reason(std::move(reason_)),
      fix(std::move(fix_)) {}

const char* role_name(Role r) {
  switch (r) {
    case Role::System: return "system";
    case Role::User: return "user";
    case Role::Assistant: return "assistant";
    case Role::Tool: return "tool";
  }
  return "?";
}

namespace {

[[noreturn]] void bad(const json::Value& at, const std::string& field, const std::string& reason, const std::string& fix) {
  throw RecordError(at.line, at.column, field, reason, fix);
}

bool parse_role(std::string_view r, bool sharegpt, Role& out) {
  if (r == "system") { out = Role::System; return true; }
  if (r == "user") { out = Role::User; return true; }
  if (r == "assistant") { out = Role::Assistant; return true; }
  if (r == "tool") { out = Role::Tool; return true; }
  if (sharegpt) {
    if (r == "human") { out = Role::User; return true; }
    if (r == "gpt" || r == "model" || r == "chatgpt" || r == "bing" || r == "bard") { out = Role::Assistant; return true; }
    if (r == "observation" || r == "function" || r == "ipython") { out = Role::Tool; return true; }
  }
  return false;
}

// Content: a string, null (assistant with tool_calls), or a list of text parts {"type": "text", "text"|"value": s}.
void read_content(const json::Value& v, const std::string& field, Message& m) {
  if (v.is_string()) {
    m.content = v.string;
    return;
  }
  if (v.is_null()) {
    m.content_null = true;
    return;
  }
  if (v.is_array()) {
    for (size_t i = 0; i < v.array.size(); ++i) {
      const json::Value& part = v.array[i];
      std::string pf = field + "[" + std::to_string(i) + "]";
      if (part.is_string()) {
        m.content += part.string;
        continue;
      }
      if (!part.is_object()) bad(part, pf, std::string("a content part must be an object, got ") + json::type_name(part.type),
                                 "write {\"type\": \"text\", \"text\": \"...\"}");
      const json::Value* type = part.find("type");
      if (type && (!type->is_string() || type->string != "text"))
        bad(*type, pf + ".type", "only text content parts are supported (got " +
                (type->is_string() ? "\"" + type->string + "\"" : std::string(json::type_name(type->type))) + ")",
            "remove image/audio parts or convert them to text");
      const json::Value* text = part.find("text");
      if (!text) text = part.find("value");
      if (!text || !text->is_string())
        bad(part, pf, "a text part needs a string \"text\" (or \"value\")", "write {\"type\": \"text\", \"text\": \"...\"}");
      m.content += text->string;
    }
    return;
  }
  bad(v, field, std::string("content must be a string, null or a list of text parts, got ") + json::type_name(v.type),
      "quote the content as a JSON string");
}

void read_weight(const json::Value& record_msg, const std::string& field, Message& m) {
  for (const char* key : {"weight", "loss_weight"}) {
    const json::Value* w = record_msg.find(key);
    if (!w || w->is_null()) continue;
    if (w->type == json::Type::Bool) {
      m.trainable = w->boolean;
      continue;
    }
    if (w->type != json::Type::Number || !(w->number >= 0) || std::isinf(w->number))
      bad(*w, field + "." + key, "weight must be a number >= 0 (0 excludes the turn from the loss)", "use 0 or 1");
    m.trainable = w->number > 0;
  }
}

void read_tool_calls(const json::Value& v, const std::string& field, Message& m) {
  if (v.is_null()) return;
  if (!v.is_array()) bad(v, field, std::string("tool_calls must be a list, got ") + json::type_name(v.type),
                         "write \"tool_calls\": [{\"id\": ..., \"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": ...}}]");
  for (size_t i = 0; i < v.array.size(); ++i) {
    const json::Value& call = v.array[i];
    std::string cf = field + "[" + std::to_string(i) + "]";
    const json::Value* fn = call.find("function");
    if (!call.is_object() || !fn || !fn->is_object())
      bad(call, cf, "a tool call needs a \"function\" object", "write {\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": ...}}");
    const json::Value* name = fn->find("name");
    if (!name || !name->is_string()) bad(*fn, cf + ".function.name", "a tool call needs a string function name", "add \"name\": \"...\"");
  }
  if (!v.array.empty()) m.tool_calls = &v;
}

}  // namespace

void read_record(json::Value&& record, Conversation& out) {
  out.record = std::move(record);
  out.messages.clear();
  out.tools = nullptr;
  const json::Value& r = out.record;
  out.line = r.line;
  if (!r.is_object())
    bad(r, "", std::string("a record must be a JSON object, got ") + json::type_name(r.type),
        "write one {\"messages\": [...]} object per line");
  const json::Value* msgs = r.find("messages");
  bool sharegpt = false;
  std::string list_name = "messages";
  if (!msgs) {
    msgs = r.find("conversations");
    sharegpt = msgs != nullptr;
    list_name = "conversations";
  }
  if (!msgs)
    bad(r, "messages", "the record has no \"messages\" (OpenAI) or \"conversations\" (ShareGPT) list",
        "wrap the turns as {\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, ...]}");
  if (!msgs->is_array())
    bad(*msgs, list_name, std::string("\"") + list_name + "\" must be a list, got " + json::type_name(msgs->type),
        "write a JSON list of turns");
  if (msgs->array.empty()) bad(*msgs, list_name, "the conversation has no turns", "remove the record or add turns");

  const char* role_key = sharegpt ? "from" : "role";
  const char* content_key = sharegpt ? "value" : "content";
  out.messages.reserve(msgs->array.size());
  for (size_t i = 0; i < msgs->array.size(); ++i) {
    const json::Value& mv = msgs->array[i];
    std::string field = list_name + "[" + std::to_string(i) + "]";
    if (!mv.is_object())
      bad(mv, field, std::string("a turn must be an object, got ") + json::type_name(mv.type),
          sharegpt ? "write {\"from\": \"human\", \"value\": \"...\"}" : "write {\"role\": \"user\", \"content\": \"...\"}");
    Message m;
    m.line = mv.line;
    m.column = mv.column;
    const json::Value* role = mv.find(role_key);
    if (!role && sharegpt) role = mv.find("role");
    if (!role) bad(mv, field + "." + role_key, std::string("the turn has no \"") + role_key + "\"",
                   sharegpt ? "add \"from\": \"human\" or \"gpt\"" : "add \"role\": \"user\" or \"assistant\"");
    if (!role->is_string())
      bad(*role, field + "." + role_key, std::string("the role must be a string, got ") + json::type_name(role->type),
          "use \"system\", \"user\", \"assistant\" or \"tool\"");
    if (!parse_role(role->string, sharegpt, m.role))
      bad(*role, field + "." + role_key, "unknown role \"" + role->string + "\"",
          sharegpt ? "use one of human, gpt, system, tool (or user/assistant)" : "use one of system, user, assistant, tool");
    m.role_text = role_name(m.role);
    const json::Value* content = mv.find(content_key);
    if (!content && sharegpt) content = mv.find("content");
    if (content) {
      read_content(*content, field + "." + content_key, m);
    } else {
      m.content_null = true;
    }
    if (const json::Value* tc = mv.find("tool_calls")) {
      if (m.role != Role::Assistant && !tc->is_null())
        bad(*tc, field + ".tool_calls", "only assistant turns may carry tool_calls", "move the calls to an assistant turn");
      read_tool_calls(*tc, field + ".tool_calls", m);
    }
    if (m.content_null && !m.tool_calls)
      bad(mv, field + "." + content_key, std::string("the turn has no ") + content_key,
          m.role == Role::Assistant ? "add content or tool_calls" : "add \"content\": \"...\"");
    if (const json::Value* id = mv.find("tool_call_id"); id && id->is_string()) m.tool_call_id = id->string;
    if (const json::Value* name = mv.find("name"); name && name->is_string()) m.name = name->string;
    read_weight(mv, field, m);
    out.messages.push_back(std::move(m));
  }
  // ShareGPT as LLaMA-Factory and others write it keeps the system prompt beside the turns: {"system": "...",
  // "conversations": [...]}. It becomes the first turn (ignoring it trained those records without their prompt
  // and made them duplicates of the same turns without one); "" or null means none, as there.
  if (const json::Value* sys = r.find("system"); sharegpt && sys && !sys->is_null()) {
    if (!sys->is_string())
      bad(*sys, "system", std::string("the system prompt must be a string, got ") + json::type_name(sys->type),
          "write \"system\": \"...\" beside \"conversations\"");
    if (!sys->string.empty()) {
      if (out.messages.front().role == Role::System)
        bad(*sys, "system", "the record has a \"system\" prompt and a system turn too",
            "keep one of them: drop \"system\" or the conversation's first turn");
      Message m;
      m.role = Role::System;
      m.role_text = role_name(Role::System);
      m.content = sys->string;
      m.line = sys->line;
      m.column = sys->column;
      out.messages.insert(out.messages.begin(), std::move(m));
    }
  }
  if (const json::Value* tools = r.find("tools"); tools && !tools->is_null()) {
    if (!tools->is_array()) bad(*tools, "tools", std::string("tools must be a list, got ") + json::type_name(tools->type),
                                "write \"tools\": [{\"type\": \"function\", \"function\": {...}}]");
    for (size_t i = 0; i < tools->array.size(); ++i) {
      const json::Value& t = tools->array[i];
      const json::Value* fn = t.find("function");
      if (!t.is_object() || !fn || !fn->is_object())
        bad(t, "tools[" + std::to_string(i) + "]", "a tool needs a \"function\" object",
            "write {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}");
    }
    if (!tools->array.empty()) out.tools = tools;
  }
}

}  // namespace fastchat::chat
