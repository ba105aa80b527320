// Pre-tokenization as HF `tokenizers` does it: working buffers aligned to the input bytes, hand-written
// scanners for the known split regexes (GPT-2, Llama-3, Qwen2; no regex engine), HF's five split
// behaviours, and the ByteLevel / Metaspace / Digits / Split steps. Knows nothing of the BPE model.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace fastchat {

// A text being tokenized and, per byte, the input span it came from. `ob` empty means identity:
// byte i came from input byte base + i.
struct Buf {
  std::string owned;
  std::string_view text;
  std::vector<uint32_t> ob, oe;
  uint32_t base = 0;
  uint32_t orig_begin(size_t i) const { return ob.empty() ? base + (uint32_t)i : ob[i]; }
  uint32_t orig_end(size_t i) const { return oe.empty() ? base + (uint32_t)i + 1 : oe[i]; }
  // Input span of bytes [b, e) of this buffer.
  uint32_t span_begin(size_t b) const;
  uint32_t span_end(size_t b, size_t e) const;
};

struct Piece { uint32_t buf, b, e; };

// Owns the buffers of one encode call (a deque keeps references stable while steps append).
struct Pieces {
  std::deque<Buf> bufs;
  std::vector<Piece> list, next;
  void clear() { bufs.clear(); list.clear(); next.clear(); }
  Buf& add_buf() { bufs.emplace_back(); return bufs.back(); }
};

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
enum class Grammar { Gpt2, Llama3, Qwen2 };  // the split regexes recognised by their exact pattern string

// The GPT-2 regex used by ByteLevel(use_regex=true).
extern const char* const kGpt2Pattern;
// Which hand-written scanner implements `pattern` exactly; false when none does.
bool recognise_pattern(std::string_view pattern, Grammar& grammar);
// End (byte offset) of the regex match that starts at `i` (the known patterns match at every position).
size_t scan(Grammar g, const char* s, size_t n, size_t i);

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits/transforms every piece of `p.list` (pieces refer into p.bufs).
  virtual void apply(Pieces& p) const = 0;
  // True when this step only splits (never copies or rewrites text), so pieces stay views of the input.
  virtual bool splits_only() const { return true; }
};

// Regex/literal/predicate split with HF's behaviours.
std::unique_ptr<PreTokenizer> make_regex_split(Grammar g, Behavior b, bool invert);
std::unique_ptr<PreTokenizer> make_literal_split(std::string literal, Behavior b, bool invert);
std::unique_ptr<PreTokenizer> make_digits(bool individual);
std::unique_ptr<PreTokenizer> make_byte_level(bool add_prefix_space, bool use_regex);
std::unique_ptr<PreTokenizer> make_metaspace(std::string replacement, int prepend_scheme /*0 always,1 first,2 never*/,
                                             bool split);
std::unique_ptr<PreTokenizer> make_sequence(std::vector<std::unique_ptr<PreTokenizer>> steps);

}  // namespace fastchat
