// shiftc attention over an in-place KV cache: contract in shiftc/attention.h.
//
// Per task (one sequence and query head) and query row (decode; prefill in blocks of rows, see
// attention_isa.inc): scores over the visible keys, a max, exp(score - max) by a branch-free
// polynomial that vectorises, and the weighted sum of value rows. The cache holds float32 or
// float16 rows: float16 halves the bytes that a long-context decode step streams; rows are
// widened to float32 as they are loaded and all arithmetic is float32.
//
// The loops (attention_isa.inc) are compiled once per instruction set, each copy with that set's
// 16-lane loads and float16 conversions (AVX-512, AVX2 + F16C, and the baseline: NEON on
// aarch64, portable bit arithmetic elsewhere); the best copy the CPU runs is chosen at the first
// call (shiftc_attention_set_isa overrides it). Self-contained like bcq_lut.cc: `shiftc compile`
// compiles it standalone into decoder libraries, for x86-64 and aarch64, with no ISA flags.
#include "shiftc/attention.h"
#include "shiftc/cpu_isa.h"

#include <math.h>
#include <string.h>

#include <atomic>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SHIFTC_ATTN_X86 1
#include <immintrin.h>
#else
#define SHIFTC_ATTN_X86 0
#endif
#if defined(__aarch64__)
#define SHIFTC_ATTN_NEON 1
#include <arm_neon.h>
#else
#define SHIFTC_ATTN_NEON 0
#endif
#define SHIFTC_INLINE static inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vectors passed between always-inline helpers (never across a call) and GCC's
// _mm512_undefined_ps inside _mm512_cvtph_ps trip these two warnings
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

constexpr int kLanes = 16;
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));  // rows are only 4-byte aligned
typedef int v16i __attribute__((vector_size(64)));
typedef unsigned v16u __attribute__((vector_size(64)));
typedef uint16_t v16h_u __attribute__((vector_size(32), aligned(2)));

// exp(x) for x <= 0 (arguments are score - max): x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial
// (relative error ~2e-7), 2^n through the exponent bits; x < -87 gives 0.
SHIFTC_INLINE float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float xc = x < -87.0f ? -87.0f : x;
  float n = __builtin_floorf(xc * kLog2e + 0.5f);
  float r = xc - n * kLn2Hi - n * kLn2Lo;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

SHIFTC_INLINE float hsum16(v16f a) {
#if defined(__GNUC__) && !defined(__clang__)
  a += __builtin_shuffle(a, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  a += __builtin_shuffle(a, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  a += __builtin_shuffle(a, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  a += __builtin_shuffle(a, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return a[0];
#else
  float t[kLanes];
  memcpy(t, &a, sizeof t);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
#endif
}

// exp_nonpositive on 16 lanes (the same steps and constants, written on vectors so that they
// vectorise: floor by truncation and a correction, 2^n through the exponent bits).
SHIFTC_INLINE v16f exp_nonpositive16(v16f x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const v16f xc = x < -87.0f ? -87.0f : x;
  const v16f u = xc * kLog2e + 0.5f;
  v16i ni = __builtin_convertvector(u, v16i);  // toward zero
  ni += (__builtin_convertvector(ni, v16f) > u);  // true is -1: floor for negative u
  const v16f n = __builtin_convertvector(ni, v16f);
  const v16f r = xc - n * kLn2Hi - n * kLn2Lo;
  v16f p = r * 1.3981999507e-3f + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (ni + 127) << 23;
  v16f scale;
  memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

// float16 <-> float32 on bit patterns (IEEE binary16, round to nearest even), for the baseline
// copy and the scalar tails. Widening: the half's exponent and mantissa shifted into a float's
// place and multiplied by 2^112 rebias the exponent and normalise subnormals exactly; infinities
// and NaNs are set apart.
SHIFTC_INLINE float half_to_float(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  uint32_t bits = em << 13;
  float f;
  memcpy(&f, &bits, sizeof f);
  f *= 0x1p112f;
  memcpy(&bits, &f, sizeof bits);
  if (em >= 0x7c00u) bits = (em << 13) | 0x7f800000u;
  bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  memcpy(&f, &bits, sizeof f);
  return f;
}

SHIFTC_INLINE v16f half_to_float_bits16(const uint16_t* p) {
  const v16u h = __builtin_convertvector(*reinterpret_cast<const v16h_u*>(p), v16u);
  const v16u em = h & 0x7fffu;
  v16f f;
  const v16u shifted = em << 13;
  memcpy(&f, &shifted, sizeof f);
  f *= 0x1p112f;
  v16u bits;
  memcpy(&bits, &f, sizeof bits);
  bits = em >= 0x7c00u ? (shifted | 0x7f800000u) : bits;
  bits |= (h & 0x8000u) << 16;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// Narrowing: normal results by rebiasing the exponent and rounding the 13 dropped bits to even;
// results below the smallest normal half by one float addition (adding 0.5 lines the value up
// with the subnormal halves' spacing, 2^-24, and rounds it to even); overflow to infinity.
SHIFTC_INLINE uint16_t float_to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: rounds to infinity
  if (ax < 0x38800000u) {                                               // below 2^-14
    float a;
    memcpy(&a, &ax, sizeof a);
    a += 0.5f;
    uint32_t r;
    memcpy(&r, &a, sizeof r);
    return static_cast<uint16_t>(sign | (r - 0x3f000000u));
  }
  const uint32_t odd = (ax >> 13) & 1u;
  return static_cast<uint16_t>(sign | ((ax + 0xc8000fffu + odd) >> 13));
}

SHIFTC_INLINE float to_float(float x) { return x; }
SHIFTC_INLINE float to_float(uint16_t h) { return half_to_float(h); }

// Prefill blocks (attention_isa.inc)
constexpr int kRows = 8;
constexpr int kPvRows = 4;  // rows whose D-wide accumulators stay in registers while V streams

enum Isa { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3, kNeon = 4 };

}  // namespace

// -- one copy of the loops per instruction set -----------------------------------------------------

#if SHIFTC_ATTN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
namespace shiftc_attn_avx512 {
constexpr bool kVectorPaths = true;
constexpr bool kTransposeSums = true;  // two-source shuffles are one vpermt2ps each
SHIFTC_INLINE v16f load16(const uint16_t* p) {
  const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  v16f r;
  memcpy(&r, &v, sizeof r);
  return r;
}
SHIFTC_INLINE void store16(uint16_t* p, v16f x) {
  __m512 v;
  memcpy(&v, &x, sizeof v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#include "attention_isa.inc"
}  // namespace shiftc_attn_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace shiftc_attn_avx2 {
constexpr bool kVectorPaths = true;
constexpr bool kTransposeSums = false;  // 16-lane two-source shuffles split over ymm halves cost more
SHIFTC_INLINE v16f load16(const uint16_t* p) {
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  v16f r;
  memcpy(&r, &lo, sizeof lo);
  memcpy(reinterpret_cast<char*>(&r) + sizeof lo, &hi, sizeof hi);
  return r;
}
SHIFTC_INLINE void store16(uint16_t* p, v16f x) {
  __m256 lo, hi;
  memcpy(&lo, &x, sizeof lo);
  memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof lo, sizeof hi);
  const int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, kRound));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(hi, kRound));
}
// Decode's loops on 8-lane registers (scores, softmax, weighted values). GCC lowers the 16-lane
// vector type of the shared loops to pairs of ymm registers, but builds a scalar's splat and keeps
// the accumulators through the stack (16 scalar stores per key in the value loop) and runs the
// exp's floor and the mask's selects lane by lane: 58 ns per key and query head at D = 64, T = 128,
// float16 cache on a Zen 3 core, against 8.5 ns with these.
SHIFTC_INLINE __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
SHIFTC_INLINE __m256 ld8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SHIFTC_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// scores[t] = scale q . K[t] for t < T; 8 keys at a time, their 8 partial-sum vectors reduced
// together by three levels of horizontal adds.
template <int D, typename KV>
SHIFTC_INLINE void native_scores(const float* qr, float scale, const KV* K, int64_t T, float* scores) {
  constexpr int C = D / 8;
  __m256 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(qr + 8 * c), _mm256_set1_ps(scale));
  auto dot8 = [&](const KV* kr) __attribute__((always_inline)) {
    __m256 a = _mm256_mul_ps(qv[0], ld8(kr));
    for (int c = 1; c < C; ++c) a = _mm256_fmadd_ps(qv[c], ld8(kr + 8 * c), a);
    return a;
  };
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {
    __m256 a[8];
    for (int l = 0; l < 8; ++l) a[l] = dot8(K + (t + l) * D);
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    _mm256_storeu_ps(scores + t, _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31)));
  }
  for (; t < T; ++t) {
    scores[t] = hsum8(dot8(K + t * D));
  }
}
// o = inv sum_t scores[t] V[t], 64 columns at a time (8 accumulators stay in registers).
template <int D, typename KV>
SHIFTC_INLINE void native_weighted(const float* scores, float inv, const KV* V, int64_t T, float* o) {
  for (int d0 = 0; d0 < D; d0 += 64) {
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
      const float p = scores[t] * inv;
      if (p == 0.f) continue;
      const __m256 pv = _mm256_set1_ps(p);
      const KV* vr = V + t * D + d0;
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pv, ld8(vr + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(o + d0 + 8 * c, acc[c]);
  }
}
// exp_nonpositive on 8 lanes (the same steps and constants).
SHIFTC_INLINE __m256 exp8(__m256 x) {
  const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_sub_ps(_mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f))),
                                 _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(1.3981999507e-3f), _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256 scale = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), _mm256_mul_ps(p, scale));
}
SHIFTC_INLINE float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
// scores[t] <- exp(scores[t] + mr[t] - max) (masked keys: 0 when any key is visible); the sum.
SHIFTC_INLINE float native_softmax(float* scores, const float* mr, int64_t T, bool any_visible) {
  const __m256 masked = _mm256_set1_ps(SHIFTC_ATTN_MASKED), ninf = _mm256_set1_ps(-INFINITY);
  const __m256 check = any_visible ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : _mm256_setzero_ps();
  __m256 mxv = ninf;
  int64_t t = 0;
  for (; t + 8 <= T; t += 8) {
    const __m256 m = _mm256_loadu_ps(mr + t);
    const __m256 off = _mm256_and_ps(_mm256_cmp_ps(m, masked, _CMP_LE_OQ), check);
    const __m256 v = _mm256_blendv_ps(_mm256_add_ps(_mm256_loadu_ps(scores + t), m), ninf, off);
    _mm256_storeu_ps(scores + t, v);
    mxv = _mm256_max_ps(mxv, v);
  }
  float mx = hmax8(mxv);
  for (; t < T; ++t) {
    const float v = (any_visible && mr[t] <= SHIFTC_ATTN_MASKED) ? -INFINITY : scores[t] + mr[t];
    scores[t] = v;
    mx = v > mx ? v : mx;
  }
  const __m256 mx8 = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  for (t = 0; t + 8 <= T; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), mx8));
    _mm256_storeu_ps(scores + t, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum8(sv);
  for (; t < T; ++t) {
    scores[t] = exp_nonpositive(scores[t] - mx);
    sum += scores[t];
  }
  return sum;
}
#define SHIFTC_ATTN_NATIVE_ROWS 1
#include "attention_isa.inc"
#undef SHIFTC_ATTN_NATIVE_ROWS
}  // namespace shiftc_attn_avx2
#pragma GCC pop_options
#endif  // SHIFTC_ATTN_X86

namespace shiftc_attn_base {
// x86-64 CPUs without AVX2 and F16C (before 2013) take the scalar loops: a compact library
// matters more there than their speed; NEON and other targets keep the 16-lane paths
constexpr bool kVectorPaths = !SHIFTC_ATTN_X86;
constexpr bool kTransposeSums = false;
#if SHIFTC_ATTN_NEON
SHIFTC_INLINE v16f load16(const uint16_t* p) {
  v16f r;
  for (int i = 0; i < 4; ++i) {
    const float32x4_t v = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * i)));
    memcpy(reinterpret_cast<char*>(&r) + 16 * i, &v, 16);
  }
  return r;
}
SHIFTC_INLINE void store16(uint16_t* p, v16f x) {
  for (int i = 0; i < 4; ++i) {
    float32x4_t v;
    memcpy(&v, reinterpret_cast<const char*>(&x) + 16 * i, 16);
    vst1_u16(p + 4 * i, vreinterpret_u16_f16(vcvt_f16_f32(v)));
  }
}
#else
SHIFTC_INLINE v16f load16(const uint16_t* p) { return half_to_float_bits16(p); }
SHIFTC_INLINE void store16(uint16_t* p, v16f x) {
  for (int i = 0; i < kLanes; ++i) p[i] = float_to_half(x[i]);
}
#endif
#include "attention_isa.inc"
}  // namespace shiftc_attn_base

// -- dispatch ---------------------------------------------------------------------------------------

namespace {

bool isa_available(int isa) {
  if (isa == kScalar) return true;
#if SHIFTC_ATTN_NEON
  if (isa == kNeon) return true;
#endif
#if SHIFTC_ATTN_X86
  if (isa == kAvx2) return shiftc_cpu_avx2();
  if (isa == kAvx512) return shiftc_cpu_avx2() && shiftc_cpu_avx512();  // its loops use F16C too
#endif
  return false;
}

int best_isa() {
  for (int isa : {kNeon, kAvx512, kAvx2})
    if (isa_available(isa)) return isa;
  return kScalar;
}

std::atomic<int> g_isa{kAuto};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa == kAuto) {
    isa = best_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

bool valid(int64_t B, int64_t KVH, int64_t G, int64_t S, int64_t T, int64_t M, int64_t D, int64_t task) {
  return B >= 0 && KVH >= 1 && G >= 1 && S >= 0 && T >= S && T <= M && D >= 1 && task >= 0 && task < B * KVH * G;
}

template <typename KV>
int attention(const float* q, const KV* kc, const KV* vc, const float* mask, int64_t B, int64_t KVH, int64_t G,
              int64_t S, int64_t T, int64_t M, int64_t D, float scale, float* out, int64_t task) {
  if (!valid(B, KVH, G, S, T, M, D, task)) return -1;
  if (S == 0) return 0;
  switch (current_isa()) {
#if SHIFTC_ATTN_X86
    case kAvx512: shiftc_attn_avx512::run(q, kc, vc, mask, KVH, G, S, T, M, D, scale, out, task); break;
    case kAvx2: shiftc_attn_avx2::run(q, kc, vc, mask, KVH, G, S, T, M, D, scale, out, task); break;
#endif
    default: shiftc_attn_base::run(q, kc, vc, mask, KVH, G, S, T, M, D, scale, out, task); break;
  }
  return 0;
}

}  // namespace

extern "C" {

int shiftc_attention(const float* q, const float* kc, const float* vc, const float* mask, int64_t B, int64_t KVH,
                     int64_t G, int64_t S, int64_t T, int64_t M, int64_t D, float scale, float* out, int64_t task) {
  return attention(q, kc, vc, mask, B, KVH, G, S, T, M, D, scale, out, task);
}

int shiftc_attention_f16(const float* q, const uint16_t* kc, const uint16_t* vc, const float* mask, int64_t B,
                         int64_t KVH, int64_t G, int64_t S, int64_t T, int64_t M, int64_t D, float scale, float* out,
                         int64_t task) {
  return attention(q, kc, vc, mask, B, KVH, G, S, T, M, D, scale, out, task);
}

int shiftc_kv_write_f16(uint16_t* cache, const float* rows, int64_t BH, int64_t S, int64_t T, int64_t M, int64_t D) {
  if (BH < 0 || S < 0 || T < S || T > M || D < 1) return -1;
  switch (current_isa()) {
#if SHIFTC_ATTN_X86
    case kAvx512: shiftc_attn_avx512::write_rows(cache, rows, BH, S, T, M, D); break;
    case kAvx2: shiftc_attn_avx2::write_rows(cache, rows, BH, S, T, M, D); break;
#endif
    default: shiftc_attn_base::write_rows(cache, rows, BH, S, T, M, D); break;
  }
  return 0;
}

int shiftc_attention_set_isa(int isa) {
  if (isa == kAuto) isa = best_isa();
  if (isa < kScalar || isa > kNeon || !isa_available(isa)) return -1;
  g_isa.store(isa, std::memory_order_relaxed);
  return isa;
}

int shiftc_attention_isa(void) { return current_isa(); }

}  // extern "C"
