#include "cpu_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <dlfcn.h>
#include <exception>
#include <functional>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

namespace fastchat::attention {
namespace {

#define INLINE inline __attribute__((always_inline))

// 16 floats; the compiler maps it to one AVX-512 register, two AVX2 or four SSE registers per clone.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kRows = 4;    // micro-kernel rows (A rows in registers as broadcasts)
constexpr int64_t kCols = 32;   // micro-kernel columns (two vectors): every N below is a multiple of it

INLINE v16 load(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }
INLINE void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }
INLINE v16 splat(float x) { return v16{} + x; }
INLINE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// exp on 16 lanes: 2^n * e^r with r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (error < 2 ulp).
// libm's expf does not vectorise without -ffast-math, and softmax needs one exp per score.
INLINE v16 vexp(v16 x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;   // e^-87 ~ 1.6e-38: still a normal float, ~0 next to the row max
  x = x > splat(88.f) ? splat(88.f) : x;
  const v16 magic = splat(12582912.f);       // 1.5 * 2^23: adding it rounds to the nearest integer
  v16 n = (x * splat(1.44269504f) + magic) - magic;
  v16 r = x - n * splat(0.693145752f) - n * splat(1.42860677e-06f);  // ln 2 in two parts: exact n * hi
  v16 p = splat(1.f / 720);
  p = p * r + splat(1.f / 120);
  p = p * r + splat(1.f / 24);
  p = p * r + splat(1.f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

INLINE float hsum(v16 x) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += x[l];
  return s;
}

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
    for (int64_t d = 0; d < D; ++d) {
      qs[i * Dp + d] = qi[d] * sh.scale;
      kt[d * Lp + i] = ki[d];
    }
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
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      qs[i * Dp + d] = q[tq + d] * sh.scale;
      kt[d * Lp + i] = k[tk + d];
      vt[d * Lp + i] = v[tk + d];
      dot += dout[tq + d] * out[tq + d];
    }
    std::memcpy(kb + i * Dp, k + tk, D * sizeof(float));
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
      float* dst = dq + (it.start + i) * qstride + it.head * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = tmp[(i - i0) * Dp + d] * sh.scale;
    }
  }
  // dk = dS^T (scale q), dv = P^T dout. Row j sums over query rows i >= j (causal); every entry read, (i, j) with
  // j0 <= i < L and j < j0 + 4, was written above (zero where j > i).
  for (int64_t j0 = 0; j0 < L; j0 += kRows) {
    const int64_t jend = std::min(j0 + kRows, L);
    gemm4t(j0, L, Dp, dS + j0, Lp, qs, Dp, tmp, Dp);
    for (int64_t j = j0; j < jend; ++j)
      std::memcpy(dk_h + (it.start + j) * qstride + it.head * D, tmp + (j - j0) * Dp, D * sizeof(float));
    gemm4t(j0, L, Dp, P + j0, Lp, dob, Dp, tmp, Dp);
    for (int64_t j = j0; j < jend; ++j)
      std::memcpy(dv_h + (it.start + j) * qstride + it.head * D, tmp + (j - j0) * Dp, D * sizeof(float));
  }
}

// The threads: torch's own OpenMP team when the process has one (torch loads libgomp with its symbols global), so
// the work lands on threads that are already spinning for torch's next op. Threads of our own would share the
// cores with those spinning ones (libgomp spins for milliseconds after each parallel op): measured 2-3x slower.
// Without an OpenMP runtime in the process: std::thread.
using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
using ThreadNumFn = int (*)();

ParallelFn openmp_parallel() {
  return reinterpret_cast<ParallelFn>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
}

ThreadNumFn omp_thread_num() {
  return reinterpret_cast<ThreadNumFn>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
}

struct OpenMPTask {
  const std::function<void(int)>* worker;
  ThreadNumFn thread_num;
  static void run(void* self) {
    auto* task = static_cast<OpenMPTask*>(self);
    (*task->worker)(task->thread_num());
  }
};

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
  const ParallelFn parallel = openmp_parallel();
  const ThreadNumFn thread_num = omp_thread_num();
  if (parallel && thread_num && threads > 1) {
    OpenMPTask task{&worker, thread_num};
    parallel(&OpenMPTask::run, &task, (unsigned)threads, 0);
  } else {
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
    worker(0);
    for (auto& t : pool) t.join();
  }
  if (error) std::rethrow_exception(error);
}

// One build serves every x86-64 CPU: the per-item code is compiled for AVX-512, for AVX2+FMA and for the baseline,
// and the CPU's features pick one at run time. (target_clones' "arch=" versions test the CPU model, not its
// features, so an AMD CPU with AVX-512 would get the baseline.) Elsewhere: the plain build.
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
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
FASTCHAT_VERSIONS(__attribute__((target("avx2,fma"))), avx2)
FASTCHAT_VERSIONS(__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))), avx512)

struct Versions {
  ForwardFn forward = forward_baseline;
  BackwardFn backward = backward_baseline;
  Versions() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
      forward = forward_avx512, backward = backward_avx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      forward = forward_avx2, backward = backward_avx2;
    }
  }
};
#else
struct Versions {
  ForwardFn forward = forward_baseline;
  BackwardFn backward = backward_baseline;
};
#endif

const Versions& versions() {
  static const Versions v;
  return v;
}

int64_t longest(const Shape& sh) {
  int64_t m = 0;
  for (int64_t c = 0; c < sh.conversations; ++c) m = std::max(m, sh.lengths[c]);
  return m;
}

}  // namespace

void forward(const Shape& sh, const float* q, const float* k, const float* v, float* out, float* lse) {
  const int64_t Lp = round_up(longest(sh), kCols), Dp = round_up(sh.head_dim, kCols);
  const size_t floats = 2 * Lp * Dp + sh.head_dim * Lp + Lp * Lp + kRows * Dp;  // Lp bounds Lr and L
  const ForwardFn fn = versions().forward;
  run_items(sh, floats, [&](const Item& it, Scratch& s) { fn(sh, it, q, k, v, out, lse, s); });
}

void backward(const Shape& sh, const float* q, const float* k, const float* v, const float* out, const float* lse,
              const float* dout, float* dq, float* dk_h, float* dv_h) {
  const int64_t Lp = round_up(longest(sh), kCols), Dp = round_up(sh.head_dim, kCols);
  const size_t floats = 3 * Lp * Dp + 2 * sh.head_dim * Lp + 2 * Lp * Lp + Lp + kRows * Dp;
  const BackwardFn fn = versions().backward;
  run_items(sh, floats, [&](const Item& it, Scratch& s) {
    fn(sh, it, q, k, v, out, lse, dout, dq, dk_h, dv_h, s);
  });
}

}  // namespace fastchat::attention
