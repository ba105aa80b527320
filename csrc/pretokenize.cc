// Hand-written scanners for the split regexes of GPT-2, Llama-3 and Qwen2 (recognised by exact pattern
// string; anything else is a TokenizerError upstream), and HF's pre-tokenizer steps over aligned buffers.
// Why hand-written: the patterns need \p{L}/\p{N} and a lookahead, which std::regex cannot do, and a
// per-pattern state machine is several times faster than a general regex engine (see notes).
#include "pretokenize.h"

#include <cstring>

#include "unicode.h"

namespace fastchat {

const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
static const char* const kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
static const char* const kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

bool recognise_pattern(std::string_view pattern, Grammar& grammar) {
  if (pattern == kGpt2Pattern) { grammar = Grammar::Gpt2; return true; }
  if (pattern == kLlama3Pattern) { grammar = Grammar::Llama3; return true; }
  if (pattern == kQwen2Pattern) { grammar = Grammar::Qwen2; return true; }
  return false;
}

uint32_t Buf::span_begin(size_t b) const { return orig_begin(b); }
uint32_t Buf::span_end(size_t b, size_t e) const {
  if (e <= b) return orig_begin(b);
  uint32_t end = orig_end(e - 1), begin = orig_begin(b);
  return end < begin ? begin : end;
}

// ------------------------------------------------------------------------------------------ scanners
namespace {

constexpr uint8_t kOther = 0;  // not L, N or \s (also invalid UTF-8 bytes)

struct AsciiClass {
  uint8_t f[128];
  AsciiClass() {
    for (int c = 0; c < 128; ++c) f[c] = unicode::flags((uint32_t)c) & (unicode::kLetter | unicode::kNumber | unicode::kSpace);
  }
};
const AsciiClass& ascii() {
  static const AsciiClass table;
  return table;
}

// Class bits (L/N/S) of the char at i and its length.
inline uint8_t cls(const char* s, size_t n, size_t i, int& len) {
  unsigned char c = (unsigned char)s[i];
  if (c < 0x80) { len = 1; return ascii().f[c]; }
  uint32_t cp = unicode::decode(s, n, i, len);
  if (cp == 0xFFFFFFFFu) return kOther;
  return unicode::flags(cp) & (unicode::kLetter | unicode::kNumber | unicode::kSpace);
}

inline size_t run(const char* s, size_t n, size_t i, uint8_t want_mask, bool other) {
  while (i < n) {
    int len;
    uint8_t f = cls(s, n, i, len);
    bool ok = other ? f == kOther : (f & want_mask) != 0;
    if (!ok) break;
    i += (size_t)len;
  }
  return i;
}

// \s+(?!\S) then \s+ (and, for Llama-3/Qwen2, \s*[\r\n]+ first) for the whitespace run starting at i.
inline size_t whitespace(const char* s, size_t n, size_t i, bool newline_alt) {
  size_t last_start = i, last_nl = SIZE_MAX, j = i;
  size_t count = 0;
  while (j < n) {
    int len;
    if (!(cls(s, n, j, len) & unicode::kSpace)) break;
    if (s[j] == '\r' || s[j] == '\n') last_nl = j;
    last_start = j;
    j += (size_t)len;
    ++count;
  }
  if (newline_alt && last_nl != SIZE_MAX) return last_nl + 1;
  if (j == n || count < 2) return j;
  return last_start;  // give the last whitespace char back to the next piece
}

size_t scan_gpt2(const char* s, size_t n, size_t i) {
  unsigned char c = (unsigned char)s[i];
  if (c == '\'' && i + 1 < n) {
    char c1 = s[i + 1];
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
    if (i + 2 < n && ((c1 == 'r' && s[i + 2] == 'e') || (c1 == 'v' && s[i + 2] == 'e') || (c1 == 'l' && s[i + 2] == 'l')))
      return i + 3;
  }
  size_t j = (c == ' ' && i + 1 < n) ? i + 1 : i;
  int len;
  uint8_t f = cls(s, n, j, len);
  if (j == i + 1 || !(f & unicode::kSpace) || c != ' ') {
    if (f & unicode::kLetter) return run(s, n, j, unicode::kLetter, false);
    if (f & unicode::kNumber) return run(s, n, j, unicode::kNumber, false);
    if (f == kOther) return run(s, n, j, 0, true);
  }
  return whitespace(s, n, i, false);
}

inline bool ascii_ieq(char c, char lower) { return c == lower || c == lower - 32; }

size_t scan_llama3(const char* s, size_t n, size_t i, bool single_digit) {
  unsigned char c = (unsigned char)s[i];
  if (c == '\'' && i + 1 < n) {
    char c1 = s[i + 1];
    if (ascii_ieq(c1, 's') || ascii_ieq(c1, 't') || ascii_ieq(c1, 'm') || ascii_ieq(c1, 'd')) return i + 2;
    // (?i:'s) also matches U+017F LATIN SMALL LETTER LONG S (C5 BF).
    if ((unsigned char)c1 == 0xC5 && i + 2 < n && (unsigned char)s[i + 2] == 0xBF) return i + 3;
    if (i + 2 < n) {
      char c2 = s[i + 2];
      if ((ascii_ieq(c1, 'r') && ascii_ieq(c2, 'e')) || (ascii_ieq(c1, 'v') && ascii_ieq(c2, 'e')) ||
          (ascii_ieq(c1, 'l') && ascii_ieq(c2, 'l')))
        return i + 3;
    }
  }
  int len;
  uint8_t f = cls(s, n, i, len);
  if (f & unicode::kLetter) return run(s, n, i, unicode::kLetter, false);
  if (!(f & unicode::kNumber) && c != '\r' && c != '\n' && i + (size_t)len < n) {
    int len2;
    if (cls(s, n, i + (size_t)len, len2) & unicode::kLetter) return run(s, n, i + (size_t)len, unicode::kLetter, false);
  }
  if (f & unicode::kNumber) {
    size_t j = i + (size_t)len;
    for (int k = 1; k < (single_digit ? 1 : 3) && j < n; ++k) {
      int l2;
      if (!(cls(s, n, j, l2) & unicode::kNumber)) break;
      j += (size_t)l2;
    }
    return j;
  }
  size_t j = i;
  uint8_t g = f;
  if (c == ' ' && i + 1 < n) {
    int l2;
    uint8_t f2 = cls(s, n, i + 1, l2);
    if (f2 == kOther) { j = i + 1; g = kOther; }
  }
  if (g == kOther) {
    j = run(s, n, j, 0, true);
    while (j < n && (s[j] == '\r' || s[j] == '\n')) ++j;
    return j;
  }
  return whitespace(s, n, i, true);
}

}  // namespace

size_t scan(Grammar g, const char* s, size_t n, size_t i) {
  switch (g) {
    case Grammar::Gpt2: return scan_gpt2(s, n, i);
    case Grammar::Llama3: return scan_llama3(s, n, i, false);
    case Grammar::Qwen2: return scan_llama3(s, n, i, true);
  }
  return n;
}

// ---------------------------------------------------------------------------------------- behaviours
namespace {

struct Span { uint32_t b, e; bool match; };

// HF NormalizedString::split: turns (span, is_match) into pieces according to the behaviour.
void apply_behavior(const std::vector<Span>& spans, Behavior behavior, bool invert, uint32_t buf,
                    std::vector<Piece>& out) {
  size_t first = out.size();
  bool previous_match = false;
  auto last = [&]() -> Piece* { return out.size() > first ? &out.back() : nullptr; };
  switch (behavior) {
    case Behavior::Isolated:
      for (const Span& s : spans) out.push_back({buf, s.b, s.e});
      break;
    case Behavior::Removed:
      for (const Span& s : spans)
        if ((s.match != invert) == false) out.push_back({buf, s.b, s.e});
      break;
    case Behavior::Contiguous:
      for (const Span& s : spans) {
        bool m = s.match != invert;
        if (m == previous_match && last()) last()->e = s.e; else out.push_back({buf, s.b, s.e});
        previous_match = m;
      }
      break;
    case Behavior::MergedWithPrevious:
      for (const Span& s : spans) {
        bool m = s.match != invert;
        if (m && !previous_match && last()) last()->e = s.e; else out.push_back({buf, s.b, s.e});
        previous_match = m;
      }
      break;
    case Behavior::MergedWithNext: {
      std::vector<Piece> rev;
      for (size_t k = spans.size(); k-- > 0;) {
        const Span& s = spans[k];
        bool m = s.match != invert;
        if (m && !previous_match && !rev.empty()) rev.back().b = s.b; else rev.push_back({buf, s.b, s.e});
        previous_match = m;
      }
      for (size_t k = rev.size(); k-- > 0;) out.push_back(rev[k]);
      break;
    }
  }
  // Empty pieces are dropped, as HF does.
  size_t w = first;
  for (size_t r = first; r < out.size(); ++r)
    if (out[r].e > out[r].b) out[w++] = out[r];
  out.resize(w);
}

class RegexSplit : public PreTokenizer {
 public:
  RegexSplit(Grammar g, Behavior b, bool invert) : g_(g), behavior_(b), invert_(invert) {}
  void apply(Pieces& p) const override {
    p.next.clear();
    std::vector<Span> spans;
    for (const Piece& pc : p.list) {
      const Buf& buf = p.bufs[pc.buf];
      const char* s = buf.text.data();
      size_t n = pc.e;
      if (behavior_ == Behavior::Isolated) {
        for (size_t i = pc.b; i < n;) {
          size_t e = scan(g_, s, n, i);
          p.next.push_back({pc.buf, (uint32_t)i, (uint32_t)e});
          i = e;
        }
        continue;
      }
      spans.clear();
      for (size_t i = pc.b; i < n;) {
        size_t e = scan(g_, s, n, i);
        spans.push_back({(uint32_t)i, (uint32_t)e, true});
        i = e;
      }
      apply_behavior(spans, behavior_, invert_, pc.buf, p.next);
    }
    p.list.swap(p.next);
  }

 private:
  Grammar g_;
  Behavior behavior_;
  bool invert_;
};

// Splits on a literal string or on a per-char predicate; gaps are non-matches.
class MatchSplit : public PreTokenizer {
 public:
  MatchSplit(std::string literal, bool digits, Behavior b, bool invert)
      : literal_(std::move(literal)), digits_(digits), behavior_(b), invert_(invert) {}
  void apply(Pieces& p) const override {
    p.next.clear();
    std::vector<Span> spans;
    for (const Piece& pc : p.list) {
      const Buf& buf = p.bufs[pc.buf];
      const char* s = buf.text.data();
      spans.clear();
      uint32_t prev = pc.b;
      if (digits_) {
        for (size_t i = pc.b; i < pc.e;) {
          int len;
          uint32_t cp = unicode::decode(s, pc.e, i, len);
          if (cp != 0xFFFFFFFFu && (unicode::flags(cp) & unicode::kNumber)) {
            if (prev < i) spans.push_back({prev, (uint32_t)i, false});
            spans.push_back({(uint32_t)i, (uint32_t)(i + (size_t)len), true});
            prev = (uint32_t)(i + (size_t)len);
          }
          i += (size_t)len;
        }
      } else if (!literal_.empty()) {
        std::string_view text(s + pc.b, pc.e - pc.b);
        size_t at = 0;
        while ((at = text.find(literal_, at)) != std::string_view::npos) {
          uint32_t b = pc.b + (uint32_t)at, e = b + (uint32_t)literal_.size();
          if (prev < b) spans.push_back({prev, b, false});
          spans.push_back({b, e, true});
          prev = e;
          at += literal_.size();
        }
      }
      if (prev < pc.e) spans.push_back({prev, pc.e, false});
      apply_behavior(spans, behavior_, invert_, pc.buf, p.next);
    }
    p.list.swap(p.next);
  }

 private:
  std::string literal_;
  bool digits_;
  Behavior behavior_;
  bool invert_;
};

// Copies bytes [b, e) of `src` into `dst` with their alignment.
void copy_aligned(const Buf& src, size_t b, size_t e, Buf& dst) {
  dst.owned.append(src.text.data() + b, e - b);
  for (size_t i = b; i < e; ++i) { dst.ob.push_back(src.orig_begin(i)); dst.oe.push_back(src.orig_end(i)); }
}

// Inserts `text` before byte b of `src`, aligned (as HF's prepend) to the span of the char at b.
void insert_aligned(std::string_view text, const Buf& src, size_t b, size_t e, Buf& dst) {
  dst.owned.append(text.data(), text.size());
  uint32_t ob = src.orig_begin(b), oe = ob;
  if (b < e) oe = src.orig_end(b + unicode::char_len(src.text.data(), e, b) - 1);
  for (size_t k = 0; k < text.size(); ++k) { dst.ob.push_back(ob); dst.oe.push_back(oe); }
}

class ByteLevel : public PreTokenizer {
 public:
  ByteLevel(bool add_prefix_space, bool use_regex) : prefix_(add_prefix_space), regex_(use_regex) {}
  bool splits_only() const override { return !prefix_; }
  void apply(Pieces& p) const override {
    if (prefix_) {
      for (Piece& pc : p.list) {
        const Buf& src = p.bufs[pc.buf];
        if (pc.e > pc.b && src.text[pc.b] == ' ') continue;
        Buf& dst = p.add_buf();
        insert_aligned(" ", src, pc.b, pc.e, dst);
        copy_aligned(src, pc.b, pc.e, dst);
        dst.text = dst.owned;
        pc = Piece{(uint32_t)(p.bufs.size() - 1), 0, (uint32_t)dst.owned.size()};
      }
    }
    if (regex_) RegexSplit(Grammar::Gpt2, Behavior::Isolated, false).apply(p);
  }

 private:
  bool prefix_, regex_;
};

class Metaspace : public PreTokenizer {
 public:
  Metaspace(std::string replacement, int scheme, bool split) : rep_(std::move(replacement)), scheme_(scheme), split_(split) {}
  bool splits_only() const override { return false; }
  void apply(Pieces& p) const override {
    for (Piece& pc : p.list) {
      const Buf& src = p.bufs[pc.buf];
      Buf& dst = p.add_buf();
      dst.owned.reserve((pc.e - pc.b) + 8);
      std::string_view text = src.text.substr(pc.b, pc.e - pc.b);
      bool starts_with_rep = text.substr(0, rep_.size()) == rep_ || (text.size() && text[0] == ' ' && rep_.size());
      bool prepend = !starts_with_rep && (scheme_ == 0 || (scheme_ == 1 && src.orig_begin(pc.b) == 0));
      if (prepend) insert_aligned(rep_, src, pc.b, pc.e, dst);
      for (size_t i = pc.b; i < pc.e; ++i) {
        if (src.text[i] == ' ') {
          dst.owned.append(rep_);
          for (size_t k = 0; k < rep_.size(); ++k) { dst.ob.push_back(src.orig_begin(i)); dst.oe.push_back(src.orig_end(i)); }
        } else {
          dst.owned.push_back(src.text[i]);
          dst.ob.push_back(src.orig_begin(i));
          dst.oe.push_back(src.orig_end(i));
        }
      }
      dst.text = dst.owned;
      pc = Piece{(uint32_t)(p.bufs.size() - 1), 0, (uint32_t)dst.owned.size()};
    }
    if (split_) MatchSplit(rep_, false, Behavior::MergedWithNext, false).apply(p);
  }

 private:
  std::string rep_;
  int scheme_;
  bool split_;
};

class Sequence : public PreTokenizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
  bool splits_only() const override {
    for (const auto& s : steps_)
      if (!s->splits_only()) return false;
    return true;
  }
  void apply(Pieces& p) const override {
    for (const auto& s : steps_) s->apply(p);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

}  // namespace

std::unique_ptr<PreTokenizer> make_regex_split(Grammar g, Behavior b, bool invert) {
  return std::make_unique<RegexSplit>(g, b, invert);
}
std::unique_ptr<PreTokenizer> make_literal_split(std::string literal, Behavior b, bool invert) {
  return std::make_unique<MatchSplit>(std::move(literal), false, b, invert);
}
std::unique_ptr<PreTokenizer> make_digits(bool individual) {
  return std::make_unique<MatchSplit>("", true, individual ? Behavior::Isolated : Behavior::Contiguous, false);
}
std::unique_ptr<PreTokenizer> make_byte_level(bool add_prefix_space, bool use_regex) {
  return std::make_unique<ByteLevel>(add_prefix_space, use_regex);
}
std::unique_ptr<PreTokenizer> make_metaspace(std::string replacement, int prepend_scheme, bool split) {
  return std::make_unique<Metaspace>(std::move(replacement), prepend_scheme, split);
}
std::unique_ptr<PreTokenizer> make_sequence(std::vector<std::unique_ptr<PreTokenizer>> steps) {
  return std::make_unique<Sequence>(std::move(steps));
}

}  // namespace fastchat
