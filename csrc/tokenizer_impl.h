// Internal to the tokenizer (tokenizer.cc, tokenizer_load.cc, tokenizer_decode.cc): the loaded pipeline.
// Callers use tokenizer.h only.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "bpe.h"
#include "normalize.h"
#include "pretokenize.h"
#include "tokenizer.h"

namespace fastchat {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, normalized = false, single_word = false;
};

// Leftmost-longest matching of added tokens by walking a byte trie at each candidate position.
class AddedMatcher {
 public:
  void add(const std::string& content, int32_t token_index);
  bool empty() const { return nodes_.size() <= 1; }
  bool may_start(unsigned char c) const { return first_[c]; }
  // Longest token starting at i and ending at or before `limit`; -1 when none.
  int32_t longest(const char* s, size_t limit, size_t i, size_t& end) const;

 private:
  struct Node { int32_t token = -1; };
  std::vector<Node> nodes_{Node{}};
  std::unordered_map<uint64_t, int32_t> edges_;  // (node << 8 | byte) -> child
  bool first_[256] = {};
};

struct DecodeStep {
  enum Kind { ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip } kind;
  std::string a, b;       // Metaspace: replacement; Replace: pattern, content; Strip: content (one char)
  int prepend_scheme = 0; // Metaspace: 0 always, 1 first, 2 never
  size_t start = 0, stop = 0;
};

class TokenizerImpl : public Tokenizer {
 public:
  void encode(std::string_view text, const EncodeOptions& options, Encoding& out) const override;
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string_view>& texts,
                                                 const EncodeOptions& options, int threads) const override;
  std::string decode(const int32_t* ids, size_t n, bool skip_special_tokens) const override;
  int32_t token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  size_t vocab_size() const override { return vocab_size_; }
  bool is_special(int32_t id) const override;

  // ---- filled by the loader (tokenizer_load.cc)
  Bpe bpe;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  bool fused = false;          // pre-tokenizer is exactly one known-regex Isolated split over the input
  Grammar fused_grammar = Grammar::Gpt2;
  std::vector<AddedToken> added;
  AddedMatcher raw_matcher, normalized_matcher;
  std::unordered_map<std::string, int32_t> added_by_content;  // content -> index in `added`
  std::unordered_map<std::string, int32_t> token_ids;         // every token string -> id
  std::vector<std::string> id_tokens;                         // id -> token string ("" for holes)
  std::vector<int32_t> added_index;                           // id -> index in `added` or -1
  std::vector<int32_t> post_prefix, post_suffix;              // post-processor ids around a single sequence
  std::vector<DecodeStep> decoders;
  bool has_decoder = false;
  size_t vocab_size_ = 0;

 private:
  struct Split { int32_t token; uint32_t b, e; };  // token >= 0: an added token (index); else text
  void find_added(std::string_view text, const AddedMatcher& matcher, bool allow_special,
                  const std::vector<std::pair<uint32_t, uint32_t>>* control, std::vector<Split>& out) const;
  void encode_segment(std::string_view text, uint32_t base, const EncodeOptions& options, Encoding& out) const;
  void encode_pieces(Pieces& p, bool offsets, Encoding& out) const;
};

std::shared_ptr<TokenizerImpl> load_tokenizer(std::string_view json_text);

}  // namespace fastchat
