#include "cpu_attention.h"

#include "cpu_parallel.h"
#include "cpu_simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <vector>

namespace fastchat::attention {
namespace {

#define INLINE FASTCHAT_INLINE
using cpu::hsum;
using cpu::kLanes;
using cpu::load;
using cpu::splat;
using cpu::store;
using cpu::v16;
using cpu::vexp;
constexpr int64_t kRows = 4;    // micro-kernel rows (A rows in registers as broadcasts)
constexpr int64_t kCols = 32;   // micro-kernel columns (two vectors): every N below is a multiple of it

INLINE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[0:4, 0:n] = (or +=) A[0:4, k0:k1] B[k0:k1, 0:n], row-major, n a multiple of kCols. The four A values of
// each k are broadcast against two B vectors: 8 accumulators stay in registers over the whole k loop.
INLINE void gemm4(int64_t k0, int64_t k1, int64_t n, const float* A, int64_t lda, const float* B, int64_t ldb,
                  float* C, int64_t ldc) {
  const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda;
  for (int64_t j = 0; j < n; j += kCols) {
    v16 c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{};
    for (int64_t k = k0; k < k1; ++k) {
      const float* b = B + k * ldb + j;
      const v16 b0 = load(b), b1 = load(b + kLanes);
      c00 += a0[k] * b0; c01 += a0[k] * b1;
      c10 += a1[k] * b0; c11 += a1[k] * b1;
      c20 += a2[k] * b0; c21 += a2[k] * b1;
      c30 += a3[k] * b0; c31 += a3[k] * b1;
    }
    float* c = C + j;
    store(c, c00); store(c + kLanes, c01);
    store(c + ldc, c10); store(c + ldc + kLanes, c11);
    store(c + 2 * ldc, c20); store(c + 2 * ldc + kLanes, c21);
    store(c + 3 * ldc, c30); store(c + 3 * ldc + kLanes, c31);
  }
}

// Where one work item (a conversation and a query head) reads and writes.
struct Item {
  int64_t start, length, head, kv_head;
};

// Scratch for one thread, sized for the longest conversation: every buffer is zero-padded, rows to kRows
// multiples and columns to kCols multiples, so the micro-kernel never needs an edge case. Kept between calls (a
// fresh buffer of this size is a fresh mmap, and its page faults cost as much as the attention itself).
struct Scratch {
  std::vector<float> buf;
  size_t used = 0;
  float* take(size_t n) { return buf.data() + (used += n) - n; }
  void reset(size_t n) {
    if (buf.size() < n) buf.assign(n, 0.f);
    used = 0;
  }
};

// Row i of M (width Lp) over columns [0, i]: the row's max.
INLINE float row_max(const float* row, int64_t count) {
  int64_t j = 0;
  float m = -INFINITY;
  if (count >= kLanes) {
    v16 mv = load(row);
    for (j = kLanes; j + kLanes <= count; j += kLanes) { v16 x = load(row + j); mv = x > mv ? x : mv; }
    for (int64_t l = 0; l < kLanes; ++l) m = std::max(m, mv[l]);
  }
  for (; j < count; ++j) m = std::max(m, row[j]);
  return m;
}

// row[j] = exp(row[j] - shift) for j < count, zero for count <= j < zero_to (count <= zero_to, zero_to a multiple of
// kLanes or the row end); returns the sum over j < count.
INLINE float exp_row(float* row, int64_t count, int64_t zero_to, float shift) {
  v16 sum{};
  const v16 s = splat(shift);
  const int64_t full = count / kLanes * kLanes;
  for (int64_t j = 0; j < full; j += kLanes) { v16 p = vexp(load(row + j) - s); store(row + j, p); sum += p; }
  float total = hsum(sum);
  if (full < count) {  // the last partial vector: exp of all 16 lanes, keep the valid ones
    v16 p = vexp(load(row + full) - s);
    for (int64_t l = 0; l < count - full; ++l) { row[full + l] = p[l]; total += p[l]; }
  }
  std::fill(row + count, row + zero_to, 0.f);
  return total;
}

// C[0:4, 0:n] = A[k0:k1, 0:4]^T B[k0:k1, 0:n]: gemm4 with A read down its columns (a row of A^T is a column of
// A), for the key-side gradients, which sum over query rows: no transposed copy of the score matrices needed.
INLINE void gemm4t(int64_t k0, int64_t k1, int64_t n, const float* A, int64_t lda, const float* B, int64_t ldb,
                   float* C, int64_t ldc) {
  for (int64_t j = 0; j < n; j += kCols) {
    v16 c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{};
    for (int64_t k = k0; k < k1; ++k) {
      const float* a = A + k * lda;
      const float* b = B + k * ldb + j;
      const v16 b0 = load(b), b1 = load(b + kLanes);
      c00 += a[0] * b0; c01 += a[0] * b1;
      c10 += a[1] * b0; c11 += a[1] * b1;
      c20 += a[2] * b0; c21 += a[2] * b1;
      c30 += a[3] * b0; c31 += a[3] * b1;
    }
    float* c = C + j;
    store(c, c00); store(c + kLanes, c01);
    store(c + ldc, c10); store(c + ldc + kLanes, c11);
    store(c + 2 * ldc, c20); store(c + 2 * ldc + kLanes, c21);
    store(c + 3 * ldc, c30); store(c + 3 * ldc + kLanes, c31);
  }
}

// What the micro-kernels read beyond the conversation must be finite, and zero where it enters a sum: rows
// [rows, rows_to) of a row-major buffer, and columns [cols, cols_to) of its first `rows` rows.
INLINE void zero_padding(float* M, int64_t ld, int64_t rows, int64_t rows_to, int64_t cols, int64_t cols_to) {
  for (int64_t i = 0; i < rows && cols < cols_to; ++i) std::fill(M + i * ld + cols, M + i * ld + cols_to, 0.f);
  std::fill(M + rows * ld, M + rows_to * ld, 0.f);
}

// dst[d * stride] = mul * (x * cos + rotate_half(x) * sin)[d], or mul * x[d] without rotary (cos null).
INLINE void rotate_into(const float* x, const float* cos, const float* sin, int64_t D, float mul, float* dst,
                        int64_t stride) {
  if (!cos) {
    for (int64_t d = 0; d < D; ++d) dst[d * stride] = x[d] * mul;
    return;
  }
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) dst[d * stride] = (x[d] * cos[d] - x[d + h] * sin[d]) * mul;
  for (int64_t d = h; d < D; ++d) dst[d * stride] = (x[d] * cos[d] + x[d - h] * sin[d]) * mul;
}

// The transpose of rotate_into's map, for gradients: dst[d] = mul * (g[d] cos[d] + (d < h ? g[d+h] sin[d+h]
// : -g[d-h] sin[d-h])), or mul * g[d] without rotary.
INLINE void unrotate_into(const float* g, const float* cos, const float* sin, int64_t D, float mul, float* dst) {
  if (!cos) {
    for (int64_t d = 0; d < D; ++d) dst[d] = g[d] * mul;
    return;
  }
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) dst[d] = (g[d] * cos[d] + g[d + h] * sin[d + h]) * mul;
  for (int64_t d = h; d < D; ++d) dst[d] = (g[d] * cos[d] - g[d - h] * sin[d - h]) * mul;
}

// out, lse for one conversation and query head.
INLINE void forward_item(const Shape& sh, const Item& it, const float* q, const float* k, const float* v,
                         float* out, float* lse, Scratch& scratch) {
  const int64_t L = it.length, D = sh.head_dim, Dp = round_up(D, kCols), Lp = round_up(L, kCols);
  const int64_t Lr = round_up(L, kRows);
  const int64_t qstride = sh.heads * D, kstride = sh.kv_heads * D;
  float* qs = scratch.take(Lr * Dp);  // scale * q: the A side of the scores
  float* kt = scratch.take(D * Lp);   // k transposed: the B side of the scores
  float* vb = scratch.take(L * Dp);
  float* S = scratch.take(Lr * Lp);
  float* ob = scratch.take(kRows * Dp);
  zero_padding(qs, Dp, L, Lr, D, Dp);
  zero_padding(kt, Lp, D, D, L, Lp);
  zero_padding(vb, Dp, L, L, D, Dp);
  for (int64_t i = 0; i < L; ++i) {
    const float* qi = q + (it.start + i) * qstride + it.head * D;
    const float* ki = k + (it.start + i) * kstride + it.kv_head * D;
    const float* vi = v + (it.start + i) * kstride + it.kv_head * D;
    const float* cos = sh.cos ? sh.cos + (it.start + i) * D : nullptr;
    const float* sin = sh.sin ? sh.sin + (it.start + i) * D : nullptr;
    rotate_into(qi, cos, sin, D, sh.scale, qs + i * Dp, 1);
    rotate_into(ki, cos, sin, D, 1.f, kt + i, Lp);
    std::memcpy(vb + i * Dp, vi, D * sizeof(float));
  }
  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const int64_t kend = std::min(i0 + kRows, L), n = round_up(kend, kCols);
    gemm4(0, D, n, qs + i0 * Dp, Dp, kt, Lp, S + i0 * Lp, Lp);
    for (int64_t i = i0; i < kend; ++i) {
      float* row = S + i * Lp;
      const float m = row_max(row, i + 1);
      const float total = exp_row(row, i + 1, n, m);
      const v16 inv = splat(1.f / total);
      for (int64_t j = 0; j <= i; j += kLanes) store(row + j, load(row + j) * inv);  // zeros beyond i stay 0
      lse[(it.start + i) * sh.heads + it.head] = m + std::log(total);
    }
    gemm4(0, kend, Dp, S + i0 * Lp, Lp, vb, Dp, ob, Dp);
    for (int64_t i = i0; i < kend; ++i)
      std::memcpy(out + (it.start + i) * qstride + it.head * D, ob + (i - i0) * Dp, D * sizeof(float));
  }
}

INLINE void backward_item(const Shape& sh, const Item& it, const float* q, const float* k, const float* v,
                          const float* out, const float* lse, const float* dout, float* dq, float* dk_h,
                          float* dv_h, Scratch& scratch) {
  const int64_t L = it.length, D = sh.head_dim, Dp = round_up(D, kCols), Lp = round_up(L, kCols);
  const int64_t Lr = round_up(L, kRows);
  const int64_t qstride = sh.heads * D, kstride = sh.kv_heads * D;
  float* qs = scratch.take(Lr * Dp);   // scale * q
  float* kt = scratch.take(D * Lp);
  float* kb = scratch.take(L * Dp);
  float* vt = scratch.take(D * Lp);
  float* dob = scratch.take(Lr * Dp);
  float* P = scratch.take(Lr * Lp);
  float* dS = scratch.take(Lr * Lp);
  float* rowdot = scratch.take(Lp);    // D_i = dout_i . out_i
  float* tmp = scratch.take(kRows * Dp);
  zero_padding(qs, Dp, L, Lr, D, Dp);
  zero_padding(dob, Dp, L, Lr, D, Dp);
  zero_padding(kb, Dp, L, L, D, Dp);
  zero_padding(kt, Lp, D, D, L, Lp);
  zero_padding(vt, Lp, D, D, L, Lp);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t tq = (it.start + i) * qstride + it.head * D, tk = (it.start + i) * kstride + it.kv_head * D;
    const float* cos = sh.cos ? sh.cos + (it.start + i) * D : nullptr;
    const float* sin = sh.sin ? sh.sin + (it.start + i) * D : nullptr;
    rotate_into(q + tq, cos, sin, D, sh.scale, qs + i * Dp, 1);
    rotate_into(k + tk, cos, sin, D, 1.f, kt + i, Lp);
    rotate_into(k + tk, cos, sin, D, 1.f, kb + i * Dp, 1);
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      vt[d * Lp + i] = v[tk + d];
      dot += dout[tq + d] * out[tq + d];
    }
    std::memcpy(dob + i * Dp, dout + tq, D * sizeof(float));
    rowdot[i] = dot;
  }
  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const int64_t kend = std::min(i0 + kRows, L), n = round_up(kend, kCols);
    gemm4(0, D, n, qs + i0 * Dp, Dp, kt, Lp, P + i0 * Lp, Lp);     // scores again
    gemm4(0, D, n, dob + i0 * Dp, Dp, vt, Lp, dS + i0 * Lp, Lp);   // dP = dout v^T
    for (int64_t i = i0; i < kend; ++i) {
      float* p = P + i * Lp;
      float* ds = dS + i * Lp;
      exp_row(p, i + 1, n, lse[(it.start + i) * sh.heads + it.head]);
      const v16 di = splat(rowdot[i]);
      for (int64_t j = 0; j < n; j += kLanes) store(ds + j, load(p + j) * (load(ds + j) - di));  // 0 beyond i
    }
    gemm4(0, kend, Dp, dS + i0 * Lp, Lp, kb, Dp, tmp, Dp);          // dq = scale dS k
    for (int64_t i = i0; i < kend; ++i) {
      const int64_t t = it.start + i;
      unrotate_into(tmp + (i - i0) * Dp, sh.cos ? sh.cos + t * D : nullptr, sh.sin ? sh.sin + t * D : nullptr, D,
                    sh.scale, dq + t * qstride + it.head * D);
    }
  }
  // dk = dS^T (scale q), dv = P^T dout. Row j sums over query rows i >= j (causal); every entry read, (i, j) with
  // j0 <= i < L and j < j0 + 4, was written above (zero where j > i).
  for (int64_t j0 = 0; j0 < L; j0 += kRows) {
    const int64_t jend = std::min(j0 + kRows, L);
    gemm4t(j0, L, Dp, dS + j0, Lp, qs, Dp, tmp, Dp);
    for (int64_t j = j0; j < jend; ++j) {
      const int64_t t = it.start + j;
      unrotate_into(tmp + (j - j0) * Dp, sh.cos ? sh.cos + t * D : nullptr, sh.sin ? sh.sin + t * D : nullptr, D,
                    1.f, dk_h + t * qstride + it.head * D);
    }
    gemm4t(j0, L, Dp, P + j0, Lp, dob, Dp, tmp, Dp);
    for (int64_t j = j0; j < jend; ++j)
      std::memcpy(dv_h + (it.start + j) * qstride + it.head * D, tmp + (j - j0) * Dp, D * sizeof(float));
  }
}

// Every (conversation, query head) item, longest first, shared by `threads` threads through one counter.
template <class Fn>
void run_items(const Shape& sh, size_t floats_per_item_of_max, Fn&& fn) {
  std::vector<Item> items;
  items.reserve(sh.conversations * sh.heads);
  const int64_t group = sh.heads / sh.kv_heads;
  for (int64_t c = 0; c < sh.conversations; ++c)
    for (int64_t h = 0; h < sh.heads; ++h)
      if (sh.lengths[c] > 0) items.push_back({sh.starts[c], sh.lengths[c], h, h / group});
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.length > b.length; });
  const int threads = std::max(1, std::min<int>(sh.threads, (int)items.size()));
  // one set of scratch buffers per thread, reused by the next call; a concurrent call gets its own
  static std::mutex shared_mutex;
  static std::vector<Scratch> shared;
  std::unique_lock<std::mutex> lock(shared_mutex, std::try_to_lock);
  std::vector<Scratch> own;
  std::vector<Scratch>& scratches = lock.owns_lock() ? shared : own;
  if (scratches.size() < (size_t)threads) scratches.resize(threads);
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  const std::function<void(int)> worker = [&](int t) {
    try {
      Scratch& scratch = scratches.at(t);
      for (size_t i; (i = next.fetch_add(1)) < items.size() && !failed.load();) {
        scratch.reset(floats_per_item_of_max);
        fn(items[i], scratch);
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  cpu::run_on_threads(threads, worker);
  if (error) std::rethrow_exception(error);
}

// The item code built for AVX-512, AVX2+FMA and the baseline (cpu_simd.h); simd_level() picks one.
using ForwardFn = void (*)(const Shape&, const Item&, const float*, const float*, const float*, float*, float*,
                           Scratch&);
using BackwardFn = void (*)(const Shape&, const Item&, const float*, const float*, const float*, const float*,
                            const float*, const float*, float*, float*, float*, Scratch&);

#define FASTCHAT_VERSIONS(TARGET, SUFFIX)                                                                        \
  TARGET void forward_##SUFFIX(const Shape& sh, const Item& it, const float* q, const float* k, const float* v, \
                               float* out, float* lse, Scratch& s) {                                            \
    forward_item(sh, it, q, k, v, out, lse, s);                                                                  \
  }                                                                                                              \
  TARGET void backward_##SUFFIX(const Shape& sh, const Item& it, const float* q, const float* k, const float* v, \
                                const float* out, const float* lse, const float* dout, float* dq, float* dk_h,  \
                                float* dv_h, Scratch& s) {                                                      \
    backward_item(sh, it, q, k, v, out, lse, dout, dq, dk_h, dv_h, s);                                          \
  }

FASTCHAT_VERSIONS(, baseline)
#ifdef FASTCHAT_HAS_X86_VERSIONS
FASTCHAT_VERSIONS(FASTCHAT_TARGET_AVX2, avx2)
FASTCHAT_VERSIONS(FASTCHAT_TARGET_AVX512, avx512)
#endif

ForwardFn forward_version() { return FASTCHAT_SIMD_PICK(forward); }

BackwardFn backward_version() { return FASTCHAT_SIMD_PICK(backward); }

int64_t longest(const Shape& sh) {
  int64_t m = 0;
  for (int64_t c = 0; c < sh.conversations; ++c) m = std::max(m, sh.lengths[c]);
  return m;
}

}  // namespace

void forward(const Shape& sh, const float* q, const float* k, const float* v, float* out, float* lse) {
  const int64_t Lp = round_up(longest(sh), kCols), Dp = round_up(sh.head_dim, kCols);
  const size_t floats = 2 * Lp * Dp + sh.head_dim * Lp + Lp * Lp + kRows * Dp;  // Lp bounds Lr and L
  const ForwardFn fn = forward_version();
  run_items(sh, floats, [&](const Item& it, Scratch& s) { fn(sh, it, q, k, v, out, lse, s); });
}

void backward(const Shape& sh, const float* q, const float* k, const float* v, const float* out, const float* lse,
              const float* dout, float* dq, float* dk_h, float* dv_h) {
  const int64_t Lp = round_up(longest(sh), kCols), Dp = round_up(sh.head_dim, kCols);
  const size_t floats = 3 * Lp * Dp + 2 * sh.head_dim * Lp + 2 * Lp * Lp + Lp + kRows * Dp;
  const BackwardFn fn = backward_version();
  run_items(sh, floats, [&](const Item& it, Scratch& s) {
    fn(sh, it, q, k, v, out, lse, dout, dq, dk_h, dv_h, s);
  });
}

}  // namespace fastchat::attention
