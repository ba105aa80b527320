// The rank-r side of a LoRA linear, y = x W^T + scale * (x A^T) B^T, fp32 on CPU, for rank r a multiple of 16
// (up to 64). The frozen base product x W^T (and dy W in backward) stays with torch's GEMM, which runs it near the
// matmul peak; the rank-r products around it are skinny (one side 16 wide) and as separate torch GEMMs each pays a
// dispatch, a thread fork/join and a pass over a [tokens x width] matrix. Here the forward's two and the backward's
// four run in one call each, a block of rows at a time, so dy and x are read once while the block sits in cache.
//
// Layouts (row-major, contiguous): x, dx [m x in]; y, dy [m x out]; a [r x in]; b [out x r]; s [m x r].
#pragma once

#include <cstdint>

namespace fastchat::lora {

// s = x A^T (kept for backward); y += scale * s B^T, y holding x W^T (+ bias) already.
void forward(const float* x, const float* a, const float* b, float* s, float* y, int64_t m, int64_t in,
             int64_t out, int64_t r, float scale, int threads);

// t = dy B; dx += scale * t A (dx may be null: not needed); da = scale * t^T x; db = scale * dy^T s. da and db are
// written, not accumulated. x is the LoRA input the forward saw.
void backward(const float* dy, const float* x, const float* s, const float* a, const float* b, float* dx,
              float* da, float* db, int64_t m, int64_t in, int64_t out, int64_t r, float scale, int threads);

// Whether the kernels take this rank (else the caller keeps torch's GEMMs).
constexpr bool supports_rank(int64_t r) { return r > 0 && r % 16 == 0 && r <= 64; }

}  // namespace fastchat::lora
