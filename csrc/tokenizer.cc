// The encode pipeline, in HF's order: added tokens on the raw text (plus the caller's control spans),
// normalizer per remaining segment, added tokens with normalized=true, pre-tokenizer, BPE, post-processor.
// Also the batch thread pool and the id/token lookups. Loading is in tokenizer_load.cc, decoding in
// tokenizer_decode.cc.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "tokenizer_impl.h"
#include "unicode.h"

namespace fastchat {

TokenizerError::TokenizerError(std::string component_, const std::string& reason)
    : std::runtime_error(component_ + ": " + reason), component(std::move(component_)) {}

// ------------------------------------------------------------------------------------ added tokens
void AddedMatcher::add(const std::string& content, int32_t token_index) {
  if (content.empty()) return;
  int32_t node = 0;
  for (unsigned char c : content) {
    uint64_t key = ((uint64_t)(uint32_t)node << 8) | c;
    auto it = edges_.find(key);
    if (it == edges_.end()) {
      nodes_.push_back(Node{});
      it = edges_.emplace(key, (int32_t)nodes_.size() - 1).first;
    }
    node = it->second;
  }
  if (nodes_[(size_t)node].token < 0) nodes_[(size_t)node].token = token_index;
  first_[(unsigned char)content[0]] = true;
}

int32_t AddedMatcher::longest(const char* s, size_t limit, size_t i, size_t& end) const {
  int32_t node = 0, best = -1;
  for (size_t k = i; k < limit; ++k) {
    auto it = edges_.find(((uint64_t)(uint32_t)node << 8) | (unsigned char)s[k]);
    if (it == edges_.end()) break;
    node = it->second;
    if (nodes_[(size_t)node].token >= 0) { best = nodes_[(size_t)node].token; end = k + 1; }
  }
  return best;
}

namespace {

bool space_at(const char* s, size_t n, size_t i, int& len) {
  uint32_t cp = unicode::decode(s, n, i, len);
  return cp != 0xFFFFFFFFu && (unicode::flags(cp) & unicode::kSpace);
}

// Start of the whitespace run that ends at `end` (HF space_leftmost_at_end).
size_t whitespace_before(const char* s, size_t end) {
  size_t i = end;
  while (i > 0) {
    size_t k = i - 1;
    while (k > 0 && ((unsigned char)s[k] & 0xC0) == 0x80 && i - k < 4) --k;
    int len;
    if (!space_at(s, end, k, len) || k + (size_t)len != i) break;
    i = k;
  }
  return i;
}

size_t whitespace_after(const char* s, size_t n, size_t i) {
  while (i < n) {
    int len;
    if (!space_at(s, n, i, len)) break;
    i += (size_t)len;
  }
  return i;
}

bool word_char_before(const char* s, size_t at) {
  if (at == 0) return false;
  size_t k = at - 1;
  while (k > 0 && ((unsigned char)s[k] & 0xC0) == 0x80 && at - k < 4) --k;
  int len;
  uint32_t cp = unicode::decode(s, at, k, len);
  return cp != 0xFFFFFFFFu && (unicode::flags(cp) & unicode::kWord);
}

bool word_char_at(const char* s, size_t n, size_t at) {
  if (at >= n) return false;
  int len;
  uint32_t cp = unicode::decode(s, n, at, len);
  return cp != 0xFFFFFFFFu && (unicode::flags(cp) & unicode::kWord);
}

}  // namespace

// HF AddedVocabulary::find_matches, plus control spans that are always matched as their token.
void TokenizerImpl::find_added(std::string_view text, const AddedMatcher& matcher, bool allow_special,
                               const std::vector<std::pair<uint32_t, uint32_t>>* control,
                               std::vector<Split>& out) const {
  const char* s = text.data();
  size_t n = text.size();
  size_t start_offset = 0, i = 0, ci = 0;
  size_t n_control = control ? control->size() : 0;
  while (i < n) {
    size_t limit = ci < n_control ? std::min<size_t>((*control)[ci].first, n) : n;
    int32_t tok = -1;
    size_t mstart = i, mend = i;
    if (ci < n_control && (*control)[ci].first <= i) {
      auto span = (*control)[ci++];
      if (span.first < i || span.second > n || span.second <= span.first)
        throw std::invalid_argument("control span [" + std::to_string(span.first) + ", " + std::to_string(span.second) +
                                    ") is out of order, empty or outside the text");
      auto it = added_by_content.find(std::string(text.substr(span.first, span.second - span.first)));
      if (it == added_by_content.end())
        throw std::invalid_argument("control span [" + std::to_string(span.first) + ", " + std::to_string(span.second) +
                                    ") is not an added token of this tokenizer");
      tok = it->second;
      mstart = span.first;
      mend = span.second;
    } else {
      while (i < limit && !matcher.may_start((unsigned char)s[i])) ++i;
      if (i >= limit) { i = limit; continue; }
      tok = matcher.longest(s, limit, i, mend);
      if (tok < 0) { ++i; continue; }
      mstart = i;
      const AddedToken& t = added[(size_t)tok];
      if (t.special && !allow_special) { i = mend; continue; }
      if (t.single_word && (word_char_before(s, mstart) || word_char_at(s, n, mend))) { i = mend; continue; }
    }
    const AddedToken& t = added[(size_t)tok];
    size_t start = mstart, stop = mend;
    if (t.lstrip) start = std::max(whitespace_before(s, start), start_offset);
    if (t.rstrip) stop = whitespace_after(s, n, stop);
    if (start > start_offset) out.push_back({-1, (uint32_t)start_offset, (uint32_t)start});
    out.push_back({tok, (uint32_t)start, (uint32_t)stop});
    start_offset = stop;
    i = std::max(mend, stop);
  }
  if (start_offset < n) out.push_back({-1, (uint32_t)start_offset, (uint32_t)n});
}

// ------------------------------------------------------------------------------------------ encode
void TokenizerImpl::encode(std::string_view text, const EncodeOptions& options, Encoding& out) const {
  if (options.add_special_tokens)
    for (int32_t id : post_prefix) {
      out.ids.push_back(id);
      if (options.offsets) { out.starts.push_back(0); out.ends.push_back(0); }
    }
  std::vector<Split> splits;
  if (raw_matcher.empty() && !(options.control_spans && !options.control_spans->empty()))
    splits.push_back({-1, 0, (uint32_t)text.size()});
  else
    find_added(text, raw_matcher, options.allow_special, options.control_spans, splits);
  for (const Split& sp : splits) {
    if (sp.token >= 0) {
      out.ids.push_back(added[(size_t)sp.token].id);
      if (options.offsets) { out.starts.push_back(sp.b); out.ends.push_back(sp.e); }
    } else if (sp.e > sp.b) {
      encode_segment(text.substr(sp.b, sp.e - sp.b), sp.b, options, out);
    }
  }
  if (options.add_special_tokens)
    for (int32_t id : post_suffix) {
      out.ids.push_back(id);
      if (options.offsets) { out.starts.push_back((uint32_t)text.size()); out.ends.push_back((uint32_t)text.size()); }
    }
}

void TokenizerImpl::encode_segment(std::string_view text, uint32_t base, const EncodeOptions& options,
                                   Encoding& out) const {
  BpeScratch& sc = bpe.scratch();
  if (fused && !normalizer && normalized_matcher.empty()) {
    // Fast path: scanner pieces are views of the input; no buffers, no piece list.
    const char* s = text.data();
    size_t n = text.size();
    std::vector<uint32_t> spans;
    for (size_t i = 0; i < n;) {
      size_t e = scan(fused_grammar, s, n, i);
      if (options.offsets) {
        spans.clear();
        size_t before = out.ids.size();
        bpe.encode(std::string_view(s + i, e - i), out.ids, &spans, sc);
        for (size_t k = 0; k < out.ids.size() - before; ++k) {
          out.starts.push_back(base + (uint32_t)i + spans[2 * k]);
          out.ends.push_back(base + (uint32_t)i + spans[2 * k + 1]);
        }
      } else {
        bpe.encode(std::string_view(s + i, e - i), out.ids, nullptr, sc);
      }
      i = e;
    }
    return;
  }
  Pieces p;
  Buf& seg = p.add_buf();
  seg.text = text;
  seg.base = base;
  uint32_t seg_index = 0;
  if (normalizer) {
    Buf& norm = p.add_buf();
    if (normalizer->apply(seg, norm)) seg_index = 1; else p.bufs.pop_back();
  }
  const Buf& work = p.bufs[seg_index];
  std::vector<Split> splits;
  if (normalized_matcher.empty())
    splits.push_back({-1, 0, (uint32_t)work.text.size()});
  else
    find_added(work.text, normalized_matcher, options.allow_special, nullptr, splits);
  for (const Split& sp : splits) {
    if (sp.token >= 0) {
      out.ids.push_back(added[(size_t)sp.token].id);
      if (options.offsets) {
        out.starts.push_back(work.span_begin(sp.b));
        out.ends.push_back(work.span_end(sp.b, sp.e));
      }
      continue;
    }
    if (sp.e <= sp.b) continue;
    p.list.clear();
    p.list.push_back({seg_index, sp.b, sp.e});
    if (pre_tokenizer) pre_tokenizer->apply(p);
    encode_pieces(p, options.offsets, out);
  }
}

void TokenizerImpl::encode_pieces(Pieces& p, bool offsets, Encoding& out) const {
  BpeScratch& sc = bpe.scratch();
  std::vector<uint32_t> spans;
  for (const Piece& pc : p.list) {
    const Buf& buf = p.bufs[pc.buf];
    std::string_view piece = buf.text.substr(pc.b, pc.e - pc.b);
    if (!offsets) {
      bpe.encode(piece, out.ids, nullptr, sc);
      continue;
    }
    spans.clear();
    size_t before = out.ids.size();
    bpe.encode(piece, out.ids, &spans, sc);
    for (size_t k = 0; k < out.ids.size() - before; ++k) {
      size_t b = pc.b + spans[2 * k], e = pc.b + spans[2 * k + 1];
      out.starts.push_back(buf.span_begin(b));
      out.ends.push_back(buf.span_end(b, e));
    }
  }
}

// ------------------------------------------------------------------------------------------- batch
namespace {

// A process-wide pool of persistent workers, so each worker keeps its per-thread piece caches warm.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destruction order
    return *pool;
  }
  // Runs fn(i) for i in [0, n) on up to `threads` threads (the caller included).
  void run(size_t n, int threads, const std::function<void(size_t)>& fn) {
    std::lock_guard<std::mutex> serial(call_mu_);
    size_t want = std::min<size_t>((size_t)std::max(threads, 1), n);
    if (want <= 1) {
      for (size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::unique_lock<std::mutex> lk(mu_);
      while (workers_.size() < want - 1) workers_.emplace_back([this, k = workers_.size()] { loop(k); });
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      active_ = want - 1;
      pending_ = want - 1;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    try {
      for (size_t i; (i = next_.fetch_add(1)) < n_;) (*fn_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
      next_.store(n_);
    }
  }
  void loop(size_t index) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen && index < active_; });
        seen = generation_;
      }
      work();
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }
  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_ = 0, active_ = 0, pending_ = 0;
  std::atomic<size_t> next_{0};
  uint64_t generation_ = 0;
  std::exception_ptr error_;
};

}  // namespace

std::vector<std::vector<int32_t>> TokenizerImpl::encode_batch(const std::vector<std::string_view>& texts,
                                                              const EncodeOptions& options, int threads) const {
  std::vector<std::vector<int32_t>> result(texts.size());
  if (threads <= 0) threads = (int)std::max(1u, std::thread::hardware_concurrency());
  EncodeOptions opts = options;
  opts.offsets = false;
  opts.control_spans = nullptr;
  Pool::get().run(texts.size(), threads, [&](size_t i) {
    Encoding enc;
    encode(texts[i], opts, enc);
    result[i] = std::move(enc.ids);
  });
  return result;
}

// ----------------------------------------------------------------------------------------- lookups
int32_t TokenizerImpl::token_to_id(std::string_view token) const {
  auto a = added_by_content.find(std::string(token));
  if (a != added_by_content.end()) return added[(size_t)a->second].id;
  auto it = token_ids.find(std::string(token));
  return it == token_ids.end() ? -1 : it->second;
}

std::string TokenizerImpl::id_to_token(int32_t id) const {
  if (id < 0 || (size_t)id >= id_tokens.size()) return "";
  return id_tokens[(size_t)id];
}

bool TokenizerImpl::is_special(int32_t id) const {
  if (id < 0 || (size_t)id >= added_index.size() || added_index[(size_t)id] < 0) return false;
  return added[(size_t)added_index[(size_t)id]].special;
}

std::shared_ptr<Tokenizer> Tokenizer::from_json(std::string_view json_text) { return load_tokenizer(json_text); }

}  // namespace fastchat
