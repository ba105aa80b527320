// Unicode facts the tokenizer needs: UTF-8 decoding, the code point classes HF's regex engine uses
// (\p{L}, \p{N}, \p{M}, \s) and NFC with byte alignment. Tables come from tools/gen_unicode_tables.py.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace fastchat::unicode {

enum Flag : uint8_t {
  kLetter = 1,     // \p{L}
  kNumber = 2,     // \p{N}
  kMark = 4,       // \p{M}
  kSpace = 8,      // \s (White_Space)
  kNfcMaybe = 16,  // NFC may change text containing this code point
  kWord = 32,      // Rust regex \w (HF's single_word boundary test: L, M, Nd, Nl, Pc, ...)
};

namespace tables {
extern const uint16_t kFlagStage1[4352];
extern const uint8_t kFlagStage2[];
}  // namespace tables

inline uint8_t flags(uint32_t cp) {
  if (cp >= 0x110000) return 0;
  return tables::kFlagStage2[(uint32_t)tables::kFlagStage1[cp >> 8] * 256u + (cp & 255u)];
}

// Decodes the code point at s[i] (i < n) and its length in bytes. Invalid UTF-8 yields one byte with the
// code point 0xFFFFFFFF, which belongs to no class (the tokenizer treats it as "other" punctuation).
inline uint32_t decode(const char* s, size_t n, size_t i, int& len) {
  unsigned char c = (unsigned char)s[i];
  if (c < 0x80) { len = 1; return c; }
  auto cont = [&](size_t k) { return k < n && ((unsigned char)s[k] & 0xC0) == 0x80; };
  if (c >= 0xC2 && c < 0xE0 && cont(i + 1)) {
    len = 2;
    return ((c & 0x1Fu) << 6) | ((unsigned char)s[i + 1] & 0x3Fu);
  }
  if (c >= 0xE0 && c < 0xF0 && cont(i + 1) && cont(i + 2)) {
    uint32_t cp = ((c & 0x0Fu) << 12) | (((unsigned char)s[i + 1] & 0x3Fu) << 6) | ((unsigned char)s[i + 2] & 0x3Fu);
    if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) { len = 3; return cp; }
  }
  if (c >= 0xF0 && c < 0xF5 && cont(i + 1) && cont(i + 2) && cont(i + 3)) {
    uint32_t cp = ((c & 0x07u) << 18) | (((unsigned char)s[i + 1] & 0x3Fu) << 12) |
                  (((unsigned char)s[i + 2] & 0x3Fu) << 6) | ((unsigned char)s[i + 3] & 0x3Fu);
    if (cp >= 0x10000 && cp < 0x110000) { len = 4; return cp; }
  }
  len = 1;
  return 0xFFFFFFFFu;
}

inline size_t char_len(const char* s, size_t n, size_t i) {
  int len;
  decode(s, n, i, len);
  return (size_t)len;
}

void append_utf8(std::string& out, uint32_t cp);

// NFC as HF's normalizer does it (Unicode 9.0 data). `in_begin/in_end[i]` give the input span of byte i
// (may be empty for none: then byte i of `text` is its own span, offset by `base`); the outputs are filled
// for each output byte. Returns false (and leaves outputs untouched) when the text is already NFC.
bool nfc(std::string_view text, std::string& out, const uint32_t* in_begin, const uint32_t* in_end, uint32_t base,
         std::vector<uint32_t>* out_begin, std::vector<uint32_t>* out_end);

}  // namespace fastchat::unicode
