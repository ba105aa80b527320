// UTF-8 helpers and HF-exact NFC (decompose, reorder by combining class, recompose) with byte alignment.
// The slow path only runs on text containing a code point flagged kNfcMaybe, so ASCII/English skips it.
#include "unicode.h"

#include <algorithm>

namespace fastchat::unicode {

namespace tables {
extern const uint32_t kDecompCount;
extern const uint32_t kDecompIndex[];
extern const uint32_t kDecompData[];
extern const uint32_t kCccCount;
extern const uint32_t kCcc[];
extern const uint32_t kCompositionCount;
extern const uint32_t kComposition[];
}  // namespace tables

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back((char)cp);
  } else if (cp < 0x800) {
    out.push_back((char)(0xC0 | (cp >> 6)));
    out.push_back((char)(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back((char)(0xE0 | (cp >> 12)));
    out.push_back((char)(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back((char)(0x80 | (cp & 0x3F)));
  } else {
    out.push_back((char)(0xF0 | (cp >> 18)));
    out.push_back((char)(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back((char)(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back((char)(0x80 | (cp & 0x3F)));
  }
}

namespace {

constexpr uint32_t kRawByte = 0x80000000u;  // an invalid UTF-8 byte carried through unchanged
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

int ccc(uint32_t cp) {
  if (cp & kRawByte) return 0;
  if (!(flags(cp) & kNfcMaybe)) return 0;
  size_t lo = 0, hi = tables::kCccCount;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (tables::kCcc[2 * mid] < cp) lo = mid + 1; else hi = mid;
  }
  return (lo < tables::kCccCount && tables::kCcc[2 * lo] == cp) ? (int)tables::kCcc[2 * lo + 1] : 0;
}

struct Ch {
  uint32_t cp;
  int cc;
  uint32_t b, e;
};

void decompose(uint32_t cp, uint32_t b, uint32_t e, std::vector<Ch>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    uint32_t s = cp - kSBase;
    out.push_back({kLBase + s / kNCount, 0, b, e});
    out.push_back({kVBase + (s % kNCount) / kTCount, 0, b, e});
    if (s % kTCount) out.push_back({kTBase + s % kTCount, 0, b, e});
    return;
  }
  if (!(cp & kRawByte) && (flags(cp) & kNfcMaybe)) {
    size_t lo = 0, hi = tables::kDecompCount;
    while (lo < hi) {
      size_t mid = (lo + hi) / 2;
      if (tables::kDecompIndex[3 * mid] < cp) lo = mid + 1; else hi = mid;
    }
    if (lo < tables::kDecompCount && tables::kDecompIndex[3 * lo] == cp) {
      const uint32_t* d = tables::kDecompData + tables::kDecompIndex[3 * lo + 1];
      for (uint32_t k = 0; k < tables::kDecompIndex[3 * lo + 2]; ++k) out.push_back({d[k], ccc(d[k]), b, e});
      return;
    }
  }
  out.push_back({cp, ccc(cp), b, e});
}

uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  if ((a | b) & kRawByte) return 0;
  size_t lo = 0, hi = tables::kCompositionCount;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    const uint32_t* t = tables::kComposition + 3 * mid;
    if (t[0] < a || (t[0] == a && t[1] < b)) lo = mid + 1; else hi = mid;
  }
  if (lo < tables::kCompositionCount) {
    const uint32_t* t = tables::kComposition + 3 * lo;
    if (t[0] == a && t[1] == b) return t[2];
  }
  return 0;
}

}  // namespace

bool nfc(std::string_view text, std::string& out, const uint32_t* in_begin, const uint32_t* in_end, uint32_t base,
         std::vector<uint32_t>* out_begin, std::vector<uint32_t>* out_end) {
  const char* s = text.data();
  size_t n = text.size();
  bool maybe = false;
  for (size_t i = 0; i < n;) {
    if ((unsigned char)s[i] < 0x80) { ++i; continue; }
    int len;
    uint32_t cp = decode(s, n, i, len);
    if (cp != 0xFFFFFFFFu && (flags(cp) & kNfcMaybe)) { maybe = true; break; }
    i += (size_t)len;
  }
  if (!maybe) return false;

  std::vector<Ch> chars;
  chars.reserve(n + 8);
  for (size_t i = 0; i < n;) {
    int len;
    uint32_t cp = decode(s, n, i, len);
    uint32_t b = in_begin ? in_begin[i] : base + (uint32_t)i;
    uint32_t e = in_end ? in_end[i + len - 1] : base + (uint32_t)(i + len);
    if (cp == 0xFFFFFFFFu) cp = kRawByte | (unsigned char)s[i];
    decompose(cp, b, e, chars);
    i += (size_t)len;
  }
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < chars.size();) {
    if (chars[i].cc == 0) { ++i; continue; }
    size_t j = i;
    while (j < chars.size() && chars[j].cc != 0) ++j;
    std::stable_sort(chars.begin() + (long)i, chars.begin() + (long)j,
                     [](const Ch& x, const Ch& y) { return x.cc < y.cc; });
    i = j;
  }
  // Canonical composition.
  std::vector<Ch> composed;
  composed.reserve(chars.size());
  long starter = -1;
  int last_cc = 0;
  for (const Ch& ch : chars) {
    if (starter >= 0) {
      bool adjacent = (long)composed.size() - 1 == starter;
      bool blocked = !adjacent && (last_cc == 0 || last_cc >= ch.cc);
      if (!blocked) {
        uint32_t c = compose(composed[(size_t)starter].cp, ch.cp);
        if (c) {
          Ch& st = composed[(size_t)starter];
          st.cp = c;
          st.b = std::min(st.b, ch.b);
          st.e = std::max(st.e, ch.e);
          continue;
        }
      }
    }
    if (ch.cc == 0) starter = (long)composed.size();
    composed.push_back(ch);
    last_cc = ch.cc;
  }
  out.clear();
  if (out_begin) { out_begin->clear(); out_end->clear(); }
  for (const Ch& ch : composed) {
    size_t before = out.size();
    if (ch.cp & kRawByte) out.push_back((char)(ch.cp & 0xFF)); else append_utf8(out, ch.cp);
    if (out_begin)
      for (size_t k = before; k < out.size(); ++k) { out_begin->push_back(ch.b); out_end->push_back(ch.e); }
  }
  return true;
}

}  // namespace fastchat::unicode
