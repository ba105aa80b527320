// Run a worker on `threads` threads for the CPU kernels (cpu_attention.cc, cpu_lora.cc, cpu_rms_norm.cc,
// cpu_swiglu.cc), and which of their builds (cpu_simd.h) this CPU runs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

namespace fastchat::cpu {

// worker(t) once for each t in [0, threads), on up to `threads` threads (t = 0 on the calling thread); returns when
// all are done. The threads are torch's
// own OpenMP team when the process has one (torch loads libgomp with its symbols global), so the work lands on
// threads already spinning for torch's next op: threads of our own would share the cores with those spinning
// ones (libgomp spins for milliseconds after each parallel op), measured 2-3x slower on 2 cores. Without an
// OpenMP runtime in the process: std::thread. The worker must not throw.
void run_on_threads(int threads, const std::function<void(int)>& worker);

// fn(t, begin, end) on min(threads, rows) threads (at least one): contiguous row ranges covering [0, rows), one per
// thread t; the last ones may be empty (fn still runs, e.g. to zero that thread's partial sums).
template <class Fn>
void split_rows(int64_t rows, int threads, Fn&& fn) {
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  const int64_t per = (rows + used - 1) / used;
  run_on_threads(used, [&](int t) {
    const int64_t begin = std::min(rows, t * per), end = std::min(rows, (t + 1) * per);
    fn(t, begin, end);
  });
}

// 2: AVX-512 (F, DQ, VL, BW), 1: AVX2 + FMA, 0: baseline, as this CPU supports; the environment variable
// FASTCHAT_FT_CPU_SIMD=avx2 or baseline caps it (to test or compare the other builds; other values throw
// std::invalid_argument). Read once. Call it on the calling thread, before starting workers.
int simd_level();

}  // namespace fastchat::cpu
