#include "cpu_parallel.h"

#include "cpu_simd.h"

#include <dlfcn.h>

#include <thread>
#include <vector>

namespace fastchat::cpu {
namespace {

using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);  // libgomp's GOMP_parallel
using ThreadNumFn = int (*)();

struct Task {
  const std::function<void(int)>* worker;
  ThreadNumFn thread_num;
  static void run(void* self) {
    auto* task = static_cast<Task*>(self);
    (*task->worker)(task->thread_num());
  }
};

}  // namespace

void run_on_threads(int threads, const std::function<void(int)>& worker) {
  if (threads <= 1) {
    worker(0);
    return;
  }
  // looked up per call (a few hundred ns): torch may be imported after this module
  const auto parallel = reinterpret_cast<ParallelFn>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  const auto thread_num = reinterpret_cast<ThreadNumFn>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
  if (parallel && thread_num) {
    Task task{&worker, thread_num};
    parallel(&Task::run, &task, static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& t : pool) t.join();
}

int simd_level() {
  static const int level = [] {
#ifdef FASTCHAT_HAS_X86_VERSIONS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
  }();
  return level;
}

}  // namespace fastchat::cpu
