// SwiGLU, silu(gate) * up, forward and backward in one pass each, fp32 on CPU. torch runs it as separate silu and
// mul ops (forward 2 passes over [tokens x intermediate], backward 4), each memory-bound on a CPU; here the
// forward reads gate and up once and writes h, the backward reads dh, gate, up once and writes dgate and dup.
// All arrays are contiguous, n elements.
#pragma once

#include <cstdint>

namespace fastchat::swiglu {

void forward(const float* gate, const float* up, float* h, int64_t n, int threads);

// dgate = dh * up * sig * (1 + gate * (1 - sig)), dup = dh * silu(gate), sig = sigmoid(gate); either output may
// be null (not needed).
void backward(const float* dh, const float* gate, const float* up, float* dgate, float* dup, int64_t n,
              int threads);

}  // namespace fastchat::swiglu
