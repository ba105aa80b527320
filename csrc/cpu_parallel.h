// Run a worker on `threads` threads for the CPU kernels (cpu_attention.cc, cpu_lora.cc, cpu_rms_norm.cc,
// cpu_swiglu.cc).
#pragma once

#include <functional>

namespace fastchat::cpu {

// worker(t) once for each t in [0, threads), on up to `threads` threads (t = 0 on the calling thread); returns when
// all are done. The threads are torch's
// own OpenMP team when the process has one (torch loads libgomp with its symbols global), so the work lands on
// threads already spinning for torch's next op: threads of our own would share the cores with those spinning
// ones (libgomp spins for milliseconds after each parallel op), measured 2-3x slower on 2 cores. Without an
// OpenMP runtime in the process: std::thread. The worker must not throw.
void run_on_threads(int threads, const std::function<void(int)>& worker);

}  // namespace fastchat::cpu
