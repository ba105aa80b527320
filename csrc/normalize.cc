// The normalizers HF applies to each text segment between added tokens (normalizers/*.rs), with alignment.
#include "normalize.h"

#include "unicode.h"

namespace fastchat {

namespace {

void set_text(Buf& out) { out.text = out.owned; }

class Nfc : public Normalizer {
 public:
  bool apply(const Buf& in, Buf& out) const override {
    out.owned.clear();
    out.ob.clear();
    out.oe.clear();
    const uint32_t* pb = nullptr;  // null: identity alignment from in.base
    const uint32_t* pe = nullptr;
    if (!in.ob.empty()) { pb = in.ob.data(); pe = in.oe.data(); }
    if (!unicode::nfc(in.text, out.owned, pb, pe, in.base, &out.ob, &out.oe)) return false;
    set_text(out);
    return true;
  }
};

class Prepend : public Normalizer {
 public:
  explicit Prepend(std::string prefix) : prefix_(std::move(prefix)) {}
  bool apply(const Buf& in, Buf& out) const override {
    if (in.text.empty() || prefix_.empty()) return false;
    out.owned.assign(prefix_);
    out.owned.append(in.text.data(), in.text.size());
    // HF aligns prepended text to the first char.
    out.ob.assign(prefix_.size(), in.orig_begin(0));
    out.oe.assign(prefix_.size(), in.orig_end(unicode::char_len(in.text.data(), in.text.size(), 0) - 1));
    for (size_t i = 0; i < in.text.size(); ++i) { out.ob.push_back(in.orig_begin(i)); out.oe.push_back(in.orig_end(i)); }
    set_text(out);
    return true;
  }

 private:
  std::string prefix_;
};

class Replace : public Normalizer {
 public:
  Replace(std::string pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  bool apply(const Buf& in, Buf& out) const override {
    if (pattern_.empty() || in.text.find(pattern_) == std::string_view::npos) return false;
    out.owned.clear();
    out.ob.clear();
    out.oe.clear();
    size_t i = 0;
    while (i < in.text.size()) {
      if (in.text.compare(i, pattern_.size(), pattern_) == 0) {
        uint32_t b = in.orig_begin(i), e = in.orig_end(i + pattern_.size() - 1);
        out.owned.append(content_);
        out.ob.insert(out.ob.end(), content_.size(), b);
        out.oe.insert(out.oe.end(), content_.size(), e);
        i += pattern_.size();
      } else {
        out.owned.push_back(in.text[i]);
        out.ob.push_back(in.orig_begin(i));
        out.oe.push_back(in.orig_end(i));
        ++i;
      }
    }
    set_text(out);
    return true;
  }

 private:
  std::string pattern_, content_;
};

class NormSequence : public Normalizer {
 public:
  explicit NormSequence(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
  bool apply(const Buf& in, Buf& out) const override {
    bool changed = false;
    Buf a, b;
    const Buf* cur = &in;
    for (const auto& step : steps_) {
      Buf& dst = (cur == &a) ? b : a;
      if (step->apply(*cur, dst)) { cur = &dst; changed = true; }
    }
    if (!changed) return false;
    out.owned = cur->owned;
    out.ob = cur->ob;
    out.oe = cur->oe;
    set_text(out);
    return true;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

}  // namespace

std::unique_ptr<Normalizer> make_nfc() { return std::make_unique<Nfc>(); }
std::unique_ptr<Normalizer> make_prepend(std::string prefix) { return std::make_unique<Prepend>(std::move(prefix)); }
std::unique_ptr<Normalizer> make_replace(std::string pattern, std::string content) {
  return std::make_unique<Replace>(std::move(pattern), std::move(content));
}
std::unique_ptr<Normalizer> make_normalizer_sequence(std::vector<std::unique_ptr<Normalizer>> steps) {
  return std::make_unique<NormSequence>(std::move(steps));
}

std::string normalize_string(const Normalizer& n, const std::string& text) {
  Buf in, out;
  in.text = text;
  if (!n.apply(in, out)) return text;
  return out.owned;
}

}  // namespace fastchat
