// The BPE model of a tokenizer.json with HF's exact merge semantics: initial symbols are bytes (byte-level
// vocabularies) or UTF-8 chars, the lowest merge rank wins with ties to the leftmost pair, then byte
// fallback, unk/fuse_unk and ignore_merges. Knows nothing of normalizers, pre-tokenizers or added tokens.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace fastchat {

uint64_t hash_bytes(const char* s, size_t n);

// bytes -> id, open addressing over one arena of key bytes (no per-key allocation).
class VocabMap {
 public:
  void reserve(size_t n);
  bool insert(std::string_view key, int32_t id);  // false when the key is already present
  int32_t find(std::string_view key) const { return find(key, hash_bytes(key.data(), key.size())); }
  int32_t find(std::string_view key, uint64_t h) const;
  size_t size() const { return count_; }

 private:
  struct Slot { uint64_t hash; uint32_t off, len; int32_t id; };
  void grow();
  std::vector<Slot> slots_;
  std::string arena_;
  size_t count_ = 0;
  size_t mask_ = 0;
};

// (left id, right id) -> (rank, merged id), open addressing on a 64-bit key.
class PairMap {
 public:
  void reserve(size_t n);
  void insert(int32_t a, int32_t b, int32_t rank, int32_t merged);  // a repeated pair: the last one wins (HF)
  bool find(int32_t a, int32_t b, int32_t& rank, int32_t& merged) const {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t i = (size_t)((key * 0x9E3779B97F4A7C15ull) >> 20) & mask_;
    for (;;) {
      const Slot& s = slots_[i];
      if (s.key == key) { rank = s.rank; merged = s.merged; return true; }
      if (s.key == kEmpty) return false;
      i = (i + 1) & mask_;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~0ull;
  struct Slot { uint64_t key; int32_t rank, merged; };
  std::vector<Slot> slots_;
  size_t count_ = 0;
  size_t mask_ = 0;
};

struct BpeScratch;  // per-thread working memory and piece cache (defined in bpe.cc)

class Bpe {
 public:
  Bpe();
  ~Bpe();
  VocabMap vocab;
  PairMap merges;
  bool byte_level = false;     // symbols are single bytes (vocab keys already mapped back from ByteLevel chars)
  bool ignore_merges = false;  // a piece that is itself in the vocab is one token
  bool byte_fallback = false;
  int32_t unk_id = -1;
  bool fuse_unk = false;
  int32_t byte_token[256];     // id of "<0xXX>" (byte fallback), -1 when absent

  void finalize();  // after vocab/merges are filled: builds the per-byte symbol table

  // Appends the ids of `piece` and, when `spans` is given, each token's [begin, end) bytes in the piece
  // (two entries per token; a dropped char, with neither unk nor byte fallback, belongs to no token).
  void encode(std::string_view piece, std::vector<int32_t>& ids, std::vector<uint32_t>* spans,
              BpeScratch& scratch) const;

  // Per-thread scratch for this model (created on first use in each thread; bounded, never shared).
  BpeScratch& scratch() const;

 private:
  void compute(std::string_view piece, BpeScratch& scratch) const;
  void encode_uncached(std::string_view piece, std::vector<int32_t>& ids, std::vector<uint32_t>& spans,
                       BpeScratch& scratch) const;
  int32_t byte_symbol_[256];
  uint64_t serial_;
};

}  // namespace fastchat
