#include "cpu_rms_norm.h"

#include <algorithm>
#include <cmath>

#include "cpu_parallel.h"
#include "cpu_simd.h"

namespace fastchat::rms_norm {
namespace {

using cpu::hsum;
using cpu::kLanes;
using cpu::load;
using cpu::splat;
using cpu::store;
using cpu::v16;

FASTCHAT_INLINE void forward_rows(const float* x, const float* w, float* y, float* rstd, int64_t begin, int64_t end,
                                  int64_t cols, float eps) {
  const int64_t full = cols / kLanes * kLanes;
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    v16 acc{};
    for (int64_t j = 0; j < full; j += kLanes) { const v16 v = load(xr + j); acc += v * v; }
    float ss = hsum(acc);
    for (int64_t j = full; j < cols; ++j) ss += xr[j] * xr[j];
    const float rs = 1.f / std::sqrt(ss / static_cast<float>(cols) + eps);
    rstd[r] = rs;
    const v16 rv = splat(rs);
    for (int64_t j = 0; j < full; j += kLanes) store(yr + j, load(w + j) * (load(xr + j) * rv));
    for (int64_t j = full; j < cols; ++j) yr[j] = w[j] * (xr[j] * rs);
  }
}

FASTCHAT_INLINE void backward_rows(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                                   float* dw, int64_t begin, int64_t end, int64_t cols) {
  const int64_t full = cols / kLanes * kLanes;
  for (int64_t r = begin; r < end; ++r) {
    const float *dyr = dy + r * cols, *xr = x + r * cols;
    float* dxr = dx + r * cols;
    const float rs = rstd[r];
    const v16 rv = splat(rs);
    v16 acc{};
    for (int64_t j = 0; j < full; j += kLanes) acc += load(dyr + j) * load(w + j) * (load(xr + j) * rv);
    float dot = hsum(acc);
    for (int64_t j = full; j < cols; ++j) dot += dyr[j] * w[j] * (xr[j] * rs);
    dot /= static_cast<float>(cols);
    const v16 dv = splat(dot);
    for (int64_t j = 0; j < full; j += kLanes) {
      const v16 xhat = load(xr + j) * rv, d = load(dyr + j);
      store(dxr + j, (d * load(w + j) - xhat * dv) * rv);
      if (dw) store(dw + j, load(dw + j) + d * xhat);
    }
    for (int64_t j = full; j < cols; ++j) {
      const float xhat = xr[j] * rs;
      dxr[j] = (dyr[j] * w[j] - xhat * dot) * rs;
      if (dw) dw[j] += dyr[j] * xhat;
    }
  }
}

using ForwardFn = void (*)(const float*, const float*, float*, float*, int64_t, int64_t, int64_t, float);
using BackwardFn = void (*)(const float*, const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                            int64_t);

#define FASTCHAT_RMS_NORM_VERSIONS(TARGET, SUFFIX)                                                               \
  TARGET void forward_##SUFFIX(const float* x, const float* w, float* y, float* rstd, int64_t b, int64_t e,     \
                               int64_t cols, float eps) {                                                     \
    forward_rows(x, w, y, rstd, b, e, cols, eps);                                                             \
  }                                                                                                           \
  TARGET void backward_##SUFFIX(const float* dy, const float* x, const float* w, const float* rstd, float* dx, \
                                float* dw, int64_t b, int64_t e, int64_t cols) {                              \
    backward_rows(dy, x, w, rstd, dx, dw, b, e, cols);                                                        \
  }

FASTCHAT_RMS_NORM_VERSIONS(, baseline)
#ifdef FASTCHAT_HAS_X86_VERSIONS
FASTCHAT_RMS_NORM_VERSIONS(FASTCHAT_TARGET_AVX2, avx2)
FASTCHAT_RMS_NORM_VERSIONS(FASTCHAT_TARGET_AVX512, avx512)
#endif

}  // namespace

void forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t cols, float eps,
             int threads) {
  const ForwardFn fn = FASTCHAT_SIMD_PICK(forward);
  cpu::split_rows(rows, std::max(1, threads),
                  [&](int, int64_t b, int64_t e) { fn(x, w, y, rstd, b, e, cols, eps); });
}

void backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw_partial,
              int64_t rows, int64_t cols, int threads) {
  const BackwardFn fn = FASTCHAT_SIMD_PICK(backward);
  cpu::split_rows(rows, std::max(1, threads), [&](int t, int64_t b, int64_t e) {
    fn(dy, x, w, rstd, dx, dw_partial ? dw_partial + t * cols : nullptr, b, e, cols);
  });
}

}  // namespace fastchat::rms_norm
