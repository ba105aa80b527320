// libFuzzer target over the tokenizer.json loader and encode/decode. The first input byte picks the mode:
//   even: the rest is a tokenizer.json; loading must succeed or throw TokenizerError / json::ParseError,
//         and a loaded tokenizer must encode and decode a fixed text without crashing.
//   odd:  the rest is text (any bytes, invalid UTF-8 included) encoded with a small built-in tokenizer
//         that exercises added tokens (lstrip/rstrip/single_word/normalized), NFC, Prepend/Replace and
//         byte fallback; offsets must lie inside the text and be ordered; control spans come from the input.
// Build and run: see README "Development". Without libFuzzer (-DFUZZ_STANDALONE) it replays files given
// on the command line, which is how the corpus is re-checked under ASan/UBSan with g++.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "json.h"
#include "tokenizer.h"

namespace {

const char* kSmallTokenizer = R"({
  "version": "1.0",
  "added_tokens": [
    {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 40, "content": "<|user|>", "single_word": false, "lstrip": true, "rstrip": true, "normalized": false, "special": true},
    {"id": 41, "content": "ab", "single_word": true, "lstrip": false, "rstrip": false, "normalized": true, "special": false}
  ],
  "normalizer": {"type": "Sequence", "normalizers": [
    {"type": "NFC"}, {"type": "Prepend", "prepend": "\u2581"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": true},
    {"type": "Split", "pattern": {"String": "x"}, "behavior": "MergedWithNext", "invert": false}]},
  "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
    {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
  "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
  "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
    "vocab": {"<unk>": 0, "<s>": 1, "<0x00>": 2, "<0x41>": 3, "<0xC3>": 4, "<0xA9>": 5, "<0xE2>": 6,
              "a": 7, "b": 8, "c": 9, "\u2581": 10, "\u2581a": 11, "ab": 12, "\u2581ab": 13, "1": 14, "x": 15,
              "\u00e9": 16, "\u2581\u2581": 17, "bc": 18, "abc": 19},
    "merges": ["\u2581 a", "a b", "\u2581a b", "\u2581 \u2581", "b c", "a bc"]}
})";

const fastchat::Tokenizer& small_tokenizer() {
  static std::shared_ptr<fastchat::Tokenizer> t = fastchat::Tokenizer::from_json(kSmallTokenizer);
  return *t;
}

void check_encoding(const fastchat::Tokenizer& t, std::string_view text, const fastchat::EncodeOptions& opt) {
  fastchat::Encoding enc;
  t.encode(text, opt, enc);
  if (opt.offsets) {
    if (enc.starts.size() != enc.ids.size() || enc.ends.size() != enc.ids.size()) std::abort();
    for (size_t i = 0; i < enc.ids.size(); ++i)
      if (enc.starts[i] > enc.ends[i] || enc.ends[i] > text.size()) std::abort();
  }
  std::string back = t.decode(enc.ids.data(), enc.ids.size(), false);
  (void)back;
  std::vector<std::string_view> batch{text, text.substr(0, text.size() / 2)};
  auto ids = t.encode_batch(batch, opt, 2);
  if (ids.size() != 2) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::string_view rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  fastchat::EncodeOptions opt;
  opt.allow_special = data[0] & 2;
  opt.add_special_tokens = data[0] & 4;
  opt.offsets = data[0] & 8;
  if ((data[0] & 1) == 0) {
    std::shared_ptr<fastchat::Tokenizer> t;
    try {
      t = fastchat::Tokenizer::from_json(rest);
    } catch (const fastchat::TokenizerError&) {
      return 0;
    } catch (const fastchat::json::ParseError&) {
      return 0;
    }
    check_encoding(*t, "Hello  w\xC3\xB6rld 123 <s> \xF0\x9F\x98\x80\n", opt);
    return 0;
  }
  // Control spans: every occurrence of "<|user|>" in the text, when bit 4 is set (as the chat loader does).
  std::vector<std::pair<uint32_t, uint32_t>> spans;
  if (data[0] & 16) {
    for (size_t at = rest.find("<|user|>"); at != std::string_view::npos; at = rest.find("<|user|>", at + 8))
      spans.emplace_back((uint32_t)at, (uint32_t)(at + 8));
    opt.control_spans = &spans;
  }
  check_encoding(small_tokenizer(), rest, opt);
  return 0;
}

#ifdef FUZZ_STANDALONE
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i], std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  }
  std::printf("replayed %d inputs\n", argc - 1);
  return 0;
}
#endif
