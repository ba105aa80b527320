// The rank-r side of LoRA linears, y = x W^T + scale * (x A^T) B^T, fp32 on CPU, rank r a multiple of 16. The
// frozen base product x W^T (and dy W in backward) stays with torch's GEMM, which runs it near the matmul peak;
// the rank-r products around it are skinny (one side 16 wide) and as separate torch GEMMs each pays a dispatch, a
// thread fork/join and a pass over a [tokens x width] matrix. Here a forward's two and a backward's four run in
// one call each, a block of rows at a time, so dy and x are read once while the block sits in cache.
//
// A call takes a group: one layer, or several layers reading the same input x (q/k/v, gate/up), whose products
// with x (s = x A^T forward; dA = t^T x and dx += t A backward) then run as one product with the layers' A
// stacked: one pass over x and dx for the group. Their ranks are equal; the stacked rank is at most 64.
//
// Layouts (row-major, contiguous): x, dx [m x in]; y_g, dy_g [m x out_g]; a_g [r x in]; b_g [out_g x r];
// s [m x layers*r] (layer g's columns g*r...); da [layers*r x in] (layer g's rows g*r...); db_g [out_g x r].
#pragma once

#include <cstdint>

namespace fastchat::lora {

constexpr int kMaxLayers = 4;

struct Group {
  int layers = 1;
  int64_t m = 0, in = 0, r = 0;
  int64_t out[kMaxLayers] = {};
  float scale[kMaxLayers] = {};
  const float* x = nullptr;
  const float* a[kMaxLayers] = {};
  const float* b[kMaxLayers] = {};
  float* s = nullptr;                // forward: written; backward: read
  float* y[kMaxLayers] = {};         // forward: holds x W_g^T (+ bias), gets the LoRA term added
  const float* dy[kMaxLayers] = {};  // backward
  float* dx = nullptr;               // backward: holds sum_g dy_g W_g, gets the LoRA terms added; null: skipped
  float* da = nullptr;               // backward: written
  float* db[kMaxLayers] = {};        // backward: written
};

// Whether the kernels take this group (else the caller keeps torch's GEMMs).
constexpr bool supports(int layers, int64_t r) {
  return layers >= 1 && layers <= kMaxLayers && r > 0 && r % 16 == 0 && layers * r <= 64;
}

// s = x [A_0; A_1; ...]^T; y_g += scale_g s_g B_g^T.
void forward(const Group& group, int threads);

// t_g = scale_g dy_g B_g; dx += sum_g t_g A_g; da_g = t_g^T x; db_g = scale_g dy_g^T s_g (da, db written).
void backward(const Group& group, int threads);

}  // namespace fastchat::lora
