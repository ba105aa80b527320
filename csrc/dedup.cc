// Hashing, MinHash/LSH near-duplicate index and HyperLogLog behind dedup.h. Hand-written rather than a
// library because it runs once per record on millions of records and needs no dependency beyond the STL.
#include "dedup.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastchat::dedup {

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

uint64_t hash_bytes(std::string_view s, uint64_t seed) {
  uint64_t h = 0xcbf29ce484222325ull ^ mix64(seed);
  const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size(), i = 0;
  // Eight bytes per step: FNV-style multiply on 64-bit words (the byte loop is 4x slower on long texts).
  for (; i + 8 <= n; i += 8) {
    uint64_t w = 0;
    for (int b = 0; b < 8; ++b) w |= static_cast<uint64_t>(p[i + b]) << (8 * b);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return mix64(h ^ n);
}

void normalize(std::string_view text, std::string& out) {
  out.clear();
  out.reserve(text.size());
  bool space = true;  // no leading space
  for (unsigned char c : text) {
    if (c >= 0x80) {
      out += static_cast<char>(c);
      space = false;
    } else if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) {
      out += static_cast<char>(c);
      space = false;
    } else if (c >= 'A' && c <= 'Z') {
      out += static_cast<char>(c - 'A' + 'a');
      space = false;
    } else if (!space) {
      out += ' ';
      space = true;
    }
  }
  if (!out.empty() && out.back() == ' ') out.pop_back();
}

namespace {
// Hash family for the 64 MinHash "permutations": x_i = f(a_i*lo + b_i*hi + c_i) on the two 32-bit halves of the
// shingle's 64-bit hash, all 32-bit lane arithmetic so the loop vectorises (8 lanes with AVX2).
struct Permutations {
  uint32_t a[kNumPerm], b[kNumPerm], c[kNumPerm];
  Permutations() {
    uint64_t s = 0x6d696e68617368ull;  // fixed: signatures must be comparable across runs and machines
    for (int i = 0; i < kNumPerm; ++i) {
      a[i] = static_cast<uint32_t>(mix64(s += 0x9e3779b97f4a7c15ull)) | 1u;
      b[i] = static_cast<uint32_t>(mix64(s += 0x9e3779b97f4a7c15ull)) | 1u;
      c[i] = static_cast<uint32_t>(mix64(s += 0x9e3779b97f4a7c15ull));
    }
  }
};
const Permutations& perms() {
  static const Permutations p;
  return p;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void update_minima(const Permutations& p, const uint64_t* hashes, size_t n, uint32_t* v) {
  for (size_t j = 0; j < n; ++j) {
    uint32_t lo = static_cast<uint32_t>(hashes[j]), hi = static_cast<uint32_t>(hashes[j] >> 32);
    for (int i = 0; i < kNumPerm; ++i) {
      uint32_t x = p.a[i] * lo + p.b[i] * hi + p.c[i];
      x ^= x >> 16;
      x *= 0x7feb352du;
      x ^= x >> 15;
      v[i] = x < v[i] ? x : v[i];
    }
  }
}
}  // namespace

void minhash(std::string_view normalized, int k, Signature& out) {
  thread_local std::vector<uint64_t> hashes;
  hashes.clear();
  for_each_shingle(normalized, k, [&](uint64_t h) { hashes.push_back(h); });
  std::fill(out.v, out.v + kNumPerm, std::numeric_limits<uint32_t>::max());
  update_minima(perms(), hashes.data(), hashes.size(), out.v);
  out.empty = hashes.empty();
}

// ------------------------------------------------------------------------------------------ DupIndex

uint32_t DupIndex::Table::find_or_insert(uint64_t key, uint32_t val) {
  if (key == 0) key = 1;
  if ((used + 1) * 2 > keys.size()) grow();
  size_t mask = keys.size() - 1;
  for (size_t i = key & mask;; i = (i + 1) & mask) {
    if (keys[i] == key) return vals[i];
    if (keys[i] == 0) {
      keys[i] = key;
      vals[i] = val;
      ++used;
      return std::numeric_limits<uint32_t>::max();
    }
  }
}

uint32_t DupIndex::Table::exchange(uint64_t key, uint32_t val) {
  if (key == 0) key = 1;
  if ((used + 1) * 2 > keys.size()) grow();
  size_t mask = keys.size() - 1;
  for (size_t i = key & mask;; i = (i + 1) & mask) {
    if (keys[i] == key) {
      uint32_t old = vals[i];
      vals[i] = val;
      return old;
    }
    if (keys[i] == 0) {
      keys[i] = key;
      vals[i] = val;
      ++used;
      return std::numeric_limits<uint32_t>::max();
    }
  }
}

void DupIndex::Table::grow() {
  size_t cap = keys.empty() ? 1024 : keys.size() * 2;
  std::vector<uint64_t> old_keys(cap, 0);
  std::vector<uint32_t> old_vals(cap, 0);
  old_keys.swap(keys);
  old_vals.swap(vals);
  size_t mask = cap - 1;
  for (size_t j = 0; j < old_keys.size(); ++j) {
    if (!old_keys[j]) continue;
    size_t i = old_keys[j] & mask;
    while (keys[i]) i = (i + 1) & mask;
    keys[i] = old_keys[j];
    vals[i] = old_vals[j];
  }
}

uint32_t DupIndex::find(uint32_t x) {
  while (parent_[x] != x) {
    parent_[x] = parent_[parent_[x]];
    x = parent_[x];
  }
  return x;
}

void DupIndex::unite(uint32_t a, uint32_t b) {
  a = find(a);
  b = find(b);
  if (a == b) return;
  if (a < b) parent_[b] = a;  // the earliest record is the root: groups are named by their first record
  else parent_[a] = b;
}

uint32_t DupIndex::group(uint32_t id) { return find(id); }

double DupIndex::similarity(uint32_t a, uint32_t b) const {
  const uint8_t* x = &small_sigs_[static_cast<size_t>(a) * kNumPerm];
  const uint8_t* y = &small_sigs_[static_cast<size_t>(b) * kNumPerm];
  int same = 0;
  for (int i = 0; i < kNumPerm; ++i) same += x[i] == y[i];
  // b-bit MinHash (Li & Koenig): slots agree by chance with probability 1/256 when the minima differ.
  double p = static_cast<double>(same) / kNumPerm;
  return std::max(0.0, (p - 1.0 / 256) / (1.0 - 1.0 / 256));
}

DupIndex::Match DupIndex::add(uint64_t exact_hash, const Signature& sig, bool near) {
  uint32_t id = static_cast<uint32_t>(parent_.size());
  parent_.push_back(id);
  constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
  size_t off = small_sigs_.size();
  if (near_enabled_) {
    chain_.resize(chain_.size() + kBands, kNone);
    small_sigs_.resize(off + kNumPerm, 0);
  }
  bool indexed = near_enabled_ && near && !sig.empty;
  if (indexed)
    for (int i = 0; i < kNumPerm; ++i) small_sigs_[off + i] = static_cast<uint8_t>(sig.v[i]);
  Match m;
  uint32_t e = exact_.find_or_insert(exact_hash, id);
  if (e != std::numeric_limits<uint32_t>::max()) {
    m.exact_of = e;
    m.similarity = 1.0f;
    unite(e, id);
    return m;  // identical text: its bands are already indexed under the first copy
  }
  if (!indexed) return m;
  uint32_t checked[kBands * kChainWalk];
  int n_checked = 0;
  for (int b = 0; b < kBands; ++b) {
    uint64_t key = mix64(static_cast<uint64_t>(b) + 1);
    for (int r = 0; r < kRows; ++r) key = mix64(key ^ sig.v[b * kRows + r]);
    uint32_t other = bands_.exchange(key, id);
    chain_[static_cast<size_t>(id) * kBands + b] = other;
    // Walk the bucket newest-first: a near copy may share it with records it does not resemble.
    for (int step = 0; other != kNone && step < kChainWalk; ++step) {
      if (std::find(checked, checked + n_checked, other) == checked + n_checked) {
        checked[n_checked++] = other;
        double s = similarity(other, id);
        if (s >= threshold_) {
          unite(other, id);
          if (m.near_of < 0 || s > m.similarity || (s == m.similarity && other < m.near_of)) {
            m.near_of = other;
            m.similarity = static_cast<float>(s);
          }
        }
      }
      other = chain_[static_cast<size_t>(other) * kBands + b];
    }
  }
  return m;
}

size_t DupIndex::memory_bytes() const {
  return exact_.keys.capacity() * 8 + exact_.vals.capacity() * 4 + bands_.keys.capacity() * 8 +
         bands_.vals.capacity() * 4 + small_sigs_.capacity() + chain_.capacity() * 4 + parent_.capacity() * 4;
}

// ----------------------------------------------------------------------------------- DistinctCounter

void DistinctCounter::add(uint64_t hash) {
  uint32_t idx = static_cast<uint32_t>(hash >> (64 - kP));
  uint64_t w = (hash << kP) | (1ull << (kP - 1));  // guard bit bounds the rank
  uint8_t rank = static_cast<uint8_t>(__builtin_clzll(w) + 1);
  if (rank > reg_[idx]) reg_[idx] = rank;
}

void DistinctCounter::merge(const DistinctCounter& other) {
  for (size_t i = 0; i < reg_.size(); ++i) reg_[i] = std::max(reg_[i], other.reg_[i]);
}

double DistinctCounter::estimate() const {
  double m = static_cast<double>(reg_.size());
  double sum = 0;
  size_t zeros = 0;
  for (uint8_t r : reg_) {
    sum += std::ldexp(1.0, -r);
    zeros += r == 0;
  }
  double alpha = 0.7213 / (1 + 1.079 / m);
  double e = alpha * m * m / sum;
  if (e <= 2.5 * m && zeros) e = m * std::log(m / static_cast<double>(zeros));  // linear counting when small
  return e;
}

}  // namespace fastchat::dedup
