#include "cpu_parallel.h"

#include "cpu_simd.h"

#include <dlfcn.h>
#include <strings.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace fastchat::cpu {
namespace {

using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);  // libgomp's GOMP_parallel
using QueryFn = int (*)();

// The OpenMP runtime that exports GOMP_parallel, with its own omp_get_thread_num / omp_get_num_threads (looked up
// in that same library: with two runtimes loaded, mixing them would number every thread 0).
struct OpenMP {
  ParallelFn parallel = nullptr;
  QueryFn thread_num = nullptr, num_threads = nullptr;
};

OpenMP find_openmp() {
  OpenMP omp;
  void* parallel = dlsym(RTLD_DEFAULT, "GOMP_parallel");
  Dl_info info;
  if (!parallel || !dladdr(parallel, &info) || !info.dli_fname) return omp;
  void* lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);  // already loaded: just a handle to it
  if (!lib) return omp;
  omp.thread_num = reinterpret_cast<QueryFn>(dlsym(lib, "omp_get_thread_num"));
  omp.num_threads = reinterpret_cast<QueryFn>(dlsym(lib, "omp_get_num_threads"));
  dlclose(lib);  // drops only the reference RTLD_NOLOAD added
  if (omp.thread_num && omp.num_threads) omp.parallel = reinterpret_cast<ParallelFn>(parallel);
  return omp;
}

struct Task {
  const std::function<void(int)>* worker;
  const OpenMP* omp;
  int threads;
  // The runtime may start fewer threads than asked (OMP_DYNAMIC, OMP_THREAD_LIMIT, nesting): every t still runs,
  // the team's threads taking them in turn.
  static void run(void* self) {
    auto* task = static_cast<Task*>(self);
    const int team = std::max(1, task->omp->num_threads());
    for (int t = task->omp->thread_num(); t < task->threads; t += team) (*task->worker)(t);
  }
};

}  // namespace

void run_on_threads(int threads, const std::function<void(int)>& worker) {
  if (threads <= 1) {
    worker(0);
    return;
  }
  // found once torch has loaded its runtime (this module may be imported first); until then: std::thread
  static std::mutex mutex;
  static OpenMP cached;
  OpenMP omp;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!cached.parallel) cached = find_openmp();
    omp = cached;
  }
  if (omp.parallel) {
    Task task{&worker, &omp, threads};
    omp.parallel(&Task::run, &task, static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& t : pool) t.join();
}

int simd_level() {
  static const int level = [] {
    int supported = 0;
#ifdef FASTCHAT_HAS_X86_VERSIONS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      supported = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      supported = 1;
#endif
    const char* cap = std::getenv("FASTCHAT_FT_CPU_SIMD");
    if (!cap || !*cap || strcasecmp(cap, "avx512") == 0) return supported;
    if (strcasecmp(cap, "avx2") == 0) return std::min(supported, 1);
    if (strcasecmp(cap, "baseline") == 0) return 0;
    // a typo must not silently test the wrong build; thrown on the caller's thread (the kernels pick their build
    // before they start threads), so Python gets a ValueError
    throw std::invalid_argument(std::string("FASTCHAT_FT_CPU_SIMD=") + cap +
                                ": use avx512, avx2 or baseline, or leave it unset (the CPU's best)");
  }();
  return level;
}

}  // namespace fastchat::cpu
