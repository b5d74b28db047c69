// shiftc attention over an in-place KV cache: contract in shiftc/attention.h.
//
// Per task (one sequence and query head) and query row: scores over the visible keys (one dot
// product of D floats each, 16 independent partial sums so that the compiler vectorises it
// without re-associating a float sum), a max, exp(score - max) by a branch-free polynomial that
// vectorises, and the weighted sum of value rows (an axpy per key). Self-contained like
// bcq_lut.cc: `shiftc compile` compiles it standalone into decoder libraries, for x86-64 and
// aarch64, with no ISA flags; on x86-64 the per-task function is multi-versioned.
#include "shiftc/attention.h"

#include <math.h>
#include <string.h>

#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SHIFTC_ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SHIFTC_ATTN_CLONES
#endif
#define SHIFTC_INLINE static inline __attribute__((always_inline))

namespace {

constexpr int kLanes = 16;

SHIFTC_INLINE float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (; i < d; ++i) s += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

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

}  // namespace

SHIFTC_ATTN_CLONES
static void attention_task(const float* q, const float* kc, const float* vc, const float* mask, int64_t KVH,
                           int64_t G, int64_t S, int64_t T, int64_t M, int64_t D, float scale, float* out,
                           int64_t task, float* scores) {
  const int64_t g = task % G, h = (task / G) % KVH, b = task / (G * KVH);
  const float* K = kc + (b * KVH + h) * M * D;
  const float* V = vc + (b * KVH + h) * M * D;
  for (int64_t s = 0; s < S; ++s) {
    const float* qr = q + (((b * KVH + h) * G + g) * S + s) * D;
    const float* mr = mask + (b * S + s) * T;
    float* o = out + (((b * KVH + h) * G + g) * S + s) * D;
    bool any_visible = false;
    for (int64_t t = 0; t < T; ++t) any_visible |= mr[t] > SHIFTC_ATTN_MASKED;
    float mx = -INFINITY;
    for (int64_t t = 0; t < T; ++t) {
      if (any_visible && mr[t] <= SHIFTC_ATTN_MASKED) {
        scores[t] = -INFINITY;
        continue;
      }
      float v = dot(qr, K + t * D, D) * scale + mr[t];
      scores[t] = v;
      mx = v > mx ? v : mx;
    }
    float sum = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      float e = exp_nonpositive(scores[t] - mx);  // -inf - mx -> clamped -> 0
      scores[t] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      const float p = scores[t] * inv;
      if (p == 0.f) continue;
      const float* vr = V + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] += p * vr[d];
    }
  }
}

extern "C" int shiftc_attention(const float* q, const float* kc, const float* vc, const float* mask, int64_t B,
                                int64_t KVH, int64_t G, int64_t S, int64_t T, int64_t M, int64_t D, float scale,
                                float* out, int64_t task) {
  if (B < 0 || KVH < 1 || G < 1 || S < 0 || T < S || T > M || D < 1 || task < 0 || task >= B * KVH * G) return -1;
  if (S == 0) return 0;
  thread_local std::vector<float> scores;
  if (static_cast<int64_t>(scores.size()) < T) scores.resize(static_cast<size_t>(T));
  attention_task(q, kc, vc, mask, KVH, G, S, T, M, D, scale, out, task, scores.data());
  return 0;
}
