// shiftc BCQ run-time kernels: the "lut16" weight layout and the matmul entry points.
//
// These kernels execute ai.shiftc::BcqMatMul,  Y[M, N] = X[M, K] . W^T,  with
//
//     W[n, k] = sum_{i < q} alpha[i][n][g(k)] * s(B_i[n, k])  +  mu[n][g(k)]      g(k) = k / G
//
// s(b) = 2b - 1 (+-1 planes). A {0,1} plane (coding "01") is converted at pack time:
// alpha * b = (alpha/2) * s(b) + alpha/2, so its scale halves and alpha/2 goes to the offset mu.
//
// The ONNX-side storage (uint32 bit planes [q, N, ceil(K/32)], int8 exponents) is described in
// shiftc/packed.h; it is repacked once, at compile time, into the layout below by
// shiftc_bcq_pack_lut16(). The same source file (csrc/kernels/bcq_lut.cc) is compiled into the
// Python module shiftc._native and, by `shiftc compile`, into every model library that contains a
// BcqMatMul, so a model needs nothing but the TVM runtime.
//
// ---------------------------------------------------------------------------
// lut16 layout
// ---------------------------------------------------------------------------
//   NB  = ceil(N / 16)            row blocks of 16 output rows (N padded with zero rows)
//   Kp  = ceil(K / G) * G          columns padded to whole groups (G a multiple of 32)
//   NG  = Kp / G                   groups per row
//
//   codes   uint8  [NB][Kp/8][q][16]
//           byte r of (block b, column octet o, plane i) holds the bits of plane i for row 16b+r,
//           columns 8o..8o+7: bit j = B_i[16b+r, 8o+j]. So the LOW nibble is the 4-bit index of
//           columns 8o..8o+3 and the HIGH nibble the index of columns 8o+4..8o+7.
//           Padding (rows >= N, columns >= K) has bit 0.
//   scales  float  [NB][NG][q][16]     alpha[i][16b+r][g]  (0 for padded rows)
//   offsets float  [NB][NG][16]        mu[16b+r][g], or NULL when every mu is 0
//
// ---------------------------------------------------------------------------
// Uniform scales (shiftc_bcq_compute_uniform)
// ---------------------------------------------------------------------------
// A uniform q-bit grid (an integer code per weight, one scale and one offset per row and group):
//
//     W[n, k] = mu[n][g] + s[n][g] * sum_{i < q} 2^i * B_i[n, k],    B_i in {0, 1},  g = k / G
//
// with s and mu IEEE half precision. Same codes as above (the codes do not depend on the scales:
// shiftc_bcq_pack_codes), and instead of scales and offsets
//   su      uint16 [NB][NG][2][16]     the 16 rows' s, then their mu, as halves (64 bytes: one
//                                      cache line per block and group); 0 for padded rows
// so the weights take q + 32/G bits each (4 bits, G = 32: 5). The kernels run it as the +-1 form
// with alpha_i = s 2^(i-1) and offset mu + s (2^q - 1) / 2, derived in float from the halves at
// run time (float rounding only; nothing is rounded back to half).
//
// ---------------------------------------------------------------------------
// Algorithm
// ---------------------------------------------------------------------------
//   M < SHIFTC_BCQ_LUT_MAX_M ("GEMV", decode; see the macro for the per-bit-width cutoff): per row
//   of X and per 4 consecutive columns c,
//   a 16-entry table T[c][m] = sum_{j<4} (bit j of m ? +x[4c+j] : -x[4c+j]) (zero for columns
//   >= K). A row block's partial sum for plane i over a group is sum_c T[c][nibble]: one
//   16-lane table permute per 16 rows and 4 columns, no multiplication; the group's partials are
//   then scaled by alpha (a power of two, or a sum of two: exact in float, i.e. a shift) and
//   summed over planes; mu adds mu * sum_{k in g} x[k].
//   M >= SHIFTC_BCQ_LUT_MAX_M ("GEMM", prefill): each task expands its 32-row panel of W to float
//   a K-slice at a time (sign select + add per plane) and runs a register-blocked FMA kernel
//   over all M rows; the expansion is amortised over M. Uniform weights on AVX2 (int8 mode, the
//   default): prepare also rounds X to int8 per row and group (scale max|x|/127), the panel is
//   expanded to the weights' integer codes as bytes, and the products run on vpmaddubsw (16-bit
//   sums, widened per chunk of columns), scaled by s d per group; mu sum_k x stays in float.
//
// ---------------------------------------------------------------------------
// Calling convention (used by the TIR that `shiftc compile` emits, and by shiftc._native)
// ---------------------------------------------------------------------------
//   ws = float[shiftc_bcq_workspace_floats(M, K, G)]
//   shiftc_bcq_prepare(x, M, K, G, ws);                      // once, one thread
//   for t in [0, ntasks) in parallel:                          // ntasks = ceil(NB / 2)
//       shiftc_bcq_compute(x, ws, M, K, N, q, G, codes, scales, offsets, y, t);
//           (or shiftc_bcq_compute_uniform(x, ws, M, K, N, q, G, codes, su, y, t))
//   Task t writes rows [32t, min(32t + 32, N)) of every output row of Y (Y is [M, N], row-major,
//   and need not be initialised). Tasks are independent.
//   prepare must run again whenever X's contents change (even in the same buffer): the AMX GEMM
//   keeps a per-thread bf16 copy of X from one task to the next and drops it at every prepare.
//   Valid arguments: q (planes) in 1..4, G a positive multiple of 32, K >= 1, N >= 1, M >= 0.
//   All functions return 0 on success and -1 on invalid arguments (the size functions: -1).
//
// ISA: x86-64 builds carry scalar, AVX2+FMA(+F16C), AVX-512 (F, BW, VL, DQ) and AMX-BF16 (GEMM only)
// versions and pick one at run time from the CPU (or from shiftc_bcq_set_isa, for tests); aarch64 builds carry scalar and NEON
// (baseline there, so NEON is the default: vqtbl4q_u8 table lookups for the GEMV, vector
// expansion and a 5x16 FMA tile for the GEMM); other targets use the scalar code. Uniform weights
// run on the same kernels (the halves converted by F16C, AVX-512 or NEON instructions), except
// that the AMX ISA runs their GEMM on the AVX-512 FMA kernel (no AMX tiles for uniform weights).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Rows of X below which prepare builds tables and the LUT (GEMV) path may run. compute uses the
// tables for M below this AND below a cutoff per bit width (q <= 2: 12, q = 3: 8, q = 4: 6, set by
// measurement in bcq_lut.cc); otherwise it runs the GEMM path, which reads no tables.
#define SHIFTC_BCQ_LUT_MAX_M 12

// The int8 GEMM (AVX2, uniform weights): per group of columns, this many columns (those of largest
// max |x| over X's rows) are kept apart as 16-bit multiples of each row's scale (bcq_lut_avx2.inc).
#define SHIFTC_BCQ_X8_OUTLIERS 2

// Rows of X from which the GEMM path runs on AMX-BF16 tiles when the ISA is "AMX" (5): X is split
// exactly into three bf16 parts and each expanded weight into bf16 hi + lo, and the bf16 products
// are accumulated in float (see bcq_lut.cc). Where the expanded weights have at most 16
// significant bits (with power-of-two scales: usually 8, exact in bf16) this is as accurate as
// float; otherwise at most 2^-16 |x| |w| more per product. Below this M the weight expansion, which AMX does not speed up,
// dominates and the FMA GEMM is as fast (measured on a Xeon, 4096 x 4096, 2..4 bits).
#define SHIFTC_BCQ_AMX_MIN_M 24

// Sizes of the lut16 arrays, in elements.
int64_t shiftc_bcq_codes_bytes(int64_t N, int64_t K, int32_t q, int64_t G);
int64_t shiftc_bcq_scales_floats(int64_t N, int64_t K, int32_t q, int64_t G);
int64_t shiftc_bcq_offsets_floats(int64_t N, int64_t K, int64_t G);

// Halves of the uniform format's su array (NB * NG * 32), -1 for invalid arguments.
int64_t shiftc_bcq_uniform_halves(int64_t N, int64_t K, int64_t G);

// Repack ONNX-side storage into lut16.
//   planes  uint32 [q][N][ceil(K/32)]  (shiftc/packed.h)
//   alpha   float  [q][N][ceil(K/G)]   scale values (exponents already turned into floats)
//   coding  0 = pm1, 1 = "01"
//   offsets may be NULL only for coding 0; for coding 1 it receives sum_i alpha_i / 2.
int shiftc_bcq_pack_lut16(const uint32_t* planes, const float* alpha, int64_t N, int64_t K, int32_t q,
                          int64_t G, int32_t coding, uint8_t* codes, float* scales, float* offsets);

// The codes part of shiftc_bcq_pack_lut16 alone (identical codes), for the uniform format:
// planes uint32 [q][N][ceil(K/32)] -> codes [shiftc_bcq_codes_bytes(N, K, q, G)].
int shiftc_bcq_pack_codes(const uint32_t* planes, int64_t N, int64_t K, int32_t q, int64_t G, uint8_t* codes);

// The uniform format's su array from s and mu, halves (IEEE binary16 bit patterns) row-major
// [N][ceil(K/G)], into su [shiftc_bcq_uniform_halves(N, K, G)].
int shiftc_bcq_pack_uniform(const uint16_t* s, const uint16_t* mu, int64_t N, int64_t K, int64_t G,
                            uint16_t* su);

// Workspace, in floats, that shiftc_bcq_prepare fills and shiftc_bcq_compute reads:
//   M < SHIFTC_BCQ_LUT_MAX_M :  M * (Kp/4*16 + NG + (Kp/8 + 4)*8 + NG + X8)
//                               (tables [M][Kp/4][16], per-group sums of x [M][NG], int8 tables
//                               and their scales, then X8; 64-byte alignment of ws keeps every
//                               table on one cache line)
//   otherwise                :  M * (NG + X8)        (per-group sums of x, then X8)
//   X8 = Kp/4 + NG + NG*2*SHIFTC_BCQ_X8_OUTLIERS: X as int8 [M][Kp] bytes, its scales [M][NG] and
//   its outliers (columns [NG][SHIFTC_BCQ_X8_OUTLIERS], values [M][NG][SHIFTC_BCQ_X8_OUTLIERS / 2],
//   int32; the space reserved is [M][NG][2 * SHIFTC_BCQ_X8_OUTLIERS]) (the int8 GEMM)
int64_t shiftc_bcq_workspace_floats(int64_t M, int64_t K, int64_t G);

int shiftc_bcq_prepare(const float* x, int64_t M, int64_t K, int64_t G, float* ws);

int shiftc_bcq_compute(const float* x, const float* ws, int64_t M, int64_t K, int64_t N, int32_t q,
                       int64_t G, const uint8_t* codes, const float* scales, const float* offsets,
                       float* y, int64_t task);

// shiftc_bcq_compute for uniform weights (codes, su): same workspace, prepare, tasks and paths.
int shiftc_bcq_compute_uniform(const float* x, const float* ws, int64_t M, int64_t K, int64_t N, int32_t q,
                               int64_t G, const uint8_t* codes, const uint16_t* su, float* y, int64_t task);

// ISA selection: 0 = auto (default), 1 = scalar, 2 = AVX2, 3 = AVX-512, 4 = NEON, 5 = AMX (the AVX-512
// kernels plus the AMX-BF16 GEMM for M >= SHIFTC_BCQ_AMX_MIN_M; needs AMX-TILE, AMX-BF16 and
// AVX512-BF16, and on Linux the XTILEDATA permission, requested once per process). Returns the ISA
// now in use, or -1 when the requested one is not available on this CPU / build.
int shiftc_bcq_set_isa(int isa);
int shiftc_bcq_isa(void);

// The int8 paths of uniform weights: 0 = int8 (default: the AVX2 / AVX-512 GEMV's table entries
// rounded to 8 bits per group of columns, one byte shuffle per 32 / 64 lookups; the AVX2 GEMM's X
// rounded to int8 per row and group), 1 = float32 (the exact tables and float GEMM of every other
// path). The
// environment variable SHIFTC_LUT_TABLES=float32 sets 1 before the first call. Returns the mode now
// in use, or -1 for another value.
int shiftc_bcq_set_tables(int mode);
int shiftc_bcq_tables(void);

#ifdef __cplusplus
}
#endif
