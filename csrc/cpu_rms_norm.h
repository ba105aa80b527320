// RMSNorm with Llama casting in fp32 on CPU, forward and backward one pass over the rows each: y = w * (x * rstd),
// rstd = 1 / sqrt(mean(x^2) + eps). torch runs the forward as 5-6 ops (pow, mean, add, rsqrt, two muls) and the
// closed-form backward as 5, each a pass over [tokens x hidden].
#pragma once

#include <cstdint>

namespace fastchat::rms_norm {

// x, y: [rows x cols] contiguous; w: [cols]; rstd: [rows] (kept for backward).
void forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t cols, float eps,
             int threads);

// dx = rstd * (m - xhat * mean(m * xhat)), m = dy * w, xhat = x * rstd. dw_partial, when not null, is
// [threads x cols], zeroed by the caller: thread t adds sum over its rows of dy * xhat to row t (the caller sums).
void backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw_partial,
              int64_t rows, int64_t cols, int threads);

}  // namespace fastchat::rms_norm
