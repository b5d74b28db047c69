// shiftc attention kernel over an in-place KV cache.
//
// A decoder library compiled with the in-place KV cache (shiftc/backend/kv_cache.py) keeps, per
// layer, a key cache and a value cache of M rows per sequence and KV head. A step with S new
// tokens writes their keys and values into rows [T - S, T) (T = tokens in the cache after the step,
// the attention mask's length) and then calls this kernel, which reads rows [0, T):
//
//   out[b, h, g, s, :] = sum_t softmax_t(scale * <q[b, h, g, s, :], K[b, h, t, :]> + mask[b, s, t]) V[b, h, t, :]
//
// with grouped-query heads (G query heads per KV head, h = KV head). Shapes, row-major:
//   q     [B, KVH, G, S, D]     float32
//   kc/vc [B, KVH, M, D]        float32 (shiftc_attention) or float16 bit patterns
//                               (shiftc_attention_f16); cache rows >= T are not read
// (mask and out float32)
//   mask  [B, S, T]             additive (0 = visible, a large negative value = masked)
//   out   [B, KVH, G, S, D]
// A mask entry <= SHIFTC_ATTN_MASKED skips its key (its softmax weight underflows to exactly 0 in
// float once any key of the row is visible); a row with no visible key is computed in full, as
// the reference softmax does.
//
// Calling convention: tasks are the B * KVH * G (sequence, query head) pairs and are independent:
//   for task in [0, B*KVH*G) in parallel: shiftc_attention(..., task)
// Returns 0, or -1 on invalid arguments. x86-64 builds (GCC) carry AVX-512, AVX2+FMA+F16C and
// baseline copies of the loops, the best the CPU runs chosen at the first call; elsewhere the
// baseline copy is compiled for the target (NEON on aarch64).
//
// A float16 cache is written by shiftc_kv_write_f16: rows [T - S, T) of cache [BH, M, D] (BH =
// B * KVH) <- rows [BH, S, D] of float32, rounded to nearest even.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHIFTC_ATTN_MASKED (-1.0e8f)

int shiftc_attention(const float* q, const float* kc, const float* vc, const float* mask, int64_t B, int64_t KVH,
                     int64_t G, int64_t S, int64_t T, int64_t M, int64_t D, float scale, float* out, int64_t task);
int shiftc_attention_f16(const float* q, const uint16_t* kc, const uint16_t* vc, const float* mask, int64_t B,
                         int64_t KVH, int64_t G, int64_t S, int64_t T, int64_t M, int64_t D, float scale, float* out,
                         int64_t task);
int shiftc_kv_write_f16(uint16_t* cache, const float* rows, int64_t BH, int64_t S, int64_t T, int64_t M, int64_t D);

// The instruction set of the loops: 0 = best available (the default), 1 = baseline, 2 = AVX2,
// 3 = AVX-512, 4 = NEON (numbering of shiftc_bcq_set_isa). Returns the set now used, or -1 if
// this CPU or build lacks it. shiftc_attention_isa: the set now used.
int shiftc_attention_set_isa(int isa);
int shiftc_attention_isa(void);

#ifdef __cplusplus
}
#endif
