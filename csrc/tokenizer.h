// The native tokenizer: loads a Hugging Face tokenizer.json and encodes/decodes exactly as HF `tokenizers`
// does (byte-exact ids). This header is the contract the loader (chat.*) and the bindings rely on; the
// implementation is split over tokenizer.cc, normalize.*, pretokenize.*, bpe.*, unicode.*.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fastchat {

// A tokenizer.json that cannot be loaded exactly. `component` names the part (e.g. "normalizer.Lowercase",
// "pre_tokenizer.Split.pattern", "model.WordPiece") so the Python side can fall back to HF with a warning.
struct TokenizerError : std::runtime_error {
  std::string component;
  TokenizerError(std::string component_, const std::string& reason);
};

struct EncodeOptions {
  // true: special added tokens in the text are recognised (HF's default). false: they are encoded as plain
  // text (HF with encode_special_tokens=True); non-special added tokens are always recognised, as in HF.
  bool allow_special = false;
  // Apply the post-processor (e.g. BOS for Llama); HF's add_special_tokens.
  bool add_special_tokens = false;
  // Fill Encoding::starts/ends with byte offsets into the input text.
  bool offsets = false;
  // Byte ranges [begin, end) of the input that the chat template produced as control tokens. Each range is
  // exactly the content of one added token and is matched as that token (with HF's lstrip/rstrip handling)
  // even when allow_special is false. Sorted and non-overlapping; nullptr for none.
  const std::vector<std::pair<uint32_t, uint32_t>>* control_spans = nullptr;
};

struct Encoding {
  std::vector<int32_t> ids;
  // With EncodeOptions::offsets: token i covers input bytes [starts[i], ends[i]). Tokens added by the
  // post-processor get an empty range at their position.
  std::vector<uint32_t> starts, ends;
  void clear() { ids.clear(); starts.clear(); ends.clear(); }
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // `path` is a tokenizer.json file. Throws TokenizerError (unsupported component) or json::ParseError.
  static std::shared_ptr<Tokenizer> from_file(const std::string& path);
  static std::shared_ptr<Tokenizer> from_json(std::string_view json_text);

  // Appends to `out` (callers reuse one Encoding to avoid allocations). Thread-safe: a Tokenizer is
  // immutable after loading; per-thread caches live inside the implementation.
  virtual void encode(std::string_view text, const EncodeOptions& options, Encoding& out) const = 0;
  // Batch over a thread pool; threads <= 0 means all cores. Results are in input order.
  virtual std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string_view>& texts,
                                                         const EncodeOptions& options, int threads) const = 0;
  // As HF decode(ids, skip_special_tokens).
  virtual std::string decode(const int32_t* ids, size_t n, bool skip_special_tokens = false) const = 0;

  virtual int32_t token_to_id(std::string_view token) const = 0;  // -1 when absent (vocab or added)
  virtual std::string id_to_token(int32_t id) const = 0;          // "" when out of range
  virtual size_t vocab_size() const = 0;                          // HF get_vocab_size(with_added_tokens=True)
  virtual bool is_special(int32_t id) const = 0;                  // an added token with special=true
};

}  // namespace fastchat
