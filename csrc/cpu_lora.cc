#include "cpu_lora.h"

#include <algorithm>
#include <memory>

#include "cpu_parallel.h"
#include "cpu_simd.h"

namespace fastchat::lora {
namespace {

using cpu::kLanes;
using cpu::load;
using cpu::splat;
using cpu::store;
using cpu::i16v;
using cpu::v16;

// Rows per block: a block's dy and x rows (64 x 1536 floats = 384 KiB at most for a 1536-wide layer) are read
// by two passes each and stay in L2 between them.
constexpr int64_t kBlockRows = 64;

// The three skinny products, R = r / 16 vectors per rank-r row. Register tiles are sized so accumulators plus
// operands fit the 32 vector registers of AVX-512 (the AVX2 build spills some; it is the fallback).

// out[i, :] = alpha * sum_k X[i, k] P[k, :] for RT rows; P [K x r], out [RT x r].
template <int R, int RT>
FASTCHAT_INLINE void skinny_tile(const float* X, int64_t ldx, const float* P, int64_t K, float* out, float alpha) {
  v16 acc[RT][R];
  for (int i = 0; i < RT; ++i)
    for (int v = 0; v < R; ++v) acc[i][v] = v16{};
  const float* xr[RT];
  for (int i = 0; i < RT; ++i) xr[i] = X + i * ldx;
  for (int64_t k = 0; k < K; ++k) {
    v16 p[R];
    for (int v = 0; v < R; ++v) p[v] = load(P + (k * R + v) * kLanes);
    for (int i = 0; i < RT; ++i) {
      const v16 xs = splat(xr[i][k]);
      for (int v = 0; v < R; ++v) acc[i][v] += xs * p[v];
    }
  }
  for (int i = 0; i < RT; ++i)
    for (int v = 0; v < R; ++v) store(out + (i * R + v) * kLanes, acc[i][v] * splat(alpha));
}

// out [rows x r] = alpha * X [rows x K] P [K x r]
template <int R>
FASTCHAT_INLINE void skinny(const float* X, int64_t ldx, const float* P, int64_t K, float* out, int64_t rows,
                            float alpha) {
  constexpr int RT = R == 1 ? 8 : R == 2 ? 6 : 4;
  int64_t i = 0;
  for (; i + RT <= rows; i += RT) skinny_tile<R, RT>(X + i * ldx, ldx, P, K, out + i * R * kLanes, alpha);
  for (; i < rows; ++i) skinny_tile<R, 1>(X + i * ldx, ldx, P, K, out + i * R * kLanes, alpha);
}

// G[k, :] += sum_i X[i, k] Q[i, :] for KT columns k of X; Q [rows x r], G [KT x r].
template <int R, int KT>
FASTCHAT_INLINE void outer_tile(const float* X, int64_t ldx, const float* Q, int64_t rows, float* G) {
  v16 acc[KT][R];
  for (int k = 0; k < KT; ++k)
    for (int v = 0; v < R; ++v) acc[k][v] = load(G + (k * R + v) * kLanes);
  for (int64_t i = 0; i < rows; ++i) {
    v16 q[R];
    for (int v = 0; v < R; ++v) q[v] = load(Q + (i * R + v) * kLanes);
    for (int k = 0; k < KT; ++k) {
      const v16 xs = splat(X[i * ldx + k]);
      for (int v = 0; v < R; ++v) acc[k][v] += xs * q[v];
    }
  }
  for (int k = 0; k < KT; ++k)
    for (int v = 0; v < R; ++v) store(G + (k * R + v) * kLanes, acc[k][v]);
}

// G [K x r] += X [rows x K]^T Q [rows x r]
template <int R>
FASTCHAT_INLINE void outer(const float* X, int64_t ldx, const float* Q, int64_t rows, int64_t K, float* G) {
  constexpr int KT = R == 1 ? 16 : R == 2 ? 8 : R == 3 ? 6 : 4;
  int64_t k = 0;
  for (; k + KT <= K; k += KT) outer_tile<R, KT>(X + k, ldx, Q, rows, G + k * R * kLanes);
  for (; k < K; ++k) outer_tile<R, 1>(X + k, ldx, Q, rows, G + k * R * kLanes);
}

// Y[i, j:j+16*CV] += sum_c Q[i, c] M[c, j:j+16*CV] for RT rows; Q [RT x r], M [r x N] (row stride ldm).
template <int R, int RT, int CV>
FASTCHAT_INLINE void wide_tile(const float* Q, const float* M, int64_t ldm, float* Y, int64_t ldy) {
  v16 acc[RT][CV];
  for (int i = 0; i < RT; ++i)
    for (int v = 0; v < CV; ++v) acc[i][v] = load(Y + i * ldy + v * kLanes);
  for (int c = 0; c < R * kLanes; ++c) {
    v16 m[CV];
    for (int v = 0; v < CV; ++v) m[v] = load(M + c * ldm + v * kLanes);
    for (int i = 0; i < RT; ++i) {
      const v16 qs = splat(Q[i * R * kLanes + c]);
      for (int v = 0; v < CV; ++v) acc[i][v] += qs * m[v];
    }
  }
  for (int i = 0; i < RT; ++i)
    for (int v = 0; v < CV; ++v) store(Y + i * ldy + v * kLanes, acc[i][v]);
}

// Y [rows x N] += Q [rows x r] M [r x N]
template <int R>
FASTCHAT_INLINE void wide(const float* Q, const float* M, int64_t N, float* Y, int64_t ldy, int64_t rows) {
  constexpr int64_t r = R * kLanes;
  const int64_t full = N / kLanes * kLanes;
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    int64_t j = 0;
    for (; j + 4 * kLanes <= full; j += 4 * kLanes) wide_tile<R, 4, 4>(Q + i * r, M + j, N, Y + i * ldy + j, ldy);
    for (; j < full; j += kLanes) wide_tile<R, 4, 1>(Q + i * r, M + j, N, Y + i * ldy + j, ldy);
  }
  for (; i < rows; ++i) {
    int64_t j = 0;
    for (; j + 4 * kLanes <= full; j += 4 * kLanes) wide_tile<R, 1, 4>(Q + i * r, M + j, N, Y + i * ldy + j, ldy);
    for (; j < full; j += kLanes) wide_tile<R, 1, 1>(Q + i * r, M + j, N, Y + i * ldy + j, ldy);
  }
  for (i = 0; i < rows && full < N; ++i)  // columns past the last whole vector
    for (int64_t j = full; j < N; ++j) {
      float acc = Y[i * ldy + j];
      for (int64_t c = 0; c < r; ++c) acc += Q[i * r + c] * M[c * N + j];
      Y[i * ldy + j] = acc;
    }
}

#if !defined(__clang__)
template <int B, bool Low>
constexpr int lane(int l) {
  return Low ? ((l & B) ? 16 + l - B : l) : ((l & B) ? 16 + l : l + B);
}
template <int B, bool Low>
constexpr i16v lanes() {
  return i16v{lane<B, Low>(0),  lane<B, Low>(1),  lane<B, Low>(2),  lane<B, Low>(3),  lane<B, Low>(4),  lane<B, Low>(5),
              lane<B, Low>(6),  lane<B, Low>(7),  lane<B, Low>(8),  lane<B, Low>(9),  lane<B, Low>(10), lane<B, Low>(11),
              lane<B, Low>(12), lane<B, Low>(13), lane<B, Low>(14), lane<B, Low>(15)};
}
// One step of the 16x16 transpose: rows i and i + B swap their off-diagonal B x B blocks.
template <int B>
FASTCHAT_INLINE void swap_blocks(v16* rows) {
  for (int i = 0; i < 16; ++i)
    if (!(i & B)) {
      const v16 top = rows[i], bottom = rows[i + B];
      rows[i] = __builtin_shuffle(top, bottom, lanes<B, true>());
      rows[i + B] = __builtin_shuffle(top, bottom, lanes<B, false>());
    }
}
#endif

// dst[c, j] = alpha * src[j, c] for a 16 x 16 block (row strides lds, ldd): in registers, 4 x 16 two-vector
// shuffles, where a scalar copy would scatter 256 single floats.
FASTCHAT_INLINE void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd, float alpha) {
#if defined(__clang__)
  for (int c = 0; c < 16; ++c)
    for (int j = 0; j < 16; ++j) dst[c * ldd + j] = alpha * src[j * lds + c];
#else
  v16 rows[16];
  for (int i = 0; i < 16; ++i) rows[i] = load(src + i * lds);
  swap_blocks<8>(rows);
  swap_blocks<4>(rows);
  swap_blocks<2>(rows);
  swap_blocks<1>(rows);
  for (int i = 0; i < 16; ++i) store(dst + i * ldd, rows[i] * splat(alpha));
#endif
}

// dst [cols x rows] = alpha * src [rows x cols]^T, both contiguous.
FASTCHAT_INLINE void transpose(const float* src, int64_t rows, int64_t cols, float* dst, float alpha) {
  const int64_t full_rows = rows / kLanes * kLanes, full_cols = cols / kLanes * kLanes;
  for (int64_t j = 0; j < full_rows; j += kLanes)
    for (int64_t c = 0; c < full_cols; c += kLanes) transpose16(src + j * cols + c, cols, dst + c * rows + j, rows, alpha);
  for (int64_t j = 0; j < rows; ++j)  // the ragged edges
    for (int64_t c = j < full_rows ? full_cols : 0; c < cols; ++c) dst[c * rows + j] = alpha * src[j * cols + c];
}

// Threads' partials (da^T [in x r] then db [out x r] each, `stride` floats apart) summed in thread order, for
// rows [begin, end) of the stacked [(in + out) x r] partial, into thread 0's. Vectors of r floats.
template <int R>
FASTCHAT_INLINE void sum_partials(float* partials, int used, int64_t stride, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j)
    for (int v = 0; v < R; ++v) {
      float* first = partials + (j * R + v) * kLanes;
      v16 sum = load(first);
      for (int t = 1; t < used; ++t) sum += load(first + t * stride);
      store(first, sum);
    }
}

// Rows [begin, end): s = x A^T, y += s (scale B)^T. at = A^T [in x r], bt = scale * B^T [r x out].
template <int R>
FASTCHAT_INLINE void forward_rows(const float* x, const float* at, const float* bt, float* s, float* y, int64_t begin,
                                  int64_t end, int64_t in, int64_t out) {
  constexpr int64_t r = R * kLanes;
  for (int64_t i = begin; i < end; i += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, end - i);
    skinny<R>(x + i * in, in, at, in, s + i * r, rows, 1.f);
    wide<R>(s + i * r, bt, out, y + i * out, out, rows);
  }
}

// Rows [begin, end): t = scale * dy B (into the block scratch t), db_part += dy^T s, dat_part += x^T t,
// dx += t A. dat_part is da^T [in x r]; both partials belong to this thread.
template <int R>
FASTCHAT_INLINE void backward_rows(const float* dy, const float* x, const float* s, const float* a, const float* b,
                                   float* dx, float* dat_part, float* db_part, float* t, int64_t begin, int64_t end,
                                   int64_t in, int64_t out, float scale) {
  constexpr int64_t r = R * kLanes;
  for (int64_t i = begin; i < end; i += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, end - i);
    skinny<R>(dy + i * out, out, b, out, t, rows, scale);
    outer<R>(dy + i * out, out, s + i * r, rows, out, db_part);
    outer<R>(x + i * in, in, t, rows, in, dat_part);
    if (dx) wide<R>(t, a, in, dx + i * in, in, rows);
  }
}

using ForwardFn = void (*)(const float*, const float*, const float*, float*, float*, int64_t, int64_t, int64_t,
                           int64_t);
using BackwardFn = void (*)(const float*, const float*, const float*, const float*, const float*, float*, float*,
                            float*, float*, int64_t, int64_t, int64_t, int64_t, float);

using TransposeFn = void (*)(const float*, int64_t, int64_t, float*, float);
using SumFn = void (*)(float*, int, int64_t, int64_t, int64_t);

#define FASTCHAT_LORA_VERSIONS(TARGET, SUFFIX)                                                                   \
  template <int R>                                                                                             \
  TARGET void forward_##SUFFIX(const float* x, const float* at, const float* bt, float* s, float* y, int64_t b, \
                               int64_t e, int64_t in, int64_t out) {                                           \
    forward_rows<R>(x, at, bt, s, y, b, e, in, out);                                                           \
  }                                                                                                            \
  template <int R>                                                                                             \
  TARGET void backward_##SUFFIX(const float* dy, const float* x, const float* s, const float* a, const float* bm, \
                                float* dx, float* dat, float* db, float* t, int64_t b, int64_t e, int64_t in,  \
                                int64_t out, float scale) {                                                    \
    backward_rows<R>(dy, x, s, a, bm, dx, dat, db, t, b, e, in, out, scale);                                   \
  }                                                                                                            \
  TARGET void transpose_##SUFFIX(const float* src, int64_t rows, int64_t cols, float* dst, float alpha) {        \
    transpose(src, rows, cols, dst, alpha);                                                                    \
  }                                                                                                            \
  template <int R>                                                                                             \
  TARGET void sum_partials_##SUFFIX(float* partials, int used, int64_t stride, int64_t b, int64_t e) {          \
    sum_partials<R>(partials, used, stride, b, e);                                                             \
  }                                                                                                            \
  ForwardFn pick_forward_##SUFFIX(int64_t R) {                                                                \
    return R == 1 ? forward_##SUFFIX<1> : R == 2 ? forward_##SUFFIX<2> : R == 3 ? forward_##SUFFIX<3>          \
                                                                               : forward_##SUFFIX<4>;          \
  }                                                                                                            \
  BackwardFn pick_backward_##SUFFIX(int64_t R) {                                                               \
    return R == 1 ? backward_##SUFFIX<1> : R == 2 ? backward_##SUFFIX<2> : R == 3 ? backward_##SUFFIX<3>       \
                                                                                 : backward_##SUFFIX<4>;       \
  }                                                                                                            \
  SumFn pick_sum_##SUFFIX(int64_t R) {                                                                         \
    return R == 1 ? sum_partials_##SUFFIX<1> : R == 2 ? sum_partials_##SUFFIX<2>                               \
                  : R == 3 ? sum_partials_##SUFFIX<3> : sum_partials_##SUFFIX<4>;                              \
  }

FASTCHAT_LORA_VERSIONS(, baseline)
#ifdef FASTCHAT_HAS_X86_VERSIONS
FASTCHAT_LORA_VERSIONS(FASTCHAT_TARGET_AVX2, avx2)
FASTCHAT_LORA_VERSIONS(FASTCHAT_TARGET_AVX512, avx512)
#endif

// The builds for this CPU, for rank r = 16 * R.
ForwardFn pick_forward(int64_t R) {
#ifdef FASTCHAT_HAS_X86_VERSIONS
  if (cpu::simd_level() == 2) return pick_forward_avx512(R);
  if (cpu::simd_level() == 1) return pick_forward_avx2(R);
#endif
  return pick_forward_baseline(R);
}

BackwardFn pick_backward(int64_t R) {
#ifdef FASTCHAT_HAS_X86_VERSIONS
  if (cpu::simd_level() == 2) return pick_backward_avx512(R);
  if (cpu::simd_level() == 1) return pick_backward_avx2(R);
#endif
  return pick_backward_baseline(R);
}

TransposeFn pick_transpose() {
#ifdef FASTCHAT_HAS_X86_VERSIONS
  if (cpu::simd_level() == 2) return transpose_avx512;
  if (cpu::simd_level() == 1) return transpose_avx2;
#endif
  return transpose_baseline;
}

SumFn pick_sum(int64_t R) {
#ifdef FASTCHAT_HAS_X86_VERSIONS
  if (cpu::simd_level() == 2) return pick_sum_avx512(R);
  if (cpu::simd_level() == 1) return pick_sum_avx2(R);
#endif
  return pick_sum_baseline(R);
}

// Contiguous row ranges, one per thread (no thread gets none); fn(thread, begin, end).
template <class Fn>
void split_rows(int64_t m, int threads, Fn&& fn) {
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, m)));
  const int64_t per = (m + used - 1) / used;
  cpu::run_on_threads(used, [&](int t) {
    const int64_t begin = std::min(m, t * per), end = std::min(m, (t + 1) * per);
    fn(t, begin, end);
  });
}

int used_threads(int64_t m, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(1, threads), m)));
}

}  // namespace

void forward(const float* x, const float* a, const float* b, float* s, float* y, int64_t m, int64_t in,
             int64_t out, int64_t r, float scale, int threads) {
  // A^T and scale * B^T, so both products stream whole rows of 16-float vectors; r x (in + out) floats.
  std::unique_ptr<float[]> at(new float[static_cast<size_t>(in * r)]), bt(new float[static_cast<size_t>(out * r)]);
  const TransposeFn transpose_fn = pick_transpose();
  transpose_fn(a, r, in, at.get(), 1.f);
  transpose_fn(b, out, r, bt.get(), scale);
  const ForwardFn fn = pick_forward(r / kLanes);
  split_rows(m, used_threads(m, threads), [&](int, int64_t begin, int64_t end) {
    if (begin < end) fn(x, at.get(), bt.get(), s, y, begin, end, in, out);
  });
}

void backward(const float* dy, const float* x, const float* s, const float* a, const float* b, float* dx,
              float* da, float* db, int64_t m, int64_t in, int64_t out, int64_t r, float scale, int threads) {
  const int used = used_threads(m, threads);
  // Per thread: da^T and db partials (each thread sums its own rows; added up below in thread order, so a given
  // thread count always gives the same bits) and a block of t.
  const int64_t per_thread = (in + out) * r + kBlockRows * r;
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(used * per_thread)]);  // zeroed by its thread
  const BackwardFn fn = pick_backward(r / kLanes);
  split_rows(m, used, [&](int t, int64_t begin, int64_t end) {
    float* mine = scratch.get() + t * per_thread;
    std::fill(mine, mine + (in + out) * r, 0.f);
    if (begin < end) fn(dy, x, s, a, b, dx, mine, mine + in * r, mine + (in + out) * r, begin, end, in, out, scale);
  });
  // Partials summed in thread order into thread 0's (split by rows), then da = its da^T part transposed and
  // db = scale * its db part.
  float* sum = scratch.get();
  if (used > 1) {
    const SumFn sum_fn = pick_sum(r / kLanes);
    split_rows(in + out, used, [&](int, int64_t begin, int64_t end) {
      if (begin < end) sum_fn(sum, used, per_thread, begin, end);
    });
  }
  const TransposeFn transpose_fn = pick_transpose();
  transpose_fn(sum, in, r, da, 1.f);
  const float* db_sum = sum + in * r;
  for (int64_t i = 0; i < out * r; ++i) db[i] = scale * db_sum[i];
}

}  // namespace fastchat::lora
