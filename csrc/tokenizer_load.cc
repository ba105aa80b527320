// tokenizer.json -> TokenizerImpl. Every supported component is built here; anything else throws a
// TokenizerError naming the component (e.g. "normalizer.Lowercase"), so the Python side can fall back.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "json.h"
#include "tokenizer_impl.h"
#include "unicode.h"

namespace fastchat {

namespace {

using json::Type;
using json::Value;

const Value* member(const Value& v, const char* key) { return v.find(key); }

std::string str_or(const Value& v, const char* key, const std::string& fallback) {
  const Value* m = v.find(key);
  return (m && m->is_string()) ? m->string : fallback;
}

bool bool_or(const Value& v, const char* key, bool fallback) {
  const Value* m = v.find(key);
  return (m && m->type == Type::Bool) ? m->boolean : fallback;
}

size_t uint_or(const Value& v, const char* key, size_t fallback) {
  const Value* m = v.find(key);
  return (m && m->type == Type::Number && m->is_integer && m->integer >= 0) ? (size_t)m->integer : fallback;
}

std::string type_of(const Value& v, const std::string& where) {
  if (!v.is_object()) throw TokenizerError(where, "expected an object");
  const Value* t = v.find("type");
  if (!t || !t->is_string()) throw TokenizerError(where, "missing \"type\"");
  return t->string;
}

// The GPT-2 byte <-> char table (HF pre_tokenizers/byte_level.rs bytes_char).
std::vector<uint32_t> byte_to_char() {
  std::vector<uint32_t> table(256);
  uint32_t extra = 0;
  for (uint32_t b = 0; b < 256; ++b) {
    bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    table[b] = printable ? b : 256 + extra++;
  }
  return table;
}

// The literal of a {"String": ...} pattern; a {"Regex": ...} is returned via `regex`.
std::string pattern_of(const Value& v, const std::string& where, std::string* regex) {
  const Value* p = v.find("pattern");
  if (!p || !p->is_object()) throw TokenizerError(where, "missing \"pattern\"");
  if (const Value* s = p->find("String"); s && s->is_string()) return s->string;
  if (const Value* r = p->find("Regex"); r && r->is_string() && regex) {
    *regex = r->string;
    return "";
  }
  throw TokenizerError(where, "only a String pattern is supported here");
}

Behavior behavior_of(const Value& v, const std::string& where) {
  std::string b = str_or(v, "behavior", "");
  if (b == "Isolated") return Behavior::Isolated;
  if (b == "Removed") return Behavior::Removed;
  if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::MergedWithNext;
  if (b == "Contiguous") return Behavior::Contiguous;
  throw TokenizerError(where + ".behavior", "unknown split behavior \"" + b + "\"");
}

int prepend_scheme_of(const Value& v) {
  std::string s = str_or(v, "prepend_scheme", "");
  if (s.empty()) return bool_or(v, "add_prefix_space", true) ? 0 : 2;
  if (s == "always") return 0;
  if (s == "first") return 1;
  if (s == "never") return 2;
  throw TokenizerError("pre_tokenizer.Metaspace.prepend_scheme", "unknown prepend_scheme \"" + s + "\"");
}

std::unique_ptr<Normalizer> build_normalizer(const Value& v) {
  std::string type = type_of(v, "normalizer");
  std::string where = "normalizer." + type;
  if (type == "NFC") return make_nfc();
  if (type == "Prepend") return make_prepend(str_or(v, "prepend", ""));
  if (type == "Replace") {
    std::string literal = pattern_of(v, where, nullptr);  // a Regex pattern throws: no engine for it
    return make_replace(literal, str_or(v, "content", ""));
  }
  if (type == "Sequence") {
    const Value* list = v.find("normalizers");
    if (!list || !list->is_array()) throw TokenizerError(where, "missing \"normalizers\"");
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (const Value& s : list->array) steps.push_back(build_normalizer(s));
    return make_normalizer_sequence(std::move(steps));
  }
  throw TokenizerError(where, "this normalizer is not supported by the native tokenizer");
}

struct PreTokInfo {
  bool byte_level = false;
};

std::unique_ptr<PreTokenizer> build_pre_tokenizer(const Value& v, PreTokInfo& info) {
  std::string type = type_of(v, "pre_tokenizer");
  std::string where = "pre_tokenizer." + type;
  if (type == "ByteLevel") {
    info.byte_level = true;
    return make_byte_level(bool_or(v, "add_prefix_space", false), bool_or(v, "use_regex", true));
  }
  if (type == "Split") {
    std::string regex;
    std::string literal = pattern_of(v, where, &regex);
    Behavior b = behavior_of(v, where);
    bool invert = bool_or(v, "invert", false);
    if (regex.empty()) return make_literal_split(literal, b, invert);
    Grammar g;
    if (!recognise_pattern(regex, g))
      throw TokenizerError(where + ".pattern", "no native scanner for the regex " + regex);
    return make_regex_split(g, b, invert);
  }
  if (type == "Metaspace") {
    std::string rep = str_or(v, "replacement", "\xE2\x96\x81");
    return make_metaspace(rep, prepend_scheme_of(v), bool_or(v, "split", true));
  }
  if (type == "Digits") return make_digits(bool_or(v, "individual_digits", false));
  if (type == "Sequence") {
    const Value* list = v.find("pretokenizers");
    if (!list || !list->is_array()) throw TokenizerError(where, "missing \"pretokenizers\"");
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (const Value& s : list->array) steps.push_back(build_pre_tokenizer(s, info));
    return make_sequence(std::move(steps));
  }
  throw TokenizerError(where, "this pre-tokenizer is not supported by the native tokenizer");
}

// Can the whole pre-tokenizer run as one scanner over the input (no copies)?
bool fused_grammar_of(const Value& v, Grammar& g) {
  std::string type = str_or(v, "type", "");
  if (type == "ByteLevel")
    return !bool_or(v, "add_prefix_space", false) && bool_or(v, "use_regex", true) && (g = Grammar::Gpt2, true);
  if (type != "Sequence") return false;
  const Value* list = v.find("pretokenizers");
  if (!list || !list->is_array() || list->array.size() != 2) return false;
  const Value& split = list->array[0];
  const Value& bl = list->array[1];
  if (str_or(split, "type", "") != "Split" || str_or(bl, "type", "") != "ByteLevel") return false;
  if (bool_or(bl, "add_prefix_space", false) || bool_or(bl, "use_regex", true)) return false;
  if (str_or(split, "behavior", "") != "Isolated" || bool_or(split, "invert", false)) return false;
  const Value* p = split.find("pattern");
  const Value* r = p ? p->find("Regex") : nullptr;
  return r && r->is_string() && recognise_pattern(r->string, g);
}

void build_decoder(const Value& v, std::vector<DecodeStep>& out) {
  std::string type = type_of(v, "decoder");
  std::string where = "decoder." + type;
  DecodeStep step{DecodeStep::Fuse, "", "", 0, 0, 0};
  if (type == "ByteLevel") {
    step.kind = DecodeStep::ByteLevel;
  } else if (type == "Metaspace") {
    step.kind = DecodeStep::Metaspace;
    step.a = str_or(v, "replacement", "\xE2\x96\x81");
    step.prepend_scheme = prepend_scheme_of(v);
  } else if (type == "Replace") {
    step.kind = DecodeStep::Replace;
    step.a = pattern_of(v, where, nullptr);
    step.b = str_or(v, "content", "");
  } else if (type == "ByteFallback") {
    step.kind = DecodeStep::ByteFallback;
  } else if (type == "Fuse") {
    step.kind = DecodeStep::Fuse;
  } else if (type == "Strip") {
    step.kind = DecodeStep::Strip;
    step.a = str_or(v, "content", " ");
    step.start = uint_or(v, "start", 0);
    step.stop = uint_or(v, "stop", 0);
  } else if (type == "Sequence") {
    const Value* list = v.find("decoders");
    if (!list || !list->is_array()) throw TokenizerError(where, "missing \"decoders\"");
    for (const Value& s : list->array) build_decoder(s, out);
    return;
  } else {
    throw TokenizerError(where, "this decoder is not supported by the native tokenizer");
  }
  out.push_back(step);
}

void build_post_processor(const Value& v, TokenizerImpl& t) {
  std::string type = type_of(v, "post_processor");
  std::string where = "post_processor." + type;
  if (type == "ByteLevel") return;  // only trims offsets
  if (type == "Sequence") {
    const Value* list = v.find("processors");
    if (!list || !list->is_array()) throw TokenizerError(where, "missing \"processors\"");
    for (const Value& s : list->array) build_post_processor(s, t);
    return;
  }
  if (type == "TemplateProcessing") {
    const Value* single = v.find("single");
    const Value* specials = v.find("special_tokens");
    if (!single || !single->is_array()) throw TokenizerError(where, "missing \"single\"");
    t.post_prefix.clear();
    t.post_suffix.clear();
    bool seen_a = false;
    for (const Value& item : single->array) {
      if (item.find("Sequence")) { seen_a = true; continue; }
      const Value* st = item.find("SpecialToken");
      if (!st) throw TokenizerError(where, "unknown template item");
      std::string name = str_or(*st, "id", "");
      const Value* entry = specials ? specials->find(name) : nullptr;
      const Value* ids = entry ? entry->find("ids") : nullptr;
      if (!ids || !ids->is_array()) throw TokenizerError(where, "special token \"" + name + "\" has no ids");
      for (const Value& id : ids->array) (seen_a ? t.post_suffix : t.post_prefix).push_back((int32_t)id.integer);
    }
    return;
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    const Value* cls = v.find("cls");
    const Value* sep = v.find("sep");
    if (!cls || !sep || !cls->is_array() || !sep->is_array() || cls->array.size() != 2 || sep->array.size() != 2)
      throw TokenizerError(where, "missing cls/sep");
    t.post_prefix = {(int32_t)cls->array[1].integer};
    t.post_suffix = {(int32_t)sep->array[1].integer};
    return;
  }
  throw TokenizerError(where, "this post-processor is not supported by the native tokenizer");
}

void build_model(const Value& m, bool byte_level, TokenizerImpl& t) {
  std::string type = str_or(m, "type", "BPE");
  if (type != "BPE") throw TokenizerError("model." + type, "only BPE models are supported by the native tokenizer");
  if (const Value* d = m.find("dropout"); d && !d->is_null() && !(d->type == Type::Number && d->number == 0.0))
    throw TokenizerError("model.BPE.dropout", "BPE dropout is not supported");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (!str_or(m, key, "").empty()) throw TokenizerError(std::string("model.BPE.") + key, "must be null or empty");
  const Value* vocab = m.find("vocab");
  const Value* merges = m.find("merges");
  if (!vocab || !vocab->is_object()) throw TokenizerError("model.BPE.vocab", "missing or not an object");
  Bpe& bpe = t.bpe;
  bpe.byte_level = byte_level;
  bpe.ignore_merges = bool_or(m, "ignore_merges", false);
  bpe.byte_fallback = bool_or(m, "byte_fallback", false);
  bpe.fuse_unk = bool_or(m, "fuse_unk", false);

  std::vector<uint32_t> b2c = byte_to_char();
  std::unordered_map<uint32_t, unsigned char> c2b;
  for (uint32_t b = 0; b < 256; ++b) c2b[b2c[b]] = (unsigned char)b;
  bpe.vocab.reserve(vocab->object.size());
  t.token_ids.reserve(vocab->object.size() * 2);
  for (const auto& kv : vocab->object) {
    if (!kv.second.is_integer || kv.second.integer < 0 || kv.second.integer > INT32_MAX)
      throw TokenizerError("model.BPE.vocab", "id of \"" + kv.first + "\" is not a non-negative integer");
    int32_t id = (int32_t)kv.second.integer;
    t.token_ids[kv.first] = id;
    if ((size_t)id >= t.id_tokens.size()) t.id_tokens.resize((size_t)id + 1);
    t.id_tokens[(size_t)id] = kv.first;
    if (!byte_level) {
      bpe.vocab.insert(kv.first, id);
      continue;
    }
    std::string bytes;
    bool ok = true;
    for (size_t i = 0; i < kv.first.size() && ok;) {
      int len;
      uint32_t cp = unicode::decode(kv.first.data(), kv.first.size(), i, len);
      auto it = c2b.find(cp);
      if (it == c2b.end()) ok = false; else bytes.push_back((char)it->second);
      i += (size_t)len;
    }
    if (ok) bpe.vocab.insert(bytes, id);  // tokens outside the byte alphabet can never be produced
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = t.token_ids.find(name);
    bpe.byte_token[b] = it == t.token_ids.end() ? -1 : it->second;
  }
  std::string unk = str_or(m, "unk_token", "");
  if (!unk.empty()) {
    auto it = t.token_ids.find(unk);
    if (it == t.token_ids.end()) throw TokenizerError("model.BPE.unk_token", "\"" + unk + "\" is not in the vocab");
    bpe.unk_id = it->second;
  }
  if (merges && merges->is_array()) {
    bpe.merges.reserve(merges->array.size());
    int32_t rank = 0;
    for (const Value& mv : merges->array) {
      std::string a, b;
      if (mv.is_string()) {
        size_t sp = mv.string.find(' ');
        if (sp == std::string::npos) throw TokenizerError("model.BPE.merges", "merge \"" + mv.string + "\" has no space");
        a = mv.string.substr(0, sp);
        b = mv.string.substr(sp + 1);
      } else if (mv.is_array() && mv.array.size() == 2 && mv.array[0].is_string() && mv.array[1].is_string()) {
        a = mv.array[0].string;
        b = mv.array[1].string;
      } else {
        throw TokenizerError("model.BPE.merges", "a merge is neither \"a b\" nor [a, b]");
      }
      auto ia = t.token_ids.find(a), ib = t.token_ids.find(b), im = t.token_ids.find(a + b);
      if (ia == t.token_ids.end() || ib == t.token_ids.end() || im == t.token_ids.end())
        throw TokenizerError("model.BPE.merges", "merge \"" + a + " " + b + "\" uses a token missing from the vocab");
      bpe.merges.insert(ia->second, ib->second, rank++, im->second);
    }
  }
  bpe.finalize();
}

}  // namespace

std::shared_ptr<TokenizerImpl> load_tokenizer(std::string_view json_text) {
  Value root = json::parse(json_text);
  if (!root.is_object()) throw TokenizerError("tokenizer.json", "the top level is not an object");
  auto t = std::make_shared<TokenizerImpl>();

  const Value* norm = member(root, "normalizer");
  if (norm && !norm->is_null()) t->normalizer = build_normalizer(*norm);
  PreTokInfo info;
  const Value* pre = member(root, "pre_tokenizer");
  if (pre && !pre->is_null()) {
    t->pre_tokenizer = build_pre_tokenizer(*pre, info);
    t->fused = fused_grammar_of(*pre, t->fused_grammar);
  }
  const Value* model = member(root, "model");
  if (!model || !model->is_object()) throw TokenizerError("model", "missing");
  build_model(*model, info.byte_level, *t);
  const Value* post = member(root, "post_processor");
  if (post && !post->is_null()) build_post_processor(*post, *t);
  const Value* dec = member(root, "decoder");
  if (dec && !dec->is_null()) {
    build_decoder(*dec, t->decoders);
    t->has_decoder = true;
  }

  const Value* added = member(root, "added_tokens");
  size_t model_vocab_size = model->find("vocab")->object.size();
  int32_t max_added = -1;
  if (added && added->is_array()) {
    for (const Value& a : added->array) {
      AddedToken tok;
      tok.content = str_or(a, "content", "");
      if (!a.find("id") || !a.find("id")->is_integer) throw TokenizerError("added_tokens", "an added token has no id");
      tok.id = (int32_t)a.find("id")->integer;
      tok.special = bool_or(a, "special", false);
      tok.lstrip = bool_or(a, "lstrip", false);
      tok.rstrip = bool_or(a, "rstrip", false);
      tok.single_word = bool_or(a, "single_word", false);
      tok.normalized = bool_or(a, "normalized", !tok.special);
      if (tok.content.empty() || tok.id < 0) throw TokenizerError("added_tokens", "an added token is empty");
      int32_t index = (int32_t)t->added.size();
      if (t->added_by_content.count(tok.content)) continue;
      // HF re-assigns ids on load (AddedVocabulary::add_tokens): a content already in the vocab keeps the
      // vocab id; a new one gets the next id after the vocab and the added tokens so far.
      if (auto it = t->token_ids.find(tok.content); it != t->token_ids.end()) {
        tok.id = it->second;
      } else {
        int32_t vocab_n = (int32_t)model_vocab_size;
        tok.id = max_added < 0 ? vocab_n : (max_added >= vocab_n || vocab_n == 0 ? max_added + 1 : vocab_n);
      }
      max_added = std::max(max_added, tok.id);
      t->added_by_content[tok.content] = index;
      if ((size_t)tok.id >= t->id_tokens.size()) t->id_tokens.resize((size_t)tok.id + 1);
      t->id_tokens[(size_t)tok.id] = tok.content;
      t->token_ids[tok.content] = tok.id;
      t->added.push_back(tok);
    }
  }
  t->added_index.assign(t->id_tokens.size(), -1);
  for (size_t k = 0; k < t->added.size(); ++k) {
    const AddedToken& tok = t->added[k];
    t->added_index[(size_t)tok.id] = (int32_t)k;
    if (tok.normalized) {
      std::string content = t->normalizer ? normalize_string(*t->normalizer, tok.content) : tok.content;
      t->normalized_matcher.add(content, (int32_t)k);
    } else {
      t->raw_matcher.add(tok.content, (int32_t)k);
    }
  }
  t->vocab_size_ = t->token_ids.size();
  return t;
}

std::shared_ptr<Tokenizer> Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TokenizerError("tokenizer.json", "cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return load_tokenizer(ss.str());
}

}  // namespace fastchat
