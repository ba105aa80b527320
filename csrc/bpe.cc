// BPE merging with HF `tokenizers` semantics (models/bpe/word.rs): lowest merge rank first, leftmost on a
// tie. Short pieces use a rank scan over a flat array (cheaper than a heap below ~64 symbols, tiktoken's
// rationale); long pieces (SentencePiece-style files without a pre-tokenizer) use a heap with lazy deletion.
#include "bpe.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <queue>

#include "unicode.h"

namespace fastchat {

uint64_t hash_bytes(const char* s, size_t n) {
  uint64_t h = 0x243F6A8885A308D3ull ^ (n * 0x9E3779B97F4A7C15ull);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, s + i, 8);
    h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
  }
  if (i < n) {
    uint64_t w = 0;
    std::memcpy(&w, s + i, n - i);
    h = (h ^ w) * 0x94D049BB133111EBull;
    h ^= h >> 31;
  }
  h *= 0xFF51AFD7ED558CCDull;
  return h ^ (h >> 33);
}

// ------------------------------------------------------------------------------------------------ maps
void VocabMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  if (cap <= slots_.size()) return;
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(cap, Slot{0, 0, 0, -1});
  mask_ = cap - 1;
  for (const Slot& s : old) {
    if (s.id < 0) continue;
    size_t i = (size_t)s.hash & mask_;
    while (slots_[i].id >= 0) i = (i + 1) & mask_;
    slots_[i] = s;
  }
}

void VocabMap::grow() { reserve(slots_.empty() ? 8 : slots_.size()); }

bool VocabMap::insert(std::string_view key, int32_t id) {
  if ((count_ + 1) * 2 > slots_.size()) grow();
  uint64_t h = hash_bytes(key.data(), key.size());
  size_t i = (size_t)h & mask_;
  while (slots_[i].id >= 0) {
    const Slot& s = slots_[i];
    if (s.hash == h && s.len == key.size() && std::memcmp(arena_.data() + s.off, key.data(), key.size()) == 0)
      return false;
    i = (i + 1) & mask_;
  }
  slots_[i] = Slot{h, (uint32_t)arena_.size(), (uint32_t)key.size(), id};
  arena_.append(key.data(), key.size());
  ++count_;
  return true;
}

int32_t VocabMap::find(std::string_view key, uint64_t h) const {
  if (slots_.empty()) return -1;
  size_t i = (size_t)h & mask_;
  for (;;) {
    const Slot& s = slots_[i];
    if (s.id < 0) return -1;
    if (s.hash == h && s.len == key.size() && std::memcmp(arena_.data() + s.off, key.data(), key.size()) == 0)
      return s.id;
    i = (i + 1) & mask_;
  }
}

void PairMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  if (cap <= slots_.size()) return;
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(cap, Slot{kEmpty, 0, 0});
  mask_ = cap - 1;
  for (const Slot& s : old) {
    if (s.key == kEmpty) continue;
    size_t i = (size_t)((s.key * 0x9E3779B97F4A7C15ull) >> 20) & mask_;
    while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
    slots_[i] = s;
  }
}

void PairMap::insert(int32_t a, int32_t b, int32_t rank, int32_t merged) {
  if ((count_ + 1) * 2 > slots_.size()) reserve(count_ + 1 > 8 ? (count_ + 1) * 2 : 8);
  uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
  size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & mask_;
  while (slots_[i].key != kEmpty) {
    if (slots_[i].key == key) {  // a repeated merge: HF collects into a map, so the last one wins
      slots_[i].rank = rank;
      slots_[i].merged = merged;
      return;
    }
    i = (i + 1) & mask_;
  }
  slots_[i] = Slot{key, rank, merged};
  ++count_;
}

// ------------------------------------------------------------------------------------------ scratch
namespace {
// Two direct-mapped piece caches per thread and model: a small one (keys up to 16 bytes, up to 3 ids;
// 40-byte slots, 2.6 MB: 64k slots keep conflict misses rare on a novel's vocabulary, measured 1.4x over
// 8k slots) and a larger one for longer pieces. Eviction = overwrite.
constexpr size_t kSmallKey = 16, kSmallIds = 3, kSmallSlots = 1 << 16;
constexpr size_t kLargeKey = 63, kLargeIds = 16, kLargeSlots = 1 << 12;
struct SmallSlot {
  uint64_t key[2];     // zero-padded piece bytes
  int32_t ids[kSmallIds];
  uint8_t key_len, n;  // key_len 0 marks an empty slot (empty pieces are never looked up)
  uint8_t starts[kSmallIds], ends[kSmallIds];
};
struct LargeSlot {
  uint64_t hash;
  uint8_t key_len, n;
  char key[kLargeKey];
  int32_t ids[kLargeIds];
  uint8_t starts[kLargeIds], ends[kLargeIds];
};
std::atomic<uint64_t> g_serial{1};

inline uint64_t mix_words(uint64_t a, uint64_t b, uint64_t n) {
  uint64_t h = (a * 0x9E3779B97F4A7C15ull) ^ (b * 0xC2B2AE3D27D4EB4Full) ^ (n << 56);
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  return h ^ (h >> 32);
}
}  // namespace

struct BpeScratch {
  std::vector<int32_t> ids, tmp_ids;
  std::vector<uint32_t> starts, ends, tmp_spans;
  std::vector<int32_t> ranks;
  std::vector<int32_t> prev, next;
  std::vector<SmallSlot> small;
  std::vector<LargeSlot> large;
  BpeScratch() : small(kSmallSlots), large(kLargeSlots) {
    for (auto& s : small) s.key_len = 0;
    for (auto& s : large) s.key_len = 0;
  }
};

Bpe::Bpe() : serial_(g_serial.fetch_add(1)) {
  for (int i = 0; i < 256; ++i) byte_token[i] = byte_symbol_[i] = -1;
}
Bpe::~Bpe() = default;

void Bpe::finalize() {
  for (int b = 0; b < 256; ++b) {
    char c = (char)b;
    byte_symbol_[b] = (byte_level || b < 0x80) ? vocab.find(std::string_view(&c, 1)) : -1;
  }
}

BpeScratch& Bpe::scratch() const {
  // A few models per thread at most; the oldest is dropped (tests create many tokenizers).
  thread_local std::vector<std::pair<uint64_t, std::unique_ptr<BpeScratch>>> per_model;
  for (auto& entry : per_model)
    if (entry.first == serial_) return *entry.second;
  if (per_model.size() >= 4) per_model.erase(per_model.begin());
  per_model.emplace_back(serial_, std::make_unique<BpeScratch>());
  return *per_model.back().second;
}

// ------------------------------------------------------------------------------------------- encode
// Uncached encoding of a piece into sc.tmp_ids / sc.tmp_spans: the whole piece when ignore_merges finds
// it in the vocab (HF looks it up before any merge), else the merges.
void Bpe::compute(std::string_view piece, BpeScratch& sc) const {
  sc.tmp_ids.clear();
  sc.tmp_spans.clear();
  if (ignore_merges) {
    int32_t id = vocab.find(piece);
    if (id >= 0) {
      sc.tmp_ids.push_back(id);
      sc.tmp_spans.push_back(0);
      sc.tmp_spans.push_back((uint32_t)piece.size());
      return;
    }
  }
  encode_uncached(piece, sc.tmp_ids, sc.tmp_spans, sc);
}

void Bpe::encode(std::string_view piece, std::vector<int32_t>& ids, std::vector<uint32_t>* spans,
                 BpeScratch& sc) const {
  size_t n = piece.size();
  if (n == 0) return;
  if (n <= kSmallKey) {
    uint64_t w[2] = {0, 0};
    std::memcpy(w, piece.data(), n);
    SmallSlot& slot = sc.small[(size_t)mix_words(w[0], w[1], n) & (kSmallSlots - 1)];
    if (slot.key_len == n && slot.key[0] == w[0] && slot.key[1] == w[1]) {
      ids.insert(ids.end(), slot.ids, slot.ids + slot.n);
      if (spans)
        for (uint8_t k = 0; k < slot.n; ++k) { spans->push_back(slot.starts[k]); spans->push_back(slot.ends[k]); }
      return;
    }
    compute(piece, sc);
    if (sc.tmp_ids.size() <= kSmallIds) {
      slot.key[0] = w[0];
      slot.key[1] = w[1];
      slot.key_len = (uint8_t)n;
      slot.n = (uint8_t)sc.tmp_ids.size();
      for (size_t k = 0; k < sc.tmp_ids.size(); ++k) {
        slot.ids[k] = sc.tmp_ids[k];
        slot.starts[k] = (uint8_t)sc.tmp_spans[2 * k];
        slot.ends[k] = (uint8_t)sc.tmp_spans[2 * k + 1];
      }
    }
  } else if (n <= kLargeKey) {
    uint64_t h = hash_bytes(piece.data(), n);
    LargeSlot& slot = sc.large[(size_t)h & (kLargeSlots - 1)];
    if (slot.key_len == n && slot.hash == h && std::memcmp(slot.key, piece.data(), n) == 0) {
      ids.insert(ids.end(), slot.ids, slot.ids + slot.n);
      if (spans)
        for (uint8_t k = 0; k < slot.n; ++k) { spans->push_back(slot.starts[k]); spans->push_back(slot.ends[k]); }
      return;
    }
    compute(piece, sc);
    if (sc.tmp_ids.size() <= kLargeIds) {
      slot.hash = h;
      slot.key_len = (uint8_t)n;
      std::memcpy(slot.key, piece.data(), n);
      slot.n = (uint8_t)sc.tmp_ids.size();
      for (size_t k = 0; k < sc.tmp_ids.size(); ++k) {
        slot.ids[k] = sc.tmp_ids[k];
        slot.starts[k] = (uint8_t)sc.tmp_spans[2 * k];
        slot.ends[k] = (uint8_t)sc.tmp_spans[2 * k + 1];
      }
    }
  } else {
    compute(piece, sc);
  }
  ids.insert(ids.end(), sc.tmp_ids.begin(), sc.tmp_ids.end());
  if (spans) spans->insert(spans->end(), sc.tmp_spans.begin(), sc.tmp_spans.end());
}

void Bpe::encode_uncached(std::string_view piece, std::vector<int32_t>& out_ids, std::vector<uint32_t>& out_spans,
                          BpeScratch& sc) const {
  // 1. Initial symbols (HF merge_word): a vocab hit flushes a pending unk; a miss tries byte fallback,
  //    then unk (fused or not); with neither the char is dropped.
  std::vector<int32_t>& ids = sc.ids;
  // Each symbol covers piece bytes [starts, ends); a dropped char leaves a gap its neighbours merge across.
  std::vector<uint32_t>& starts = sc.starts;
  std::vector<uint32_t>& ends = sc.ends;
  ids.clear();
  starts.clear();
  ends.clear();
  auto add = [&](int32_t id, size_t b, size_t e) { ids.push_back(id); starts.push_back((uint32_t)b); ends.push_back((uint32_t)e); };
  const char* s = piece.data();
  size_t n = piece.size();
  int64_t unk_begin = -1, unk_end = -1;  // a pending unk symbol
  for (size_t i = 0; i < n;) {
    unsigned char c = (unsigned char)s[i];
    size_t len = 1;
    int32_t id;
    if (byte_level || c < 0x80) {
      id = byte_symbol_[c];
    } else {
      len = unicode::char_len(s, n, i);
      id = vocab.find(std::string_view(s + i, len));
    }
    if (id >= 0) {
      if (unk_begin >= 0) { add(unk_id, (size_t)unk_begin, (size_t)unk_end); unk_begin = -1; }
      add(id, i, i + len);
    } else {
      bool done = false;
      if (byte_fallback) {
        bool all = true;
        for (size_t k = 0; k < len; ++k) all = all && byte_token[(unsigned char)s[i + k]] >= 0;
        if (all) {
          for (size_t k = 0; k < len; ++k) add(byte_token[(unsigned char)s[i + k]], i + k, i + k + 1);
          done = true;
        }
      }
      if (!done && unk_id >= 0) {
        if (unk_begin >= 0 && fuse_unk) {
          unk_end = (int64_t)(i + len);
        } else {
          if (unk_begin >= 0) add(unk_id, (size_t)unk_begin, (size_t)unk_end);
          unk_begin = (int64_t)i;
          unk_end = (int64_t)(i + len);
        }
      }
    }
    i += len;
  }
  if (unk_begin >= 0) add(unk_id, (size_t)unk_begin, (size_t)unk_end);

  size_t m = ids.size();
  auto emit = [&](size_t k) {
    out_ids.push_back(ids[k]);
    out_spans.push_back(starts[k]);
    out_spans.push_back(ends[k]);
  };
  if (m <= 1) {
    if (m) emit(0);
    return;
  }
  constexpr int32_t kNone = INT32_MAX;
  if (m <= 64) {
    // 2a. Rank scan: ranks[i] is the rank of the pair (i, i+1); merge the lowest, leftmost first.
    std::vector<int32_t>& ranks = sc.ranks;
    ranks.assign(m, kNone);
    std::vector<int32_t>& merged = sc.prev;  // merged id of each pair
    merged.assign(m, -1);
    auto set_pair = [&](size_t i) {
      int32_t r, nid;
      if (i + 1 < m && merges.find(ids[i], ids[i + 1], r, nid)) { ranks[i] = r; merged[i] = nid; }
      else { ranks[i] = kNone; merged[i] = -1; }
    };
    for (size_t i = 0; i + 1 < m; ++i) set_pair(i);
    for (;;) {
      int32_t best = kNone;
      size_t at = 0;
      for (size_t i = 0; i + 1 < m; ++i)
        if (ranks[i] < best) { best = ranks[i]; at = i; }
      if (best == kNone) break;
      ids[at] = merged[at];
      ends[at] = ends[at + 1];
      ids.erase(ids.begin() + (long)at + 1);
      starts.erase(starts.begin() + (long)at + 1);
      ends.erase(ends.begin() + (long)at + 1);
      ranks.erase(ranks.begin() + (long)at + 1);
      merged.erase(merged.begin() + (long)at + 1);
      --m;
      set_pair(at);
      if (at > 0) set_pair(at - 1);
    }
    for (size_t k = 0; k < m; ++k) emit(k);
    return;
  }
  // 2b. Heap over (rank, position) with lazy deletion, as HF's Word::merge_all.
  constexpr uint32_t kDead = UINT32_MAX;
  std::vector<int32_t>& prev = sc.prev;
  std::vector<int32_t>& next = sc.next;
  prev.resize(m);
  next.resize(m);
  for (size_t i = 0; i < m; ++i) { prev[i] = (int32_t)i - 1; next[i] = i + 1 < m ? (int32_t)i + 1 : -1; }
  struct Cand { int32_t rank, pos, merged; };
  auto worse = [](const Cand& a, const Cand& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
  std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
  for (size_t i = 0; i + 1 < m; ++i) {
    int32_t r, nid;
    if (merges.find(ids[i], ids[i + 1], r, nid)) heap.push({r, (int32_t)i, nid});
  }
  while (!heap.empty()) {
    Cand top = heap.top();
    heap.pop();
    size_t p = (size_t)top.pos;
    if (ends[p] == kDead || next[p] < 0) continue;
    size_t q = (size_t)next[p];
    int32_t r, nid;
    if (!merges.find(ids[p], ids[q], r, nid) || nid != top.merged) continue;
    ids[p] = nid;
    ends[p] = ends[q];
    ends[q] = kDead;
    next[p] = next[q];
    if (next[q] >= 0) prev[(size_t)next[q]] = (int32_t)p;
    if (prev[p] >= 0 && merges.find(ids[(size_t)prev[p]], ids[p], r, nid)) heap.push({r, prev[p], nid});
    if (next[p] >= 0 && merges.find(ids[p], ids[(size_t)next[p]], r, nid)) heap.push({r, (int32_t)p, nid});
  }
  for (int32_t i = 0; i >= 0; i = next[(size_t)i]) emit((size_t)i);
}

}  // namespace fastchat
