// Portable 16-float vectors for the CPU kernels (cpu_attention.cc, cpu_lora.cc, cpu_rms_norm.cc, cpu_swiglu.cc) and
// the run-time choice between their AVX-512, AVX2+FMA and baseline builds.
//
// Each kernel writes its loop body once as an always-inline function and instantiates it three times under
// FASTCHAT_SIMD_VERSIONS-style wrappers with target attributes; simd_level() picks one by the CPU's features.
// (GCC's target_clones("arch=...") would test the CPU model, not its features: an AMD CPU with AVX-512 would get
// the baseline.) GCC and Clang lower v16 to whatever the target has: one zmm, two ymm or four xmm registers.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_parallel.h"

#define FASTCHAT_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTCHAT_HAS_X86_VERSIONS 1
#define FASTCHAT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FASTCHAT_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#endif

// The build of a kernel function for this CPU: NAME_avx512, NAME_avx2 or NAME_baseline (each kernel file defines
// the three; only the baseline off x86).
#ifdef FASTCHAT_HAS_X86_VERSIONS
#define FASTCHAT_SIMD_PICK(NAME)                                                                   \
  (::fastchat::cpu::simd_level() == 2   ? NAME##_avx512                                             \
   : ::fastchat::cpu::simd_level() == 1 ? NAME##_avx2                                               \
                                        : NAME##_baseline)
#else
#define FASTCHAT_SIMD_PICK(NAME) NAME##_baseline
#endif

namespace fastchat::cpu {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

FASTCHAT_INLINE v16 load(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }
FASTCHAT_INLINE void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }
// Every lane x, as a shuffle of lane 0 written in one expression: GCC then emits one broadcast, folded into an
// FMA's operand where it can. Other spellings measured worse in the LoRA kernel's loops: v16{} + x keeps a real
// add (-0.f + 0.f is +0.f); x - v16{}, a list of 16 x's, or the same shuffle of a named local became 16 masked
// inserts per splat with GCC 12.
FASTCHAT_INLINE v16 splat(float x) {
#if defined(__clang__)
  return __builtin_shufflevector(v16{x}, v16{x}, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
#else
  return __builtin_shuffle(v16{x}, i16v{});
#endif
}

// exp on 16 lanes: 2^n * e^r with r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (error < 2 ulp); inputs
// clamped to [-87, 88], so never inf and never denormal. libm's expf does not vectorise without -ffast-math.
FASTCHAT_INLINE v16 vexp(v16 x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;   // e^-87 ~ 1.6e-38: still a normal float, ~0 next to 1
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

FASTCHAT_INLINE float hsum(v16 x) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += x[l];
  return s;
}

// simd_level() (the build to run) is declared in cpu_parallel.h, beside its definition.

}  // namespace fastchat::cpu
