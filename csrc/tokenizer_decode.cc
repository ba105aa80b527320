// Decoding as HF does it (decoders/*.rs): ids -> token strings -> the decoder chain -> one string.
// Invalid UTF-8 produced by byte-level or byte-fallback tokens becomes U+FFFD exactly where Rust's
// from_utf8_lossy / from_utf8 put it.
#include <unordered_map>

#include "tokenizer_impl.h"
#include "unicode.h"

namespace fastchat {

namespace {

// Rust String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  const unsigned char* s = (const unsigned char*)bytes.data();
  size_t n = bytes.size(), i = 0;
  while (i < n) {
    int len;
    uint32_t cp = unicode::decode((const char*)s, n, i, len);
    if (cp != 0xFFFFFFFFu) {
      out.append((const char*)s + i, (size_t)len);
      i += (size_t)len;
      continue;
    }
    // Length of the maximal prefix of a well-formed sequence starting at i (at least 1 byte).
    unsigned char c = s[i];
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) { need = 2; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { need = 3; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    size_t k = i + 1;
    if (need) {
      if (k < n && s[k] >= lo && s[k] <= hi) {
        ++k;
        for (size_t m = 1; m < need && k < n && s[k] >= 0x80 && s[k] <= 0xBF; ++m) ++k;
      }
    }
    out.append("\xEF\xBF\xBD");
    i = k;
  }
  return out;
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    int len;
    if (unicode::decode(s.data(), s.size(), i, len) == 0xFFFFFFFFu) return false;
    i += (size_t)len;
  }
  return true;
}

const std::unordered_map<uint32_t, unsigned char>& char_to_byte() {
  static const std::unordered_map<uint32_t, unsigned char> table = [] {
    std::unordered_map<uint32_t, unsigned char> t;
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      t[printable ? b : 256 + extra++] = (unsigned char)b;
    }
    return t;
  }();
  return table;
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  std::string out;
  size_t i = 0, at;
  while ((at = s.find(from, i)) != std::string::npos) {
    out.append(s, i, at - i);
    out.append(to);
    i = at + from.size();
  }
  out.append(s, i, std::string::npos);
  return out;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

void apply_step(const DecodeStep& step, std::vector<std::string>& tokens) {
  switch (step.kind) {
    case DecodeStep::ByteLevel: {
      const auto& c2b = char_to_byte();
      std::string bytes;
      for (const std::string& t : tokens) {
        std::string mapped;
        bool ok = true;
        for (size_t i = 0; i < t.size() && ok;) {
          int len;
          uint32_t cp = unicode::decode(t.data(), t.size(), i, len);
          auto it = c2b.find(cp);
          if (it == c2b.end()) ok = false; else mapped.push_back((char)it->second);
          i += (size_t)len;
        }
        bytes += ok ? mapped : t;
      }
      tokens.assign(1, utf8_lossy(bytes));
      break;
    }
    case DecodeStep::Metaspace:
      for (size_t k = 0; k < tokens.size(); ++k)
        tokens[k] = replace_all(tokens[k], step.a, (k == 0 && step.prepend_scheme != 2) ? "" : " ");
      break;
    case DecodeStep::Replace:
      for (std::string& t : tokens) t = replace_all(t, step.a, step.b);
      break;
    case DecodeStep::ByteFallback: {
      std::vector<std::string> out;
      std::string pending;
      size_t n_pending = 0;
      auto flush = [&] {
        if (!n_pending) return;
        if (valid_utf8(pending)) out.push_back(pending);
        else for (size_t k = 0; k < n_pending; ++k) out.push_back("\xEF\xBF\xBD");
        pending.clear();
        n_pending = 0;
      };
      for (std::string& t : tokens) {
        int hi = -1, lo = -1;
        if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') { hi = hex_value(t[3]); lo = hex_value(t[4]); }
        if (hi >= 0 && lo >= 0) {
          pending.push_back((char)(hi * 16 + lo));
          ++n_pending;
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      tokens.swap(out);
      break;
    }
    case DecodeStep::Fuse: {
      std::string all;
      for (const std::string& t : tokens) all += t;
      tokens.assign(1, all);
      break;
    }
    case DecodeStep::Strip:
      for (std::string& t : tokens) {
        // Counts are in chars; the content is one char.
        size_t b = 0, e = t.size();
        for (size_t k = 0; k < step.start && t.compare(b, step.a.size(), step.a) == 0 && b + step.a.size() <= e; ++k)
          b += step.a.size();
        for (size_t k = 0; k < step.stop && e >= b + step.a.size() && t.compare(e - step.a.size(), step.a.size(), step.a) == 0; ++k)
          e -= step.a.size();
        t = t.substr(b, e - b);
      }
      break;
  }
}

}  // namespace

std::string TokenizerImpl::decode(const int32_t* ids, size_t n, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    int32_t id = ids[k];
    if (id < 0 || (size_t)id >= id_tokens.size()) continue;
    if (skip_special_tokens && is_special(id)) continue;
    if (id_tokens[(size_t)id].empty() && (added_index[(size_t)id] < 0)) continue;
    tokens.push_back(id_tokens[(size_t)id]);
  }
  if (!has_decoder) {
    std::string out;
    for (size_t k = 0; k < tokens.size(); ++k) {
      if (k) out.push_back(' ');
      out += tokens[k];
    }
    return out;
  }
  for (const DecodeStep& step : decoders) apply_step(step, tokens);
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

}  // namespace fastchat
