// Best-fit-decreasing packing of sequence lengths into fixed-capacity bins. Knows only lengths; the Python
// side builds the packed arrays (position ids, seq_lens, labels) from the bin assignment.
#pragma once

#include <cstdint>
#include <vector>

namespace fastchat::pack {

// Returns, per bin, the indices of the sequences it holds (in placement order). Sequences longer than
// `capacity` are an error (the caller drops or truncates them first). Ties between equal lengths are broken
// by a permutation drawn from `seed`, so the result is deterministic for a given (lengths, capacity, seed).
std::vector<std::vector<uint32_t>> best_fit_decreasing(const std::vector<uint32_t>& lengths, uint32_t capacity,
                                                       uint64_t seed);

}  // namespace fastchat::pack
