#include "cpu_lora.h"

#include <algorithm>
#include <memory>
#include <stdexcept>

#include "cpu_parallel.h"
#include "cpu_simd.h"

namespace fastchat::lora {
namespace {

using cpu::i16v;
using cpu::kLanes;
using cpu::load;
using cpu::splat;
using cpu::split_rows;
using cpu::store;
using cpu::v16;

// Rows per block: a block's dy and x rows (64 x 1536 floats = 384 KiB at most for a 1536-wide layer) are read
// by two passes each and stay in L2 between them.
constexpr int64_t kBlockRows = 64;

// The skinny products. R = r / 16 vectors per rank-r row of one layer; a group's stacked rank-r rows (the layers
// sharing one input) have RS vectors. Register tiles are sized so accumulators plus operands fit the 32 vector
// registers of AVX-512 (the AVX2 build spills some; it is the fallback).

// out[i, :] = alpha * sum_k X[i, k] P[k, :] for RT rows; P [K x r] contiguous, out rows ldo apart.
template <int R, int RT>
FASTCHAT_INLINE void skinny_tile(const float* X, int64_t ldx, const float* P, int64_t K, float* out, int64_t ldo,
                                 float alpha) {
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
    for (int v = 0; v < R; ++v) store(out + i * ldo + v * kLanes, acc[i][v] * splat(alpha));
}

// out [rows x r] (rows ldo apart) = alpha * X [rows x K] P [K x r]
template <int R>
FASTCHAT_INLINE void skinny(const float* X, int64_t ldx, const float* P, int64_t K, float* out, int64_t ldo,
                            int64_t rows, float alpha) {
  constexpr int RT = R == 1 ? 8 : R == 2 ? 6 : 4;
  int64_t i = 0;
  for (; i + RT <= rows; i += RT) skinny_tile<R, RT>(X + i * ldx, ldx, P, K, out + i * ldo, ldo, alpha);
  for (; i < rows; ++i) skinny_tile<R, 1>(X + i * ldx, ldx, P, K, out + i * ldo, ldo, alpha);
}

// G[k, :] += sum_i X[i, k] Q[i, :] for KT columns k of X; Q rows ldq apart, G [KT x r] contiguous.
template <int R, int KT>
FASTCHAT_INLINE void outer_tile(const float* X, int64_t ldx, const float* Q, int64_t ldq, int64_t rows, float* G) {
  v16 acc[KT][R];
  for (int k = 0; k < KT; ++k)
    for (int v = 0; v < R; ++v) acc[k][v] = load(G + (k * R + v) * kLanes);
  for (int64_t i = 0; i < rows; ++i) {
    v16 q[R];
    for (int v = 0; v < R; ++v) q[v] = load(Q + i * ldq + v * kLanes);
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
FASTCHAT_INLINE void outer(const float* X, int64_t ldx, const float* Q, int64_t ldq, int64_t rows, int64_t K,
                           float* G) {
  constexpr int KT = R == 1 ? 16 : R == 2 ? 8 : R == 3 ? 6 : 4;
  int64_t k = 0;
  for (; k + KT <= K; k += KT) outer_tile<R, KT>(X + k, ldx, Q, ldq, rows, G + k * R * kLanes);
  for (; k < K; ++k) outer_tile<R, 1>(X + k, ldx, Q, ldq, rows, G + k * R * kLanes);
}

// Y[i, j:j+16*CV] += sum_c Q[i, c] M[c, j:j+16*CV] for RT rows; Q rows ldq apart, M [r x N] (row stride ldm).
template <int R, int RT, int CV>
FASTCHAT_INLINE void wide_tile(const float* Q, int64_t ldq, const float* M, int64_t ldm, float* Y, int64_t ldy) {
  v16 acc[RT][CV];
  for (int i = 0; i < RT; ++i)
    for (int v = 0; v < CV; ++v) acc[i][v] = load(Y + i * ldy + v * kLanes);
  for (int c = 0; c < R * kLanes; ++c) {
    v16 m[CV];
    for (int v = 0; v < CV; ++v) m[v] = load(M + c * ldm + v * kLanes);
    for (int i = 0; i < RT; ++i) {
      const v16 qs = splat(Q[i * ldq + c]);
      for (int v = 0; v < CV; ++v) acc[i][v] += qs * m[v];
    }
  }
  for (int i = 0; i < RT; ++i)
    for (int v = 0; v < CV; ++v) store(Y + i * ldy + v * kLanes, acc[i][v]);
}

// Y [rows x N] += Q [rows x r] M [r x N]
template <int R>
FASTCHAT_INLINE void wide(const float* Q, int64_t ldq, const float* M, int64_t N, float* Y, int64_t ldy,
                          int64_t rows) {
  constexpr int64_t r = R * kLanes;
  const int64_t full = N / kLanes * kLanes;
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    int64_t j = 0;
    for (; j + 4 * kLanes <= full; j += 4 * kLanes) wide_tile<R, 4, 4>(Q + i * ldq, ldq, M + j, N, Y + i * ldy + j, ldy);
    for (; j < full; j += kLanes) wide_tile<R, 4, 1>(Q + i * ldq, ldq, M + j, N, Y + i * ldy + j, ldy);
  }
  for (; i < rows; ++i) {
    int64_t j = 0;
    for (; j + 4 * kLanes <= full; j += 4 * kLanes) wide_tile<R, 1, 4>(Q + i * ldq, ldq, M + j, N, Y + i * ldy + j, ldy);
    for (; j < full; j += kLanes) wide_tile<R, 1, 1>(Q + i * ldq, ldq, M + j, N, Y + i * ldy + j, ldy);
  }
  for (i = 0; i < rows && full < N; ++i)  // columns past the last whole vector
    for (int64_t j = full; j < N; ++j) {
      float acc = Y[i * ldy + j];
      for (int64_t c = 0; c < r; ++c) acc += Q[i * ldq + c] * M[c * N + j];
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

// dst [cols x rows] (row stride ldd) = alpha * src [rows x cols]^T, src contiguous.
FASTCHAT_INLINE void transpose(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ldd, float alpha) {
  const int64_t full_rows = rows / kLanes * kLanes, full_cols = cols / kLanes * kLanes;
  for (int64_t j = 0; j < full_rows; j += kLanes)
    for (int64_t c = 0; c < full_cols; c += kLanes) transpose16(src + j * cols + c, cols, dst + c * ldd + j, ldd, alpha);
  for (int64_t j = 0; j < rows; ++j)  // the ragged edges
    for (int64_t c = j < full_rows ? full_cols : 0; c < cols; ++c) dst[c * ldd + j] = alpha * src[j * cols + c];
}

// floats [begin, end) of the threads' partials (`stride` floats apart) summed in thread order into thread 0's.
FASTCHAT_INLINE void sum_partials(float* partials, int used, int64_t stride, int64_t begin, int64_t end) {
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    v16 sum = load(partials + j);
    for (int t = 1; t < used; ++t) sum += load(partials + t * stride + j);
    store(partials + j, sum);
  }
  for (; j < end; ++j)
    for (int t = 1; t < used; ++t) partials[j] += partials[t * stride + j];
}

// Rows [begin, end) of a group forward: s = x [A_0; A_1; ...]^T (one pass over x for all layers of the group),
// then y_g += s_g (scale_g B_g)^T. at = the stacked A^T [in x RS*16]; bt[g] = scale_g B_g^T [r x out_g].
template <int R, int RS>
FASTCHAT_INLINE void forward_rows(const Group& group, const float* at, const float* const* bt, int64_t begin,
                                  int64_t end) {
  constexpr int64_t r = R * kLanes, rs = RS * kLanes;
  const int64_t in = group.in;
  for (int64_t i = begin; i < end; i += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, end - i);
    skinny<RS>(group.x + i * in, in, at, in, group.s + i * rs, rs, rows, 1.f);
    for (int g = 0; g < group.layers; ++g) {
      const int64_t out = group.out[g];
      wide<R>(group.s + i * rs + g * r, rs, bt[g], out, group.y[g] + i * out, out, rows);
    }
  }
}

// Rows [begin, end) of a group backward, per 64-row block: t_g = scale_g dy_g B_g and db_g += dy_g^T s_g for each
// layer, then for the stacked t: dA^T += x^T t and dx += t [A_0; A_1; ...] (one pass over x and dx for the
// group). dat [in x RS*16] and db (the layers' [out_g x r] one after another) are this thread's partials; t is a
// [64 x RS*16] scratch block; a_stacked [RS*16 x in].
template <int R, int RS>
FASTCHAT_INLINE void backward_rows(const Group& group, const float* a_stacked, float* dat, float* db, float* t,
                                   int64_t begin, int64_t end) {
  constexpr int64_t r = R * kLanes, rs = RS * kLanes;
  const int64_t in = group.in;
  for (int64_t i = begin; i < end; i += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, end - i);
    float* db_layer = db;
    for (int g = 0; g < group.layers; ++g) {
      const int64_t out = group.out[g];
      const float* dy = group.dy[g] + i * out;
      skinny<R>(dy, out, group.b[g], out, t + g * r, rs, rows, group.scale[g]);
      outer<R>(dy, out, group.s + i * rs + g * r, rs, rows, out, db_layer);
      db_layer += out * r;
    }
    outer<RS>(group.x + i * in, in, t, rs, rows, in, dat);
    if (group.dx) wide<RS>(t, rs, a_stacked, in, group.dx + i * in, in, rows);
  }
}

using ForwardFn = void (*)(const Group&, const float*, const float* const*, int64_t, int64_t);
using BackwardFn = void (*)(const Group&, const float*, float*, float*, float*, int64_t, int64_t);
using TransposeFn = void (*)(const float*, int64_t, int64_t, float*, int64_t, float);
using SumFn = void (*)(float*, int, int64_t, int64_t, int64_t);

// The (R, RS) pairs built: RS a multiple of R, RS <= 4 (stacked rank <= 64).
#define FASTCHAT_LORA_PAIRS(MACRO, SUFFIX) \
  MACRO(SUFFIX, 1, 1) MACRO(SUFFIX, 1, 2) MACRO(SUFFIX, 1, 3) MACRO(SUFFIX, 1, 4) MACRO(SUFFIX, 2, 2) \
  MACRO(SUFFIX, 2, 4) MACRO(SUFFIX, 3, 3) MACRO(SUFFIX, 4, 4)
#define FASTCHAT_LORA_PICK(SUFFIX, R_, RS_) \
  if (R == R_ && RS == RS_) return {forward_##SUFFIX<R_, RS_>, backward_##SUFFIX<R_, RS_>};

struct Kernels {
  ForwardFn forward;
  BackwardFn backward;
};

#define FASTCHAT_LORA_VERSIONS(TARGET, SUFFIX)                                                                   \
  template <int R, int RS>                                                                                     \
  TARGET void forward_##SUFFIX(const Group& group, const float* at, const float* const* bt, int64_t b,          \
                               int64_t e) {                                                                    \
    forward_rows<R, RS>(group, at, bt, b, e);                                                                  \
  }                                                                                                            \
  template <int R, int RS>                                                                                     \
  TARGET void backward_##SUFFIX(const Group& group, const float* a_stacked, float* dat, float* db, float* t,    \
                                int64_t b, int64_t e) {                                                        \
    backward_rows<R, RS>(group, a_stacked, dat, db, t, b, e);                                                  \
  }                                                                                                            \
  TARGET void transpose_##SUFFIX(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ldd,         \
                                 float alpha) {                                                                \
    transpose(src, rows, cols, dst, ldd, alpha);                                                               \
  }                                                                                                            \
  TARGET void sum_partials_##SUFFIX(float* partials, int used, int64_t stride, int64_t b, int64_t e) {          \
    sum_partials(partials, used, stride, b, e);                                                                \
  }                                                                                                            \
  Kernels pick_kernels_##SUFFIX(int64_t R, int64_t RS) {                                                       \
    FASTCHAT_LORA_PAIRS(FASTCHAT_LORA_PICK, SUFFIX)                                                            \
    return {nullptr, nullptr};                                                                                 \
  }

FASTCHAT_LORA_VERSIONS(, baseline)
#ifdef FASTCHAT_HAS_X86_VERSIONS
FASTCHAT_LORA_VERSIONS(FASTCHAT_TARGET_AVX2, avx2)
FASTCHAT_LORA_VERSIONS(FASTCHAT_TARGET_AVX512, avx512)
#endif

// The builds for this CPU.
Kernels pick_kernels(int64_t R, int64_t RS) { return FASTCHAT_SIMD_PICK(pick_kernels)(R, RS); }

// At least kMinRowsPerThread rows each: every thread zeroes and sums a partial of (in + out) x r floats, which
// outweighs a thread's share of the products below that (many cores, few tokens).
constexpr int64_t kMinRowsPerThread = 32;

int used_threads(int64_t m, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(1, threads), m / kMinRowsPerThread)));
}

Kernels kernels_for(const Group& group) {
  const Kernels k = pick_kernels(group.r / kLanes, group.layers * group.r / kLanes);
  if (!k.forward) throw std::invalid_argument("cpu lora: unsupported rank / group size");
  return k;
}

}  // namespace

void forward(const Group& group, int threads) {
  const Kernels kernels = kernels_for(group);
  const int64_t r = group.r, rs = group.layers * r, in = group.in;
  // The stacked A^T and each scale_g B_g^T, so every product streams whole rows of 16-float vectors.
  int64_t bt_size = 0;
  for (int g = 0; g < group.layers; ++g) bt_size += group.out[g] * r;
  std::unique_ptr<float[]> at(new float[static_cast<size_t>(in * rs + bt_size)]);
  const float* bt[kMaxLayers];
  const TransposeFn transpose_fn = FASTCHAT_SIMD_PICK(transpose);
  float* next = at.get() + in * rs;
  for (int g = 0; g < group.layers; ++g) {
    transpose_fn(group.a[g], r, in, at.get() + g * r, rs, 1.f);
    transpose_fn(group.b[g], group.out[g], r, next, group.out[g], group.scale[g]);
    bt[g] = next;
    next += group.out[g] * r;
  }
  split_rows(group.m, used_threads(group.m, threads), [&](int, int64_t begin, int64_t end) {
    if (begin < end) kernels.forward(group, at.get(), bt, begin, end);
  });
}

void backward(const Group& group, int threads) {
  const Kernels kernels = kernels_for(group);
  const int64_t r = group.r, rs = group.layers * r, in = group.in;
  const int used = used_threads(group.m, threads);
  int64_t db_size = 0;
  for (int g = 0; g < group.layers; ++g) db_size += group.out[g] * r;
  // Per thread: the dA^T [in x rs] and db partials (each thread sums its own rows; added up below in thread
  // order, so a given thread count always gives the same bits) and a block of t. Then the stacked A, once.
  const int64_t partial = in * rs + db_size, per_thread = partial + kBlockRows * rs;
  const bool stack = group.layers > 1;  // one layer's A is already its own stack
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(used * per_thread + (stack ? rs * in : 0))]);
  float* stacked = scratch.get() + used * per_thread;
  for (int g = 0; stack && g < group.layers; ++g) std::copy(group.a[g], group.a[g] + r * in, stacked + g * r * in);
  const float* a_stacked = stack ? stacked : group.a[0];
  split_rows(group.m, used, [&](int t, int64_t begin, int64_t end) {
    float* mine = scratch.get() + t * per_thread;
    std::fill(mine, mine + partial, 0.f);  // zeroed by its thread
    if (begin < end) kernels.backward(group, a_stacked, mine, mine + in * rs, mine + partial, begin, end);
  });
  float* sum = scratch.get();
  if (used > 1) {
    const SumFn sum_fn = FASTCHAT_SIMD_PICK(sum_partials);
    const int64_t per = (partial / used + kLanes - 1) / kLanes * kLanes;  // whole vectors per thread
    split_rows(used, used, [&](int t, int64_t, int64_t) {
      const int64_t begin = std::min(partial, t * per), end = t == used - 1 ? partial : std::min(partial, (t + 1) * per);
      if (begin < end) sum_fn(sum, used, per_thread, begin, end);
    });
  }
  // da (the layers' [r x in] stacked) = the summed dA^T transposed; db_g = scale_g * its summed partial.
  FASTCHAT_SIMD_PICK(transpose)(sum, in, rs, group.da, in, 1.f);
  const float* db_sum = sum + in * rs;
  for (int g = 0; g < group.layers; ++g) {
    const float scale = group.scale[g];
    for (int64_t i = 0; i < group.out[g] * r; ++i) group.db[g][i] = scale * db_sum[i];
    db_sum += group.out[g] * r;
  }
}

}  // namespace fastchat::lora
