// Duplicate and distinctness sketches for the dataset tools: exact-duplicate hashes, MinHash signatures
// over word shingles with LSH banding (near duplicates), union-find groups for leak-free splits, and a
// HyperLogLog counter for distinct n-grams. Knows nothing of chats, files or Python.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace fastchat::dedup {

// 64-bit hash of bytes (FNV-1a core, finished with a strong mixer so every output bit depends on every byte).
uint64_t hash_bytes(std::string_view s, uint64_t seed = 0);
uint64_t mix64(uint64_t x);

// Text as the near-duplicate check sees it: ASCII letters lower-cased; every run of ASCII bytes that are not
// letters or digits becomes one space; non-ASCII UTF-8 bytes are kept (words in other scripts still count).
void normalize(std::string_view text, std::string& out);

// Calls f(hash) for each word k-gram of normalized text (one hash per shingle); a text with fewer than k words
// yields one shingle of all its words, an empty text none.
template <class F>
void for_each_shingle(std::string_view norm, int k, F&& f);

constexpr int kNumPerm = 64;  // MinHash size
constexpr int kBands = 8;     // LSH: 8 bands of 8 rows -> a pair with Jaccard J is a candidate with
constexpr int kRows = 8;      // probability 1-(1-J^8)^8: 0.99 at J=0.9, 0.77 at J=0.8, 0.03 at J=0.5
constexpr int kChainWalk = 8;

struct Signature {
  uint32_t v[kNumPerm];
  bool empty = true;  // the text had no shingle
};

// MinHash of a text's word k-gram set (normalised as above).
void minhash(std::string_view normalized, int k, Signature& out);

// Exact-duplicate and near-duplicate index over records added in order 0, 1, 2, ...; memory is about
// 250-400 bytes per record (hash tables at 25-50% load, 64 one-byte signature slots, bucket chains, union-find
// parent; about 50 with near_enabled false). A new
// record is verified against up to kChainWalk earlier members of each bucket it lands in.
class DupIndex {
 public:
  // near_enabled false: exact duplicates only, and no per-record signature storage (about 30 bytes per record).
  explicit DupIndex(double near_threshold = 0.8, bool near_enabled = true)
      : threshold_(near_threshold), near_enabled_(near_enabled) {}
  struct Match {
    int64_t exact_of = -1;  // earlier record with the same exact hash
    int64_t near_of = -1;   // earlier record whose estimated Jaccard similarity >= threshold
    float similarity = 0;
  };
  // `near` false: only the exact hash is indexed (the record joins no near-duplicate bucket).
  Match add(uint64_t exact_hash, const Signature& sig, bool near);
  // Group of a record: records joined by exact or near duplication (transitively) share one root id.
  uint32_t group(uint32_t id);
  size_t size() const { return parent_.size(); }
  size_t memory_bytes() const;

 private:
  // Open addressing, key 0 reserved as empty; values are record ids.
  struct Table {
    std::vector<uint64_t> keys;
    std::vector<uint32_t> vals;
    size_t used = 0;
    // Returns the value stored under key, or inserts `val` and returns UINT32_MAX.
    uint32_t find_or_insert(uint64_t key, uint32_t val);
    // Stores `val` under key and returns the previous value (UINT32_MAX when the key was new).
    uint32_t exchange(uint64_t key, uint32_t val);
    void grow();
  };
  double threshold_;
  bool near_enabled_;
  Table exact_, bands_;
  std::vector<uint8_t> small_sigs_;  // kNumPerm low bytes per record (b-bit MinHash, b = 8)
  std::vector<uint32_t> chain_;      // per record and band: the previous record in the same bucket
  std::vector<uint32_t> parent_;
  uint32_t find(uint32_t x);
  void unite(uint32_t a, uint32_t b);
  double similarity(uint32_t a, uint32_t b) const;
};

// HyperLogLog distinct counter (2^14 registers, ~0.8% standard error), mergeable across threads.
class DistinctCounter {
 public:
  DistinctCounter() : reg_(1u << kP, 0) {}
  void add(uint64_t hash);
  void merge(const DistinctCounter& other);
  double estimate() const;

 private:
  static constexpr int kP = 14;
  std::vector<uint8_t> reg_;
};

// ------------------------------------------------------------------------------- inline template body
template <class F>
void for_each_shingle(std::string_view norm, int k, F&& f) {
  // Word boundaries are single spaces in normalised text; keep the start offsets of the last k words.
  size_t i = 0, n = norm.size();
  auto word_end = [&](size_t b) {
    size_t e = b;
    while (e < n && norm[e] != ' ') ++e;
    return e;
  };
  size_t words = 0;
  std::vector<size_t> ring(static_cast<size_t>(k), 0);
  size_t last_end = 0;
  while (i < n) {
    while (i < n && norm[i] == ' ') ++i;
    if (i >= n) break;
    size_t e = word_end(i);
    ring[words % k] = i;
    ++words;
    last_end = e;
    if (words >= static_cast<size_t>(k)) {
      size_t first = ring[words % k];  // start of the oldest of the last k words
      f(hash_bytes(norm.substr(first, e - first), 0x5348494e474c45ull));
    }
    i = e;
  }
  if (words > 0 && words < static_cast<size_t>(k)) {
    size_t first = ring[0];
    f(hash_bytes(norm.substr(first, last_end - first), 0x5348494e474c45ull));
  }
}

}  // namespace fastchat::dedup
