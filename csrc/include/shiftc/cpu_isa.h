// x86-64 instruction-set levels that shiftc's kernels dispatch on at run time (bcq_lut.cc,
// attention.cc): one definition of what each level needs from the CPU.
#pragma once

#if defined(__x86_64__)
#include <cpuid.h>

// The AVX2 level: AVX2, FMA and F16C (half <-> float). F16C is read from CPUID.1:ECX bit 29
// directly: not every compiler that builds the kernels knows "f16c" in __builtin_cpu_supports.
static inline bool shiftc_cpu_avx2() {
  __builtin_cpu_init();
  unsigned a, b, c, d;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && ((c >> 29) & 1);
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
}

// The AVX-512 level: AVX2 and FMA, and AVX-512 F, BW, VL and DQ.
static inline bool shiftc_cpu_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif
