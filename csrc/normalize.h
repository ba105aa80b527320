// HF normalizers (NFC, Prepend, Replace with a literal, Sequence) over aligned buffers: each output byte
// keeps the input span it came from, so token offsets can be mapped back to the caller's bytes.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "pretokenize.h"

namespace fastchat {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // Normalizes `in` into `out` (out.text points at out.owned); returns false when `in` is unchanged (then
  // `out` is untouched and the caller keeps using `in`).
  virtual bool apply(const Buf& in, Buf& out) const = 0;
};

std::unique_ptr<Normalizer> make_nfc();
std::unique_ptr<Normalizer> make_prepend(std::string prefix);
std::unique_ptr<Normalizer> make_replace(std::string pattern, std::string content);
std::unique_ptr<Normalizer> make_normalizer_sequence(std::vector<std::unique_ptr<Normalizer>> steps);

// Normalizes a plain string (no alignment), e.g. an added token's content for the normalized pass.
std::string normalize_string(const Normalizer& n, const std::string& text);

}  // namespace fastchat
