// Best-fit-decreasing behind pack.h: sequences sorted longest first, each placed in the open bin with the
// least room that still fits it (an ordered map from remaining room to bins), else in a new bin.
#include "pack.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>

namespace fastchat::pack {

std::vector<std::vector<uint32_t>> best_fit_decreasing(const std::vector<uint32_t>& lengths, uint32_t capacity,
                                                       uint64_t seed) {
  size_t n = lengths.size();
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);  // tie order among equal lengths follows the seed
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return lengths[a] > lengths[b]; });
  std::vector<std::vector<uint32_t>> bins;
  std::multimap<uint32_t, uint32_t> room;  // remaining capacity -> bin index
  for (uint32_t i : order) {
    uint32_t len = lengths[i];
    if (len > capacity)
      throw std::invalid_argument("sequence " + std::to_string(i) + " has " + std::to_string(len) +
                                  " tokens, more than the bin capacity " + std::to_string(capacity));
    if (len == 0) continue;
    auto it = room.lower_bound(len);
    if (it == room.end()) {
      bins.push_back({i});
      if (capacity - len > 0) room.emplace(capacity - len, static_cast<uint32_t>(bins.size() - 1));
      continue;
    }
    uint32_t bin = it->second, left = it->first - len;
    room.erase(it);
    bins[bin].push_back(i);
    if (left > 0) room.emplace(left, bin);
  }
  return bins;
}

}  // namespace fastchat::pack
