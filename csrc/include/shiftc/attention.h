// shiftc attention kernel over an in-place KV cache.
//
// A decoder library compiled with the in-place KV cache (shiftc/backend/kv_cache.py) keeps, per
// layer, a key cache and a value cache of M rows per sequence and KV head. A step with S new
// tokens writes their keys and values into rows [T - S, T) (T = tokens in the cache after the step,
// the attention mask's length) and then calls this kernel, which reads rows [0, T):
//
//   out[b, h, g, s, :] = sum_t softmax_t(scale * <q[b, h, g, s, :], K[b, h, t, :]> + mask[b, s, t]) V[b, h, t, :]
//
// with grouped-query heads (G query heads per KV head, h = KV head). Shapes, row-major float32:
//   q     [B, KVH, G, S, D]
//   kc/vc [B, KVH, M, D]        cache rows >= T are not read
//   mask  [B, S, T]             additive (0 = visible, a large negative value = masked)
//   out   [B, KVH, G, S, D]
// A mask entry <= SHIFTC_ATTN_MASKED skips its key (its softmax weight underflows to exactly 0 in
// float once any key of the row is visible); a row with no visible key is computed in full, as
// the reference softmax does.
//
// Calling convention: tasks are the B * KVH * G (sequence, query head) pairs and are independent:
//   for task in [0, B*KVH*G) in parallel: shiftc_attention(..., task)
// Returns 0, or -1 on invalid arguments. x86-64 builds carry AVX-512, AVX2+FMA and generic
// versions chosen when the library is loaded (GCC function multi-versioning); elsewhere the
// generic code is compiled for the target's baseline (NEON on aarch64).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHIFTC_ATTN_MASKED (-1.0e8f)

int shiftc_attention(const float* q, const float* kc, const float* vc, const float* mask, int64_t B, int64_t KVH,
                     int64_t G, int64_t S, int64_t T, int64_t M, int64_t D, float scale, float* out, int64_t task);

#ifdef __cplusplus
}
#endif
