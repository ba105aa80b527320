// The checks behind validate.h. Worker threads take contiguous slices of a batch (checks are independent per
// record); the duplicate index is then updated in file order on one thread so results do not depend on the
// thread count.
#include "validate.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <thread>

#include "loader.h"

namespace fastchat::tools {

size_t first_invalid_utf8(std::string_view s) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size(), i = 0;
  while (i < n) {
    // ASCII fast path, eight bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    unsigned char c = p[i];
    if (c < 0x80) { ++i; continue; }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
    else return i;
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
      return i;
    i += len;
  }
  return std::string::npos;
}

namespace {

struct Checker {
  const Options& opt;
  RecordInfo& info;
  // Special strings grouped by first byte so content is scanned once, not once per string.
  const std::vector<std::vector<const std::string*>>& specials_by_byte;

  void add(Severity sev, uint32_t line, uint32_t column, std::string code, std::string field, std::string message) {
    Issue is;
    is.line = line ? line : info.line;
    is.column = column;
    is.severity = sev;
    is.code = std::move(code);
    is.field = std::move(field);
    is.message = std::move(message);
    if (sev == kError) info.has_error = true;
    info.issues.push_back(std::move(is));
  }

  static std::string field_of(size_t i, const char* what) {
    return "messages[" + std::to_string(i) + "]" + (what[0] ? std::string(".") + what : std::string());
  }

  void content(const chat::Message& m, size_t i) {
    const std::string& c = m.content;
    bool blank = chat::py_strip(c).empty();
    if (blank && !m.tool_calls) {
      bool core = m.role == chat::Role::User || m.role == chat::Role::Assistant;
      add(core ? kError : kWarning, m.line, m.column, "content.empty", field_of(i, "content"),
          std::string("the ") + chat::role_name(m.role) + " turn is " + (c.empty() ? "empty" : "only whitespace") +
              (m.role == chat::Role::Assistant ? ": the model would learn to answer with nothing"
               : m.role == chat::Role::User  ? ": the answer that follows has no prompt"
                                             : ""));
    }
    // Control characters (C0 other than tab/newline/carriage return, DEL, C1) and U+FFFD (a sign of a bad decode).
    const unsigned char* p = reinterpret_cast<const unsigned char*>(c.data());
    size_t n = c.size();
    bool control = false, replacement = false;
    for (size_t k = 0; k < n && !(control && replacement); ++k) {
      unsigned char b = p[k];
      if ((b < 0x20 && b != '\t' && b != '\n' && b != '\r') || b == 0x7F) control = true;
      else if (b == 0xC2 && k + 1 < n && p[k + 1] >= 0x80 && p[k + 1] <= 0x9F) control = true;
      else if (b == 0xEF && k + 2 < n && p[k + 1] == 0xBF && p[k + 2] == 0xBD) replacement = true;
    }
    if (control)
      add(kWarning, m.line, m.column, "content.control_chars", field_of(i, "content"),
          "the content holds control characters (other than tab and newline); they are usually extraction debris");
    if (replacement)
      add(kWarning, m.line, m.column, "content.replacement_char", field_of(i, "content"),
          "the content holds U+FFFD replacement characters: the text was decoded with the wrong encoding somewhere");
    // Special-token strings: HF's apply_chat_template would turn them into real control tokens.
    for (size_t k = 0; k < n; ++k) {
      const auto& cands = specials_by_byte[p[k]];
      if (cands.empty()) continue;
      for (const std::string* s : cands) {
        if (c.compare(k, s->size(), *s) == 0) {
          add(kWarning, m.line, m.column, "content.special_token", field_of(i, "content"),
              "the content contains the special-token text \"" + *s +
                  "\"; fastchat-ft encodes it as plain text, but HF apply_chat_template would turn it into a "
                  "control token and forge a turn boundary");
          k = n;
          break;
        }
      }
    }
    // Degenerate repetition: few distinct word trigrams among many words.
    if (n >= 256) {
      std::string norm;
      dedup::normalize(c, norm);
      std::vector<uint64_t> grams;
      dedup::for_each_shingle(norm, 3, [&](uint64_t h) { grams.push_back(h); });
      if (grams.size() >= 64) {
        std::sort(grams.begin(), grams.end());
        size_t distinct = static_cast<size_t>(std::unique(grams.begin(), grams.end()) - grams.begin());
        double ratio = static_cast<double>(distinct) / static_cast<double>(grams.size());
        if (ratio < 0.2)  // an assistant answer like this trains looping: drop it; elsewhere it is only noise
          add(m.role == chat::Role::Assistant ? kError : kWarning, m.line, m.column, "content.repetitive", field_of(i, "content"),
              "the content repeats itself (" + std::to_string(distinct) + " distinct word trigrams out of " +
                  std::to_string(grams.size()) + "); training on it teaches the model to loop");
      }
    }
  }

  void order(const chat::Conversation& conv) {
    const auto& ms = conv.messages;
    size_t first = 0;
    if (!ms.empty() && ms[0].role == chat::Role::System) first = 1;
    for (size_t i = 1; i < ms.size(); ++i)
      if (ms[i].role == chat::Role::System)
        add(kError, ms[i].line, ms[i].column, "order.system_position", field_of(i, "role"),
            "a system turn may only come first (turn " + std::to_string(i) + " is system)");
    if (first < ms.size() && ms[first].role != chat::Role::User && ms[first].role != chat::Role::System)
      add(kError, ms[first].line, ms[first].column, "order.first_turn", field_of(first, "role"),
          std::string("the conversation starts with ") + (ms[first].role == chat::Role::Assistant ? "an " : "a ") + chat::role_name(ms[first].role) +
              " turn instead of a user turn: the model would learn to speak unprompted");
    if (first >= ms.size())
      add(kError, ms[0].line, ms[0].column, "order.no_turns", "messages", "the conversation has only a system turn");
    // Alternation, ignoring tool turns: user then user, or assistant then assistant (unless the first one
    // called a tool, whose answer comes back before the next assistant turn).
    int prev = -1;
    bool prev_called = false;
    for (size_t i = first; i < ms.size(); ++i) {
      const chat::Message& m = ms[i];
      if (m.role == chat::Role::Tool || m.role == chat::Role::System) continue;
      int r = m.role == chat::Role::User ? 1 : 2;
      if (r == prev && !(r == 2 && prev_called))
        add(kWarning, m.line, m.column, "order.alternation", field_of(i, "role"),
            std::string("two ") + chat::role_name(m.role) + " turns in a row (turns must alternate user/assistant; "
            "llama2/mistral templates reject this, others merge the meaning)");
      prev = r;
      prev_called = m.tool_calls != nullptr;
    }
    if (!ms.empty()) {
      const chat::Message& last = ms.back();
      if (last.role != chat::Role::Assistant && first < ms.size())
        add(kWarning, last.line, last.column, "order.last_turn", field_of(ms.size() - 1, "role"),
            std::string("the conversation ends with a ") + chat::role_name(last.role) +
                " turn: nothing after the last assistant turn is trained");
      if (last.role == chat::Role::Assistant && last.tool_calls)
        add(kWarning, last.line, last.column, "order.last_turn", field_of(ms.size() - 1, "tool_calls"),
            "the conversation ends with a tool call that is never answered");
    }
    tools(conv);
  }

  void tools(const chat::Conversation& conv) {
    const auto& ms = conv.messages;
    std::vector<std::string> pending;  // ids of the open tool calls
    size_t open_calls = 0, answered = 0;
    int caller = -1;
    auto close = [&](size_t at) {
      if (caller >= 0 && answered < open_calls && at < ms.size())
        add(kWarning, ms[caller].line, ms[caller].column, "order.tool_unanswered", field_of(caller, "tool_calls"),
            std::to_string(open_calls - answered) + " of " + std::to_string(open_calls) +
                " tool call(s) get no tool message before the conversation goes on");
      caller = -1;
      pending.clear();
      open_calls = answered = 0;
    };
    for (size_t i = 0; i < ms.size(); ++i) {
      const chat::Message& m = ms[i];
      if (m.role == chat::Role::Tool) {
        if (caller < 0) {
          add(kError, m.line, m.column, "order.tool_orphan", field_of(i, "role"),
              "a tool message must answer a tool call of the assistant turn before it; none is open here");
          continue;
        }
        ++answered;
        if (!m.tool_call_id.empty() && !pending.empty()) {
          auto it = std::find(pending.begin(), pending.end(), m.tool_call_id);
          if (it == pending.end())
            add(kError, m.line, m.column, "order.tool_call_id", field_of(i, "tool_call_id"),
                "tool_call_id \"" + m.tool_call_id + "\" matches no open call of the preceding assistant turn");
          else
            pending.erase(it);
        }
        continue;
      }
      close(i);
      if (m.tool_calls) {
        caller = static_cast<int>(i);
        open_calls = m.tool_calls->array.size();
        for (const auto& call : m.tool_calls->array)
          if (const json::Value* id = call.find("id"); id && id->is_string()) pending.push_back(id->string);
      }
    }
  }
};

void hash_conversation(const chat::Conversation& conv, std::string& buf, RecordInfo& info) {
  buf.clear();
  for (const auto& m : conv.messages) {
    buf += static_cast<char>('0' + static_cast<int>(m.role));
    buf += m.content;
    buf += '\x1f';
    if (m.tool_calls) chat::dump_json(*m.tool_calls, buf);
    buf += '\x1f';
    buf += m.tool_call_id;
    buf += '\x1f';
    buf += m.name;
    buf += m.trainable ? '\x1e' : '\x1d';
  }
  if (conv.tools) chat::dump_json(*conv.tools, buf);
  info.exact_hash = dedup::hash_bytes(buf, 0x4558414354ull);
}

struct Worker {
  const Options& opt;
  const std::vector<std::vector<const std::string*>>& specials;
  chat::Conversation conv;
  chat::Rendered rendered;
  loader::EncodeScratch scratch;
  std::vector<int32_t> ids, labels;
  std::vector<uint32_t> turn_ends;
  std::string buf, norm;
  dedup::DistinctCounter bigrams;

  Worker(const Options& o, const std::vector<std::vector<const std::string*>>& sp) : opt(o), specials(sp) {}

  void run(jsonl::RawRecord& rec, RecordInfo& info) {
    info = RecordInfo();
    info.line = rec.line;
    Checker check{opt, info, specials};
    json::Value value;
    if (rec.parsed) {
      value = std::move(rec.value);
    } else {
      size_t bad = first_invalid_utf8(rec.text);
      if (bad != std::string::npos) {
        check.add(kError, rec.line, static_cast<uint32_t>(bad + 1), "encoding.utf8", "",
                  "the line is not valid UTF-8 (byte " + std::to_string(bad + 1) +
                      "); re-encode the file as UTF-8");
        info.exact_hash = dedup::hash_bytes(rec.text, 0x524157ull);
        return;
      }
      try {
        value = json::parse(rec.text, rec.line);
      } catch (const json::ParseError& e) {
        check.add(kError, e.line, e.column, "json.syntax", "", "invalid JSON: " + e.reason);
        info.exact_hash = dedup::hash_bytes(rec.text, 0x524157ull);
        return;
      }
    }
    try {
      chat::read_record(std::move(value), conv);
    } catch (const chat::RecordError& e) {
      bool role = e.reason.rfind("unknown role", 0) == 0;
      check.add(kError, e.line, e.column, role ? "schema.role" : "schema", e.field, e.reason + " (fix: " + e.fix + ")");
      info.exact_hash = dedup::hash_bytes(rec.text, 0x524157ull);
      return;
    }
    info.messages = static_cast<uint32_t>(conv.messages.size());
    for (size_t i = 0; i < conv.messages.size(); ++i) {
      const chat::Message& m = conv.messages[i];
      ++info.roles[static_cast<int>(m.role)];
      info.content_bytes += static_cast<uint32_t>(m.content.size());
      check.content(m, i);
    }
    check.order(conv);
    hash_conversation(conv, buf, info);
    // Near-duplicate text and bigrams: user/assistant/tool content only (a shared system prompt is not content).
    buf.clear();
    for (const auto& m : conv.messages) {
      if (m.role == chat::Role::System) continue;
      buf += m.content;
      buf += ' ';
    }
    dedup::normalize(buf, norm);
    if (opt.near_duplicates) dedup::minhash(norm, opt.shingle_words, info.signature);
    try {
      chat::render(conv, opt.render, rendered);
    } catch (const chat::RecordError& e) {
      check.add(kError, e.line, e.column, "template", e.field, e.reason + " (fix: " + e.fix + ")");
      return;
    }
    info.usable = true;
    tokens(check, info);
    if (opt.count_bigrams && !info.has_error)  // diversity of what trains
      dedup::for_each_shingle(norm, 2, [&](uint64_t h) {
        bigrams.add(h);
        ++info.bigrams;
      });
  }

  void tokens(Checker& check, RecordInfo& info) {
    if (!opt.tokenizer) {
      if (rendered.train.empty())
        check.add(kError, info.line, 0, "labels.no_trainable", "",
                  "no trainable text under this template (no assistant turn with weight > 0): the record adds nothing");
      return;
    }
    uint8_t flags = loader::encode_and_label(*opt.tokenizer, rendered, opt.allow_special_in_content, scratch, ids,
                                             labels, turn_ends);
    size_t n = ids.size();
    info.tokens = static_cast<uint32_t>(n);
    size_t cut = n;
    if (opt.max_seq_len && n > opt.max_seq_len)
      cut = loader::truncation_cut(labels.data(), n, turn_ends.data(), turn_ends.size(), opt.max_seq_len);
    info.truncated_tokens = static_cast<uint32_t>(cut);
    for (size_t i = 0; i < n; ++i) {
      if (labels[i] == -100) continue;
      ++info.trainable;
      if (i < cut) ++info.trainable_kept;
    }
    if (flags & loader::kNoTrainable) {
      check.add(kError, info.line, 0, "labels.no_trainable", "",
                "no trainable token under this template and tokenizer: the record adds nothing to training");
      return;
    }
    if (flags & loader::kInexact)
      check.add(kWarning, info.line, 0, "labels.inexact", "",
                "a token straddles the edge of a trained span (the label boundary is approximate)");
    if (opt.max_seq_len && n > opt.max_seq_len) {
      if (cut == 0)
        check.add(kError, info.line, 0, "length.truncated_no_trainable", "",
                  std::to_string(n) + " tokens > max_seq_len " + std::to_string(opt.max_seq_len) +
                      " and no whole turn that trains fits in it: training drops it under either overlong policy");
      else
        check.add(kWarning, info.line, 0, "length.over_max", "",
                  std::to_string(n) + " tokens > max_seq_len " + std::to_string(opt.max_seq_len) +
                      ": training drops it (overlong=drop, the default), or truncate keeps the first " +
                      std::to_string(cut) + " tokens (whole turns) and " + std::to_string(info.trainable_kept) +
                      " of its " + std::to_string(info.trainable) + " trainable tokens");
    }
  }
};

}  // namespace

Scanner::Scanner(const std::string& path, Options options, size_t batch_records, size_t batch_bytes)
    : reader_(path), options_(std::move(options)), batch_records_(batch_records), batch_bytes_(batch_bytes),
      index_(options_.near_threshold, options_.near_duplicates) {}

std::vector<uint32_t> Scanner::groups() {
  std::vector<uint32_t> out(index_.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = index_.group(static_cast<uint32_t>(i));
  return out;
}

bool Scanner::next(std::vector<RecordInfo>& out) {
  raw_.clear();
  if (!reader_.next(raw_, batch_records_, batch_bytes_)) return false;
  size_t n = raw_.size();
  out.resize(n);
  std::vector<std::vector<const std::string*>> specials(256);
  for (const auto& s : options_.special_strings)
    if (!s.empty()) specials[static_cast<unsigned char>(s[0])].push_back(&s);
  int threads = options_.threads > 0 ? options_.threads : static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(1, std::min<int>(threads, static_cast<int>(n / 16 + 1)));
  std::vector<Worker> workers;
  workers.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) workers.emplace_back(options_, specials);
  auto work = [&](Worker& w, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      try {
        w.run(raw_[i], out[i]);
      } catch (const std::exception& ex) {  // never let a worker take the process down
        Checker c{options_, out[i], specials};
        c.add(kError, raw_[i].line, 0, "internal", "", std::string("could not check the record: ") + ex.what());
      }
    }
  };
  size_t per = (n + static_cast<size_t>(threads) - 1) / static_cast<size_t>(threads);
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    size_t b = std::min(n, per * t), e = std::min(n, per * (t + 1));
    if (b < e) pool.emplace_back(work, std::ref(workers[static_cast<size_t>(t)]), b, e);
  }
  work(workers[0], 0, std::min(n, per));
  for (auto& th : pool) th.join();
  for (auto& w : workers) bigrams_.merge(w.bigrams);
  // Duplicates, in file order.
  for (size_t i = 0; i < n; ++i) {
    RecordInfo& info = out[i];
    ++ordinal_;
    lines_.push_back(info.line);
    if (!options_.duplicates) {
      total_bigrams_ += info.bigrams;
      continue;
    }
    bool parsed = info.messages > 0;
    dedup::DupIndex::Match m = index_.add(info.exact_hash, info.signature, parsed && options_.near_duplicates);
    if (!parsed) continue;  // broken records are reported once, for being broken
    // Distinct-2 is measured over unique conversations: a copy adds no new bigrams and no new text.
    if (m.exact_of < 0 && m.near_of < 0) total_bigrams_ += info.bigrams;
    if (m.exact_of >= 0) {
      info.duplicate_of = lines_[static_cast<size_t>(m.exact_of)];
      Issue is{info.line, 0, kWarning, "duplicate.exact", "",
               "exact duplicate of line " + std::to_string(info.duplicate_of)};
      info.issues.push_back(std::move(is));
    } else if (m.near_of >= 0) {
      info.near_duplicate_of = lines_[static_cast<size_t>(m.near_of)];
      info.near_similarity = m.similarity;
      char sim[16];
      std::snprintf(sim, sizeof sim, "%.2f", m.similarity);
      Issue is{info.line, 0, kWarning, "duplicate.near", "",
               "near duplicate of line " + std::to_string(info.near_duplicate_of) + " (estimated similarity " + sim + ")"};
      info.issues.push_back(std::move(is));
    }
  }
  return true;
}

}  // namespace fastchat::tools
