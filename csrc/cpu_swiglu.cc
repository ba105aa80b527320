#include "cpu_swiglu.h"

#include <algorithm>
#include <cmath>

#include "cpu_parallel.h"
#include "cpu_simd.h"

namespace fastchat::swiglu {
namespace {

using cpu::kLanes;
using cpu::load;
using cpu::splat;
using cpu::store;
using cpu::v16;

FASTCHAT_INLINE v16 sigmoid(v16 g) { return splat(1.f) / (splat(1.f) + cpu::vexp(-g)); }
inline float sigmoid(float g) { return 1.f / (1.f + std::exp(-g)); }

FASTCHAT_INLINE void forward_range(const float* gate, const float* up, float* h, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const v16 g = load(gate + i);
    store(h + i, g * sigmoid(g) * load(up + i));
  }
  for (; i < end; ++i) h[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

FASTCHAT_INLINE void backward_range(const float* dh, const float* gate, const float* up, float* dgate, float* dup,
                                    int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const v16 g = load(gate + i), d = load(dh + i), s = sigmoid(g);
    if (dup) store(dup + i, d * (g * s));
    if (dgate) store(dgate + i, d * load(up + i) * s * (splat(1.f) + g * (splat(1.f) - s)));
  }
  for (; i < end; ++i) {
    const float g = gate[i], s = sigmoid(g);
    if (dup) dup[i] = dh[i] * (g * s);
    if (dgate) dgate[i] = dh[i] * up[i] * s * (1.f + g * (1.f - s));
  }
}

using ForwardFn = void (*)(const float*, const float*, float*, int64_t, int64_t);
using BackwardFn = void (*)(const float*, const float*, const float*, float*, float*, int64_t, int64_t);

#define FASTCHAT_SWIGLU_VERSIONS(TARGET, SUFFIX)                                                                  \
  TARGET void forward_##SUFFIX(const float* g, const float* u, float* h, int64_t b, int64_t e) {                \
    forward_range(g, u, h, b, e);                                                                              \
  }                                                                                                            \
  TARGET void backward_##SUFFIX(const float* dh, const float* g, const float* u, float* dg, float* du, int64_t b, \
                                int64_t e) {                                                                   \
    backward_range(dh, g, u, dg, du, b, e);                                                                    \
  }

FASTCHAT_SWIGLU_VERSIONS(, baseline)
#ifdef FASTCHAT_HAS_X86_VERSIONS
FASTCHAT_SWIGLU_VERSIONS(FASTCHAT_TARGET_AVX2, avx2)
FASTCHAT_SWIGLU_VERSIONS(FASTCHAT_TARGET_AVX512, avx512)
#endif

// Contiguous slices, one per thread, on vector boundaries: every element is written by exactly one thread.
template <class Fn>
void split(int64_t n, int threads, Fn&& fn) {
  const int64_t per = (n / threads + kLanes - 1) / kLanes * kLanes;
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (n + per - 1) / std::max<int64_t>(per, 1))));
  cpu::run_on_threads(used, [&](int t) {
    const int64_t begin = std::min(n, t * per), end = t == used - 1 ? n : std::min(n, (t + 1) * per);
    if (begin < end) fn(begin, end);
  });
}

}  // namespace

void forward(const float* gate, const float* up, float* h, int64_t n, int threads) {
  const ForwardFn fn = FASTCHAT_SIMD_PICK(forward);
  split(n, std::max(1, threads), [&](int64_t b, int64_t e) { fn(gate, up, h, b, e); });
}

void backward(const float* dh, const float* gate, const float* up, float* dgate, float* dup, int64_t n,
              int threads) {
  const BackwardFn fn = FASTCHAT_SIMD_PICK(backward);
  split(n, std::max(1, threads), [&](int64_t b, int64_t e) { fn(dh, gate, up, dgate, dup, b, e); });
}

}  // namespace fastchat::swiglu
