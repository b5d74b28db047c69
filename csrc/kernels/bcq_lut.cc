// shiftc BCQ run-time kernels on the lut16 layout: sizes, pack, prepare, compute, ISA dispatch.
//
// The contract (layout, math, calling convention) is in shiftc/bcq_lut.h. This file is
// self-contained on purpose: `shiftc compile` compiles it standalone into every model library
// that holds a BcqMatMul, for x86-64 and for aarch64, with no ISA flags. x86-64 kernels therefore
// carry their ISA in a function attribute and are chosen at run time from the CPU; on aarch64
// NEON is baseline and is the default (scalar stays selectable):
//
//   kernel           scalar (all targets)     AVX2 + FMA               AVX-512 F/BW/VL/DQ
//   table build      prepare_scalar           prepare_avx2             prepare_avx512
//   GEMV (small M)   lut_task_scalar          lut_task_avx2 (8 rows)   lut_task_avx512 (2 x 16 rows)
//   GEMV, uniform    (float tables)           lut8_task_avx2           lut8_task_avx512
//     int8 tables                             (16 rows, vpshufb ymm)   (2 x 16 rows, vpshufb zmm)
//   GEMM (larger M)  gemm_task_scalar (4x16)  gemm_task_avx2 (6x16)    gemm_task_avx512 (14x32)
//                    (2x16 on x86-64)
//   aarch64 NEON     prepare_neon, lut_task_neon (16 rows, vqtbl4q_u8), gemm_task_neon (5x16)
//   x86-64 AMX       the AVX-512 kernels, and gemm_task_amx (bf16 parts in tiles, 2 x 16 rows x 32)
//                    for M >= SHIFTC_BCQ_AMX_MIN_M
// (the GEMV path runs for M < SHIFTC_BCQ_LUT_MAX_M and M < kLutRowsBelow[q - 1]).
//
// GEMV ("LUT") path. For 4 consecutive columns c of a row of X, prepare() stores the table
//   T[c][m] = sum_{j<4} (bit j of m ? +x[4c+j] : -x[4c+j])         (0 for columns >= K)
// so that sum_{j<4} s(B[n, 4c+j]) x[4c+j] = T[c][nibble of row n]. A code byte holds two nibbles
// (columns 8o..8o+3 and 8o+4..8o+7) of one row and plane, so 16 rows take one 16-lane table
// permute per nibble: no multiplication. Partial sums are kept per plane and group and scaled
// once per group: y[n] += alpha[i][n][g] * part[i] (+ mu[n][g] * sum_{k in g} x[k]).
//
// GEMM path. A task owns 32 output columns of Y (two row blocks of W). For a K-slice of k_slice(M)
// columns it expands its panel of W to float, panel[k][32] = mu - sum_i alpha_i + sum_{i: bit}
// 2 alpha_i (one masked add per plane and 16 weights), then runs a register-blocked FMA kernel
// over all M rows of X; the expansion is amortised over M.
//
// Uniform weights (shiftc_bcq_compute_uniform): W = mu + s sum_i 2^i B_i with one half-precision
// (s, mu) pair per row and group. With b = (s(b) + 1) / 2 this is the +-1 form above with
//   alpha_i = s 2^(i-1)  (exact in float)   and   offset = mu + s (2^q - 1) / 2  (one rounding),
// derived in float from the two halves once per group and 16 rows (group_header_*; never rounded
// back to half). The GEMM expansion starts from mu itself and adds 2 alpha_i = s 2^i per set bit;
// the AVX-512 GEMV, where the combine is visible at G = 32, sums the planes' partials as
// sum_i 2^i part_i and scales once by s/2 (measured 3% faster than per-plane scales; on AVX2 it
// was not). Everything else is the float-scale code: the loops over the codes are shared, and a
// group reads one 64-byte line of halves instead of q + 1 lines of floats.
#include "shiftc/bcq_lut.h"
#include "shiftc/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

#if defined(__x86_64__)
// GCC 12's AVX-512 headers initialise "undefined" vectors from themselves (`__Y = __Y`), which
// -Wmaybe-uninitialized reports at every inlined intrinsic (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <cpuid.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define SHIFTC_LUT_X86 1
// F16C (the uniform format's half scales) is part of the AVX2 level: every CPU with AVX2 and FMA
// has it, and isa_available() checks it too.
#define SHIFTC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SHIFTC_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define SHIFTC_LUT_X86 0
#endif

#if defined(__aarch64__)
#include <arm_neon.h>
#define SHIFTC_LUT_NEON 1
#else
#define SHIFTC_LUT_NEON 0
#endif

namespace {

constexpr int kMaxQ = 4;           // planes supported (ai.shiftc::BcqMatMul's bits: 1..4)
constexpr int64_t kBlock = 16;     // rows of W per lut16 block
constexpr int64_t kTaskRows = 32;  // rows of W (= columns of Y) per task
// GEMM: columns of W expanded at a time (the panel, kKc x 32 floats on the stack, 64 KiB). Few
// rows of X re-read the panel little, and a 256-column panel that stays in L1 is faster; many rows
// gain from longer slices (fewer passes over the output tile, longer streams over X): measured
// best below / above 96 rows on a Xeon (Emerald Rapids).
constexpr int64_t kKc = 512;
int64_t k_slice(int64_t M) { return M >= 96 ? kKc : kKc / 2; }

// Start column of the sl-th of nsl K-slices of width ks in task t: odd tasks walk K backwards, so
// that a task starts on the columns of X that the previous task (same thread) read last and that
// are still in L2 (measured 1.5% on M = 128, K = 4096).
int64_t slice_start(int64_t t, int64_t sl, int64_t nsl, int64_t ks) { return ((t & 1) ? nsl - 1 - sl : sl) * ks; }

// GEMV (SIMD): how far ahead in a block's codes the table loops prefetch. Decoding streams the weights
// from DRAM, and the hardware prefetchers alone reached about 6 GB/s on the interleaved streams
// of a task's two blocks (and their scales); prefetching 4 KiB ahead (scales 4 groups ahead) made
// a cold 4096 x 4096 GEMV 20-23% faster on a Xeon (Emerald Rapids), and costs <3% when warm.
constexpr int64_t kPrefetchBytes = 4096;
// ... and how many groups ahead they prefetch a block's scales (float format: q lines; uniform:
// its one line of halves).
constexpr int64_t kPrefetchGroups = 4;
// The int8 GEMV (lut8_rows_avx512) reads its codes about twice as fast: prefetching them into L2
// 16 KiB ahead made a cold SmolLM2 step of its GEMVs 12% faster than into L1 4 KiB ahead (Zen 4;
// 8-16 KiB measured alike).
constexpr int64_t kPrefetchBytesL2 = 16384;

// kAmx: the AVX-512 kernels, and the AMX-BF16 GEMM for M >= kAmxMinRows.
enum Isa { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3, kNeon = 4, kAmx = 5 };

// The table path runs for M < SHIFTC_BCQ_LUT_MAX_M (the workspace then holds tables) AND M below
// this cutoff for the bit width; otherwise the GEMM path runs (it reads no tables). A table pass
// costs about q/4 lookups per weight and row, the GEMM path one FMA per weight and row plus a
// fixed expansion of W, so the crossover falls with q. Measured on a Xeon (Emerald Rapids,
// AVX-512), 1 thread, N x K = 4096 x 4096, 1536 x 576 and 576 x 1536.
constexpr int64_t kLutRowsBelow[kMaxQ] = {12, 12, 8, 6};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool valid_shape(int64_t N, int64_t K, int32_t q, int64_t G) {
    return N >= 1 && K >= 1 && q >= 1 && q <= kMaxQ && G > 0 && G % 32 == 0;
}

// The int8 tables of the AVX-512 uniform GEMV (lut8_rows_avx512), per row of X: for every octet o
// of the padded columns the 16 entries of T[2o] (low nibbles), then, after 4 spare octets, those of
// T[2o + 1] (high nibbles); entry = round(T / scale) + 128 with one scale per group (max |T| / 127).
// The spare octets let a 64-byte load start at any octet. Size in floats for Kp padded columns:
int64_t t8_floats(int64_t Kp) { return (Kp / 8 + 4) * 32 / 4; }
int64_t t8_half_bytes(int64_t Kp) { return (Kp / 8 + 4) * 16; }
// The 4 spare octets after each table half (loaded, never used): entries of value 0.
void t8_fill_spare(uint8_t* lo, uint8_t* hi, int64_t Kp) {
    memset(lo + Kp / 8 * 16, 128, 64);
    memset(hi + Kp / 8 * 16, 128, 64);
}
// Whether a group's weighted sum of biased lookups fits 16 bits (lut8_rows_*): per row at most
// 2 (nibbles) * 255 * (G / 8) octets * (2^Q - 1).
bool t8_fits(int q, int64_t G) { return 2 * 255 * (G / 8) * ((int64_t{1} << q) - 1) < 65536; }

// Everything a task needs, derived once per call.
// The scale format is the one switch between the two weight formats: su non-null = uniform (one
// half-precision (s, mu) pair per row and group), else float scales (and offsets). The kernels
// read either only through group_header_*(), so both share every loop.
struct Problem {
    const float* x;        // [M, K]
    const float* ws;       // workspace filled by shiftc_bcq_prepare
    const uint8_t* codes;  // [NB][Kp/8][q][16]
    const float* scales;   // [NB][NG][q][16]      (float format; nullptr when su is set)
    const float* offsets;  // [NB][NG][16] or nullptr
    const uint16_t* su;    // [NB][NG][2][16] halves (uniform format) or nullptr
    float* y;              // [M, N]
    int64_t M, K, N, G;
    int64_t Kp, NG, NB, octs;  // padded columns, groups, row blocks, column octets (Kp / 8)
    const float* tables;       // GEMV: [M][Kp/4][16] tables of X's rows (start of the workspace)
    const float* gsums;        // [M][NG] per-group sums of X's rows (after the tables)
    const uint8_t* t8;         // GEMV int8 tables: per row of X, lo then hi nibble tables (t8_tables)
    const float* t8s;          // [M][NG] the int8 tables' scales (after t8)
    int q;
    // Whether groups carry an offset (+-1 form): always for uniform weights, with offsets else.
    bool has_offset() const { return su != nullptr || offsets != nullptr; }
};

// Runs f(std::integral_constant<int, Q>{}) with Q = q as a compile-time constant (1..kMaxQ; the
// kernels are instantiated per plane count).
template <class F>
inline void with_q(int q, F&& f) {
    static_assert(kMaxQ == 4, "with_q dispatches q = 1..4");
    switch (q) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        default: f(std::integral_constant<int, 4>{}); break;
    }
}

Problem make_problem(const float* x, const float* ws, int64_t M, int64_t K, int64_t N, int32_t q,
                     int64_t G, const uint8_t* codes, const float* scales, const float* offsets,
                     const uint16_t* su, float* y) {
    Problem p;
    p.x = x;
    p.ws = ws;
    p.codes = codes;
    p.scales = scales;
    p.offsets = offsets;
    p.su = su;
    p.y = y;
    p.M = M;
    p.K = K;
    p.N = N;
    p.G = G;
    p.q = q;
    p.NG = ceil_div(K, G);
    p.Kp = p.NG * G;
    p.NB = ceil_div(N, kBlock);
    p.octs = p.Kp / 8;
    p.tables = ws;
    p.gsums = ws + (M < SHIFTC_BCQ_LUT_MAX_M ? M * p.Kp * 4 : 0);
    p.t8 = reinterpret_cast<const uint8_t*>(p.gsums + M * p.NG);
    p.t8s = p.gsums + M * p.NG + M * t8_floats(p.Kp);
    return p;
}

// Octets [o_begin, o_end) of group g that hold at least one column < K (the rest have all-zero
// tables and contribute nothing).
void group_octets(const Problem& p, int64_t g, int64_t* o_begin, int64_t* o_end) {
    *o_begin = g * (p.G / 8);
    const int64_t last = ceil_div(p.K, 8);
    const int64_t end = *o_begin + p.G / 8;
    *o_end = end < last ? end : last;
}

// Rows [m0, m0 + rows) of X in blocks of near-equal size, none above max_rows.
struct RowSplit {
    int64_t nblk, base, extra;
    RowSplit(int64_t M, int64_t max_rows) {
        nblk = ceil_div(M, max_rows);
        base = nblk ? M / nblk : 0;
        extra = nblk ? M % nblk : 0;
    }
    int64_t start(int64_t i) const { return i * base + (i < extra ? i : extra); }
    int64_t size(int64_t i) const { return base + (i < extra ? 1 : 0); }
};

// ===========================================================================================
// Scalar reference kernels (every target)
// ===========================================================================================

// IEEE binary16 -> float, exact for every input (the hardware conversions of the SIMD builds give
// the same floats; NaN payloads aside).
inline float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13);  // infinity, NaN
    } else if (e != 0) {
        bits = sign | ((e + (127 - 15)) << 23) | (m << 13);  // normal: exponent rebiased
    } else {
        const float f = float(m) * 0x1p-24f;  // zero or subnormal m 2^-24: exact, a normal float
        __builtin_memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

// The header of group g for row r of block b: a[i] = alpha_i (the +-1 scale of plane i), off = the
// +-1 offset (0 without offsets) and base = the value of the all-zero code (see the file comment).
// The float format computes base = off - sum_i alpha_i in plane order; the uniform one has it
// exactly: mu.
void group_header_scalar(const Problem& p, int64_t b, int64_t g, int r, float* a, float* off, float* base) {
    if (p.su) {
        const uint16_t* u = p.su + (b * p.NG + g) * 32;
        const float s = half_to_float(u[r]), mu = half_to_float(u[16 + r]);
        a[0] = 0.5f * s;
        for (int i = 1; i < p.q; ++i) a[i] = 2.f * a[i - 1];
        *off = mu + s * (float((1 << p.q) - 1) * 0.5f);  // s (2^q - 1) / 2 is exact in float
        *base = mu;
        return;
    }
    const float* s = p.scales + (b * p.NG + g) * p.q * 16 + r;
    *off = p.offsets ? p.offsets[(b * p.NG + g) * 16 + r] : 0.f;
    *base = *off;
    for (int i = 0; i < p.q; ++i) {
        a[i] = s[i * 16];
        *base -= a[i];
    }
}

// Table of 4 columns: t[m] = sum_j (bit j of m ? +x_j : -x_j), summed in the order j = 0..3 (the
// SIMD builds use the same order, so every ISA builds bit-identical tables).
void table4_scalar(const float xs[4], float* t) {
    for (int m = 0; m < 16; ++m) {
        float v = (m & 1) ? xs[0] : -xs[0];
        for (int j = 1; j < 4; ++j) v += ((m >> j) & 1) ? xs[j] : -xs[j];
        t[m] = v;
    }
}

void group_sums_scalar(const float* xr, int64_t K, int64_t G, int64_t NG, float* gs) {
    for (int64_t g = 0; g < NG; ++g) {
        const int64_t end = (g + 1) * G < K ? (g + 1) * G : K;
        float s = 0.f;
        for (int64_t k = g * G; k < end; ++k) s += xr[k];
        gs[g] = s;
    }
}

void prepare_scalar(const float* x, int64_t M, int64_t K, int64_t G, bool tables, float* ws) {
    const int64_t NG = ceil_div(K, G), Kp = NG * G;
    float* const sums = ws + (tables ? M * Kp * 4 : 0);
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        if (tables) {
            float* w = ws + m * Kp * 4;
            for (int64_t c = 0; c < Kp / 4; ++c) {
                float xs[4];
                for (int j = 0; j < 4; ++j) xs[j] = 4 * c + j < K ? xr[4 * c + j] : 0.f;
                table4_scalar(xs, w + 16 * c);
            }
        }
        group_sums_scalar(xr, K, G, NG, sums + m * NG);
    }
}

// GEMV: rows [16b, 16b+16) of W for every row of X.
void lut_block_scalar(const Problem& p, int64_t b) {
    const int q = p.q;
    const uint8_t* cb = p.codes + b * p.octs * q * 16;
    const bool has_off = p.has_offset();
    for (int r = 0; r < kBlock && b * kBlock + r < p.N; ++r) {
        for (int64_t m = 0; m < p.M; ++m) {
            const float* T = p.tables + m * p.Kp * 4;
            const float* gs = p.gsums + m * p.NG;
            float tot = 0.f;
            for (int64_t g = 0; g < p.NG; ++g) {
                int64_t o0, o1;
                group_octets(p, g, &o0, &o1);
                float a[kMaxQ], off, base;
                group_header_scalar(p, b, g, r, a, &off, &base);
                for (int i = 0; i < q; ++i) {
                    float part = 0.f;
                    for (int64_t o = o0; o < o1; ++o) {
                        const uint8_t c = cb[(o * q + i) * 16 + r];
                        part += T[32 * o + (c & 15)] + T[32 * o + 16 + (c >> 4)];
                    }
                    tot += a[i] * part;
                }
                if (has_off) tot += off * gs[g];
            }
            p.y[m * p.N + b * kBlock + r] = tot;
        }
    }
}

void lut_task_scalar(const Problem& p, int64_t t) {
    for (int64_t b = 2 * t; b < 2 * t + 2 && b < p.NB; ++b) lut_block_scalar(p, b);
}

// GEMM: expand columns [k0, k0 + kc) of rows [16 b0, 16 (b0 + nv)) of W into panel[k][16 nv].
// w = base + sum_{i : bit set} 2 alpha_i (base: the group header's, mu - sum_i alpha_i or the
// uniform mu), added in plane order (as the SIMD expansions do, so every ISA expands to the same
// floats).
void expand_scalar(const Problem& p, int64_t b0, int nv, int64_t k0, int64_t kc, float* panel) {
    const int q = p.q;
    const int64_t o0 = k0 / 8, o1 = ceil_div(k0 + kc, 8);
    for (int bb = 0; bb < nv; ++bb) {
        const uint8_t* cb = p.codes + (b0 + bb) * p.octs * q * 16;
        for (int64_t o = o0; o < o1; ++o) {
            const int64_t g = o * 8 / p.G;
            for (int r = 0; r < 16; ++r) {
                float a[kMaxQ], off, base;
                group_header_scalar(p, b0 + bb, g, r, a, &off, &base);
                for (int j = 0; j < 8; ++j) {
                    float w = base;
                    for (int i = 0; i < q; ++i) {
                        if ((cb[(o * q + i) * 16 + r] >> j) & 1) w += 2.f * a[i];
                    }
                    panel[((o - o0) * 8 + j) * 16 * nv + bb * 16 + r] = w;
                }
            }
        }
    }
}

// C[R rows of Y, 16 columns, first ncols written] (+)= X[R, kc] . panel[kc, 16] (row stride ldw).
// Written with GCC/Clang vector types (4 floats: SSE2 on x86-64, NEON on aarch64) so that the tile
// stays in registers; plain loops get vectorised across rows with shuffles instead.
typedef float v4f __attribute__((vector_size(16)));
typedef float v4f_u __attribute__((vector_size(16), aligned(4)));  // unaligned loads of the panel

template <int R>
void mk_scalar(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y, int64_t ldy,
               bool accumulate, int64_t ncols) {
    v4f acc[R][4];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = v4f{0.f, 0.f, 0.f, 0.f};
    for (int64_t k = 0; k < kc; ++k) {
        v4f b[4];
        for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const v4f_u*>(w + k * ldw + 4 * j);
        for (int r = 0; r < R; ++r) {
            const float xv = x[r * ldx + k];
            const v4f a = {xv, xv, xv, xv};
            for (int j = 0; j < 4; ++j) acc[r][j] += a * b[j];
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int64_t n = 0; n < ncols && n < 16; ++n) {
            const float v = acc[r][n / 4][n % 4];
            y[r * ldy + n] = accumulate ? y[r * ldy + n] + v : v;
        }
    }
}

using MkScalar = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool, int64_t);
constexpr int kMrScalar = SHIFTC_LUT_X86 ? 2 : 4;  // 16 vector registers on x86-64 (SSE2), 32 on aarch64
constexpr MkScalar kMkScalarAll[4] = {mk_scalar<1>, mk_scalar<2>, mk_scalar<3>, mk_scalar<4>};
const MkScalar* const kMkScalar = kMkScalarAll;

void gemm_task_scalar(const Problem& p, int64_t t) {
    const int64_t b0 = 2 * t;
    const int nv = b0 + 1 < p.NB ? 2 : 1;
    const int64_t n0 = t * kTaskRows;
    const int64_t width = 16 * nv;
    float panel[kKc * kTaskRows];
    const int64_t ks = k_slice(p.M);
    const RowSplit rs(p.M, kMrScalar);
    const int64_t nsl = ceil_div(p.K, ks);
    for (int64_t sl = 0; sl < nsl; ++sl) {
        const int64_t k0 = slice_start(t, sl, nsl, ks);
        const int64_t kc = p.K - k0 < ks ? p.K - k0 : ks;
        expand_scalar(p, b0, nv, k0, kc, panel);
        for (int half = 0; half < nv; ++half) {
            const int64_t ncols = p.N - n0 - 16 * half;
            if (ncols <= 0) break;
            for (int64_t i = 0; i < rs.nblk; ++i) {
                const int64_t m0 = rs.start(i);
                kMkScalar[rs.size(i) - 1](p.x + m0 * p.K + k0, p.K, panel + 16 * half, width, kc,
                                          p.y + m0 * p.N + n0 + 16 * half, p.N, sl > 0, ncols);
            }
        }
    }
}

#if SHIFTC_LUT_NEON
// ===========================================================================================
// NEON (AArch64: Advanced SIMD is baseline, so no run-time check; kScalar stays selectable)
// ===========================================================================================
//
// Instructions per 16 rows x 8 columns x 1 plane x 1 row of X, counted in the GCC 12 -O3 output
// (aarch64-linux-gnu-g++, the flags of `shiftc compile`). No aarch64 hardware was available, so
// none of this is timed (qemu timings mean nothing); the counts are the only cost figure:
//   GEMV   1 code load, 4 for 4*nibble (shl/ushr, and 0x3c), 8 tbl (1 register: each row's
//          4*nibble into the 4 bytes of its float), 8 orr (+ byte 0..3), 8 tbl (4 registers:
//          the 64-byte table), 8 fadd                                                  = 37
//          + per octet and row of X, shared by the planes: 2 ld1 {4 registers} (the two tables)
//          and ~5 loop instructions: 44 per octet for q = 1, no spills. q = 2, 3, 4: 109, 170, 175
//          per octet (ideal 81, 118, 155); the excess is reloads of the selector constants and
//          spills of partials - load/store-port work, the vector-op count stays 36 per plane.
//          The scalar loop needs about 8 instructions per weight (~128 here).
//   table  per 4 columns: 1 load, 1 fmul + 7 fmla by element with +-1 vectors (exact, like the
//          x86 builds' sign vectors), 2 stp, 3 register moves (fmla is destructive), 2 loop
//          = 16 - bit-identical to table4_scalar (checked).
//   GEMM   expansion 3 per 4 weights and plane (cmtst, and, fadd) + 1 store per 4 weights;
//          micro-kernel 5 x 16 tile: 20 fmla by element per 4 loads of the panel row.

alignas(16) const float kSignLo[4] = {-1, 1, -1, 1};   // bit 0 of the entry index 4k + l
alignas(16) const float kSignHi[4] = {-1, -1, 1, 1};   // bit 1
// Quad k of a 16-row index vector: the nibble of row 4k + l repeated in bytes 4l..4l+3.
alignas(16) const uint8_t kQuadSel[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15},
};
alignas(16) const uint8_t kByteOfFloat[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};

float group_sum_neon(const float* x, int64_t n) {
    float32x4_t s = vdupq_n_f32(0.f);
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) s = vaddq_f32(s, vld1q_f32(x + k));
    float r = vaddvq_f32(s);
    for (; k < n; ++k) r += x[k];
    return r;
}

// Tables: entries 4k..4k+3 form vector k. Entries differ in bits 0, 1 within a vector (lanes) and
// in bits 2, 3 across vectors, so ((+-x0 +- x1) +- x2) +- x3 takes 7 vector ops, each an exact
// product by +-1 and one rounding: the same floats as table4_scalar, in the same order.
void prepare_neon(const float* x, int64_t M, int64_t K, int64_t G, bool tables, float* ws) {
    const int64_t NG = ceil_div(K, G), Kp = NG * G;
    float* const sums = ws + (tables ? M * Kp * 4 : 0);
    const float32x4_t s0 = vld1q_f32(kSignLo), s1 = vld1q_f32(kSignHi);
    const float32x4_t neg = vdupq_n_f32(-1.f), pos = vdupq_n_f32(1.f);
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        if (tables) {
            float* w = ws + m * Kp * 4;
            const int64_t full = K / 4;  // quads entirely inside K
            for (int64_t c = 0; c < full; ++c) {
                const float32x4_t xv = vld1q_f32(xr + 4 * c);
                const float32x4_t a = vfmaq_laneq_f32(vmulq_laneq_f32(s0, xv, 0), s1, xv, 1);
                const float32x4_t b0 = vfmaq_laneq_f32(a, neg, xv, 2), b1 = vfmaq_laneq_f32(a, pos, xv, 2);
                float* t = w + 16 * c;
                vst1q_f32(t, vfmaq_laneq_f32(b0, neg, xv, 3));
                vst1q_f32(t + 4, vfmaq_laneq_f32(b1, neg, xv, 3));
                vst1q_f32(t + 8, vfmaq_laneq_f32(b0, pos, xv, 3));
                vst1q_f32(t + 12, vfmaq_laneq_f32(b1, pos, xv, 3));
            }
            for (int64_t c = full; c < Kp / 4; ++c) {
                float xs[4];
                for (int j = 0; j < 4; ++j) xs[j] = 4 * c + j < K ? xr[4 * c + j] : 0.f;
                table4_scalar(xs, w + 16 * c);
            }
        }
        float* gs = sums + m * NG;
        for (int64_t g = 0; g < NG; ++g) {
            const int64_t end = (g + 1) * G < K ? (g + 1) * G : K;
            gs[g] = group_sum_neon(xr + g * G, end - g * G);
        }
    }
}

// group_header_scalar for rows 4k..4k+3 of block b (one q register; the halves by vcvt_f32_f16).
template <int Q>
inline void group_header_neon(const Problem& p, int64_t b, int64_t g, int k, float32x4_t* a, float32x4_t& off,
                              float32x4_t& base) {
    if (p.su) {
        const uint16_t* u = p.su + (b * p.NG + g) * 32 + 4 * k;
        const float32x4_t s = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(u)));
        const float32x4_t mu = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(u + 16)));
        a[0] = vmulq_n_f32(s, 0.5f);
        for (int i = 1; i < Q; ++i) a[i] = vaddq_f32(a[i - 1], a[i - 1]);
        off = vfmaq_n_f32(mu, s, float((1 << Q) - 1) * 0.5f);
        base = mu;
        return;
    }
    const float* s = p.scales + (b * p.NG + g) * Q * 16 + 4 * k;
    off = p.offsets ? vld1q_f32(p.offsets + (b * p.NG + g) * 16 + 4 * k) : vdupq_n_f32(0.f);
    base = off;
    for (int i = 0; i < Q; ++i) {
        a[i] = vld1q_f32(s + i * 16);
        base = vsubq_f32(base, a[i]);
    }
}

// GEMV, block b (16 rows) x row m of X. The 16-float table of 4 columns is 64 bytes: four
// q registers, one vqtbl4q_u8 table. Byte 4l + j of the index vector for rows 4k..4k+3 is
// 4 * nibble(row 4k + l) + j, so one lookup yields the 4 rows' floats. Per group and plane the
// partials are summed as part += (T_lo + T_hi) per octet (the scalar order), then scaled.
template <int Q>
void lut_block_neon(const Problem& p, int64_t b, int64_t m) {
    const uint8_t* cb = p.codes + b * p.octs * Q * 16;
    const bool has_off = p.has_offset();
    const uint8_t* T = reinterpret_cast<const uint8_t*>(p.tables + m * p.Kp * 4);
    const float* gs = p.gsums + m * p.NG;
    const uint8x16_t off = vld1q_u8(kByteOfFloat), m3c = vdupq_n_u8(0x3c);
    uint8x16_t sel[4];
    for (int k = 0; k < 4; ++k) sel[k] = vld1q_u8(kQuadSel[k]);
    float32x4_t tot[4];
    for (int k = 0; k < 4; ++k) tot[k] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < p.NG; ++g) {
        int64_t o0, o1;
        group_octets(p, g, &o0, &o1);
        float32x4_t part[Q][4];
        for (int i = 0; i < Q; ++i)
            for (int k = 0; k < 4; ++k) part[i][k] = vdupq_n_f32(0.f);
        for (int64_t o = o0; o < o1; ++o) {
            const uint8_t* t = T + 128 * o;  // 32 floats: low-nibble table, then high-nibble table
            const uint8x16x4_t tlo = vld1q_u8_x4(t), thi = vld1q_u8_x4(t + 64);
#pragma GCC unroll 4
            for (int i = 0; i < Q; ++i) {
                const uint8x16_t c = vld1q_u8(cb + (o * Q + i) * 16);
                // 4 * nibble: (c << 2) & 0x3c and (c >> 2) & 0x3c
                const uint8x16_t nlo = vandq_u8(vshlq_n_u8(c, 2), m3c), nhi = vandq_u8(vshrq_n_u8(c, 2), m3c);
#pragma GCC unroll 4
                for (int k = 0; k < 4; ++k) {
                    const uint8x16_t ilo = vorrq_u8(vqtbl1q_u8(nlo, sel[k]), off);
                    const uint8x16_t ihi = vorrq_u8(vqtbl1q_u8(nhi, sel[k]), off);
                    const float32x4_t v = vaddq_f32(vreinterpretq_f32_u8(vqtbl4q_u8(tlo, ilo)),
                                                    vreinterpretq_f32_u8(vqtbl4q_u8(thi, ihi)));
                    part[i][k] = vaddq_f32(part[i][k], v);
                }
            }
        }
        for (int k = 0; k < 4; ++k) {
            float32x4_t a[Q], off, base;
            group_header_neon<Q>(p, b, g, k, a, off, base);
            for (int i = 0; i < Q; ++i) tot[k] = vfmaq_f32(tot[k], part[i][k], a[i]);
            if (has_off) tot[k] = vfmaq_n_f32(tot[k], off, gs[g]);
        }
    }
    const int64_t n0 = b * kBlock, valid = p.N - n0;
    float* yr = p.y + m * p.N + n0;
    if (valid >= 16) {
        for (int k = 0; k < 4; ++k) vst1q_f32(yr + 4 * k, tot[k]);
    } else {
        alignas(16) float l[16];
        for (int k = 0; k < 4; ++k) vst1q_f32(l + 4 * k, tot[k]);
        for (int64_t r = 0; r < valid; ++r) yr[r] = l[r];
    }
}

template <int Q>
void lut_task_neon_q(const Problem& p, int64_t t) {
    for (int64_t b = 2 * t; b < 2 * t + 2 && b < p.NB; ++b)
        for (int64_t m = 0; m < p.M; ++m) lut_block_neon<Q>(p, b, m);
}

void lut_task_neon(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) { lut_task_neon_q<decltype(Q)::value>(p, t); });
}

// GEMM expansion, 4 rows (one q register) at a time: the rows' code bytes of each plane are
// widened to 32-bit lanes once per octet; per column, cmtst with bit j gives the lane mask that
// keeps 2 alpha (or +0) to add, in plane order as expand_scalar.
template <int Q>
void expand_neon(const Problem& p, int64_t b0, int nv, int64_t k0, int64_t kc, float* panel) {
    const int64_t o0 = k0 / 8, o1 = ceil_div(k0 + kc, 8);
    const int64_t width = 16 * nv;
    for (int bb = 0; bb < nv; ++bb) {
        const uint8_t* cb = p.codes + (b0 + bb) * p.octs * Q * 16;
        for (int k = 0; k < 4; ++k) {
            int64_t gnext = o0;
            float32x4_t base = vdupq_n_f32(0.f);
            uint32x4_t a2[Q];
            for (int i = 0; i < Q; ++i) a2[i] = vdupq_n_u32(0);
            for (int64_t o = o0; o < o1; ++o) {
                if (o == gnext) {  // first octet of a group
                    const int64_t g = o * 8 / p.G;
                    gnext = (g + 1) * p.G / 8;
                    float32x4_t a[Q], off;
                    group_header_neon<Q>(p, b0 + bb, g, k, a, off, base);
                    for (int i = 0; i < Q; ++i) a2[i] = vreinterpretq_u32_f32(vaddq_f32(a[i], a[i]));
                }
                uint32x4_t c[Q];
#pragma GCC unroll 4
                for (int i = 0; i < Q; ++i) {
                    uint32_t word;
                    __builtin_memcpy(&word, cb + (o * Q + i) * 16 + 4 * k, 4);
                    const uint8x8_t c8 = vreinterpret_u8_u32(vdup_n_u32(word));
                    c[i] = vmovl_u16(vget_low_u16(vmovl_u8(c8)));
                }
                float* dst = panel + (o - o0) * 8 * width + bb * 16 + 4 * k;
#pragma GCC unroll 8
                for (int j = 0; j < 8; ++j) {
                    const uint32x4_t bit = vdupq_n_u32(1u << j);
                    float32x4_t w = base;
#pragma GCC unroll 4
                    for (int i = 0; i < Q; ++i)
                        w = vaddq_f32(w, vreinterpretq_f32_u32(vandq_u32(vtstq_u32(c[i], bit), a2[i])));
                    vst1q_f32(dst + j * width, w);
                }
            }
        }
    }
}

// C[R rows of Y, 16 columns, first ncols written] (+)= X[R, kc] . panel[kc, 16] (row stride ldw):
// 4 R accumulators + R x registers + 4 panel registers <= 32 for R <= 5.
#define SHIFTC_NEON_MK_STEP(U)                                                      \
    {                                                                               \
        float32x4_t bv[4];                                                          \
        for (int j = 0; j < 4; ++j) bv[j] = vld1q_f32(w + (k + U) * ldw + 4 * j);   \
        for (int r = 0; r < R; ++r)                                                 \
            for (int j = 0; j < 4; ++j) acc[r][j] = vfmaq_laneq_f32(acc[r][j], bv[j], a[r], U); \
    }
template <int R>
void mk_neon(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y, int64_t ldy,
             bool accumulate, int64_t ncols) {
    float32x4_t acc[R][4];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_f32(0.f);
    int64_t k = 0;
    for (; k + 4 <= kc; k += 4) {
        float32x4_t a[R];
        for (int r = 0; r < R; ++r) a[r] = vld1q_f32(x + r * ldx + k);
        SHIFTC_NEON_MK_STEP(0)
        SHIFTC_NEON_MK_STEP(1)
        SHIFTC_NEON_MK_STEP(2)
        SHIFTC_NEON_MK_STEP(3)
    }
    for (; k < kc; ++k) {
        float32x4_t bv[4];
        for (int j = 0; j < 4; ++j) bv[j] = vld1q_f32(w + k * ldw + 4 * j);
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = vfmaq_n_f32(acc[r][j], bv[j], x[r * ldx + k]);
    }
    for (int r = 0; r < R; ++r) {
        float* yr = y + r * ldy;
        if (ncols >= 16) {
            for (int j = 0; j < 4; ++j)
                vst1q_f32(yr + 4 * j, accumulate ? vaddq_f32(vld1q_f32(yr + 4 * j), acc[r][j]) : acc[r][j]);
        } else {
            alignas(16) float l[16];
            for (int j = 0; j < 4; ++j) vst1q_f32(l + 4 * j, acc[r][j]);
            for (int64_t n = 0; n < ncols; ++n) yr[n] = accumulate ? yr[n] + l[n] : l[n];
        }
    }
}
#undef SHIFTC_NEON_MK_STEP

constexpr int kMrNeon = 5;
constexpr MkScalar kMkNeon[kMrNeon] = {mk_neon<1>, mk_neon<2>, mk_neon<3>, mk_neon<4>, mk_neon<5>};

template <int Q>
void gemm_task_neon_q(const Problem& p, int64_t t) {
    const int64_t b0 = 2 * t;
    const int nv = b0 + 1 < p.NB ? 2 : 1;
    const int64_t n0 = t * kTaskRows;
    const int64_t width = 16 * nv;
    alignas(64) float panel[kKc * kTaskRows];
    const int64_t ks = k_slice(p.M);
    const RowSplit rs(p.M, kMrNeon);
    const int64_t nsl = ceil_div(p.K, ks);
    for (int64_t sl = 0; sl < nsl; ++sl) {
        const int64_t k0 = slice_start(t, sl, nsl, ks);
        const int64_t kc = p.K - k0 < ks ? p.K - k0 : ks;
        expand_neon<Q>(p, b0, nv, k0, kc, panel);
        for (int half = 0; half < nv; ++half) {
            const int64_t ncols = p.N - n0 - 16 * half;
            if (ncols <= 0) break;
            for (int64_t i = 0; i < rs.nblk; ++i) {
                const int64_t m0 = rs.start(i);
                kMkNeon[rs.size(i) - 1](p.x + m0 * p.K + k0, p.K, panel + 16 * half, width, kc,
                                        p.y + m0 * p.N + n0 + 16 * half, p.N, sl > 0, ncols);
            }
        }
    }
}

void gemm_task_neon(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) { gemm_task_neon_q<decltype(Q)::value>(p, t); });
}
#endif  // SHIFTC_LUT_NEON

#if SHIFTC_LUT_X86
// ===========================================================================================
// AVX2 + FMA
// ===========================================================================================

// Lane m of kSign[j] is +1 where bit j of m is set, else -1 (16 lanes: a whole 4-column table).
alignas(64) const float kSign[4][16] = {
    {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1},
    {-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1},
    {-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1},
    {-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1},
};

SHIFTC_TARGET_AVX2 float group_sum_avx2(const float* x, int64_t n) {
    __m256 s = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + k));
    alignas(32) float l[8];
    _mm256_store_ps(l, s);
    float r = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    for (; k < n; ++k) r += x[k];
    return r;
}

// prepare_t8_avx512's tables (the same entries: same float tables, same rounding) on AVX2.
SHIFTC_TARGET_AVX2 void prepare_t8_avx2(float* ws, int64_t M, int64_t Kp, int64_t NG, int64_t G) {
    float* const t8s = ws + M * Kp * 4 + M * NG + M * t8_floats(Kp);
    uint8_t* const t8 = reinterpret_cast<uint8_t*>(ws + M * Kp * 4 + M * NG);
    const int64_t half = t8_half_bytes(Kp), row = 2 * half;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i bias = _mm256_set1_epi32(128);
    for (int64_t m = 0; m < M; ++m) {
        const float* tf = ws + m * Kp * 4;
        uint8_t* lo = t8 + m * row;
        uint8_t* hi = lo + half;
        for (int64_t g = 0; g < NG; ++g) {
            const int64_t c0 = g * G / 4, c1 = c0 + G / 4;
            __m256 mx = _mm256_setzero_ps();
            for (int64_t c = c0; c < c1; ++c) {
                mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(tf + 16 * c), abs_mask));
                mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(tf + 16 * c + 8), abs_mask));
            }
            alignas(32) float l[8];
            _mm256_store_ps(l, mx);
            float amax = 0.f;
            for (float v : l) amax = v > amax ? v : amax;
            t8s[m * NG + g] = amax / 127.f;
            const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            for (int64_t c = c0; c < c1; ++c) {
                const __m256i v0 = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(tf + 16 * c), inv)), bias);
                const __m256i v1 =
                    _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(tf + 16 * c + 8), inv)), bias);
                // entries 0-3, 8-11 | 4-7, 12-15 as words, then in order, then bytes
                const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(v0, v1), 0xD8);
                _mm_storeu_si128((__m128i*)((c & 1 ? hi : lo) + (c / 2) * 16),
                                 _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
            }
        }
        t8_fill_spare(lo, hi, Kp);
    }
}

SHIFTC_TARGET_AVX2 void prepare_avx2(const float* x, int64_t M, int64_t K, int64_t G, bool tables,
                                     float* ws) {
    const int64_t NG = ceil_div(K, G), Kp = NG * G;
    float* const sums = ws + (tables ? M * Kp * 4 : 0);
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        float* w = ws + m * Kp * 4;
        if (tables) {
            for (int h = 0; h < 2; ++h) {
                const __m256 s0 = _mm256_load_ps(kSign[0] + 8 * h), s1 = _mm256_load_ps(kSign[1] + 8 * h);
                const __m256 s2 = _mm256_load_ps(kSign[2] + 8 * h), s3 = _mm256_load_ps(kSign[3] + 8 * h);
                for (int64_t c = 0; c < Kp / 4; ++c) {
                    float xs[4];
                    for (int j = 0; j < 4; ++j) xs[j] = 4 * c + j < K ? xr[4 * c + j] : 0.f;
                    __m256 t = _mm256_mul_ps(_mm256_set1_ps(xs[0]), s0);
                    t = _mm256_fmadd_ps(_mm256_set1_ps(xs[1]), s1, t);
                    t = _mm256_fmadd_ps(_mm256_set1_ps(xs[2]), s2, t);
                    t = _mm256_fmadd_ps(_mm256_set1_ps(xs[3]), s3, t);
                    _mm256_storeu_ps(w + 16 * c + 8 * h, t);
                }
            }
        }
        w = sums + m * NG;
        for (int64_t g = 0; g < NG; ++g) {
            const int64_t end = (g + 1) * G < K ? (g + 1) * G : K;
            w[g] = group_sum_avx2(xr + g * G, end - g * G);
        }
    }
    if (tables) prepare_t8_avx2(ws, M, Kp, NG, G);
}

// Uniform weights: sh = s/2 (= alpha_0), off = mu + s (2^Q - 1)/2 and mu of group g for rows
// 8h..8h+7 of block b (the halves by vcvtph2ps).
template <int Q>
SHIFTC_TARGET_AVX2 inline void uniform_header_avx2(const Problem& p, int64_t b, int64_t g, int h, __m256& sh,
                                                   __m256& off, __m256& mu) {
    const uint16_t* u = p.su + (b * p.NG + g) * 32 + 8 * h;
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)u));
    mu = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(u + 16)));
    sh = _mm256_mul_ps(s, _mm256_set1_ps(0.5f));
    off = _mm256_fmadd_ps(s, _mm256_set1_ps(float((1 << Q) - 1) * 0.5f), mu);
}

// group_header_scalar for rows 8h..8h+7 of block b (one register).
template <int Q>
SHIFTC_TARGET_AVX2 inline void group_header_avx2(const Problem& p, int64_t b, int64_t g, int h, __m256* a,
                                                 __m256& off, __m256& base) {
    if (p.su) {
        uniform_header_avx2<Q>(p, b, g, h, a[0], off, base);
        for (int i = 1; i < Q; ++i) a[i] = _mm256_add_ps(a[i - 1], a[i - 1]);
        return;
    }
    const float* s = p.scales + (b * p.NG + g) * Q * 16 + 8 * h;
    off = p.offsets ? _mm256_loadu_ps(p.offsets + (b * p.NG + g) * 16 + 8 * h) : _mm256_setzero_ps();
    base = off;
    for (int i = 0; i < Q; ++i) {
        a[i] = _mm256_loadu_ps(s + i * 16);
        base = _mm256_sub_ps(base, a[i]);
    }
}

// GEMV, 8 rows (half h of block b) x MC rows of X starting at m0. Table entries 0..7 and 8..15
// are two registers; the index's bit 3, shifted into the sign bit, picks one with blendv.
template <int Q, int MC>
SHIFTC_TARGET_AVX2 void lut_rows_avx2(const Problem& p, int64_t b, int h, int64_t m0) {
    const uint8_t* cb = p.codes + b * p.octs * Q * 16 + 8 * h;
    const bool has_off = p.has_offset();
    const float* T[MC];
    for (int mc = 0; mc < MC; ++mc) T[mc] = p.tables + (m0 + mc) * p.Kp * 4;
    __m256 tot[MC];
    for (int mc = 0; mc < MC; ++mc) tot[mc] = _mm256_setzero_ps();
    for (int64_t g = 0; g < p.NG; ++g) {
        int64_t o0, o1;
        // the halves of a later group (a line per block; see kPrefetchBytes)
        if (p.su) _mm_prefetch((const char*)(p.su + (b * p.NG + g + kPrefetchGroups) * 32), _MM_HINT_T0);
        group_octets(p, g, &o0, &o1);
        __m256 part[Q][MC];
        for (int i = 0; i < Q; ++i)
            for (int mc = 0; mc < MC; ++mc) part[i][mc] = _mm256_setzero_ps();
        for (int64_t o = o0; o < o1; ++o) {
            _mm_prefetch((const char*)(cb + o * Q * 16 + kPrefetchBytes), _MM_HINT_T0);
            for (int i = 0; i < Q; ++i) {
                const __m256i lo =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(cb + (o * Q + i) * 16)));
                const __m256i hi = _mm256_srli_epi32(lo, 4);
                const __m256 sel_lo = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 28));
                const __m256 sel_hi = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 24));
                for (int mc = 0; mc < MC; ++mc) {
                    const float* t = T[mc] + 32 * o;
                    const __m256 v0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t), lo),
                                                       _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8), lo),
                                                       sel_lo);
                    const __m256 v1 =
                        _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 16), hi),
                                         _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 24), hi), sel_hi);
                    part[i][mc] = _mm256_add_ps(part[i][mc], _mm256_add_ps(v0, v1));
                }
            }
        }
        __m256 a[Q], off, base;
        group_header_avx2<Q>(p, b, g, h, a, off, base);
        for (int i = 0; i < Q; ++i) {
            for (int mc = 0; mc < MC; ++mc) tot[mc] = _mm256_fmadd_ps(part[i][mc], a[i], tot[mc]);
        }
        if (has_off) {
            for (int mc = 0; mc < MC; ++mc)
                tot[mc] = _mm256_fmadd_ps(off, _mm256_set1_ps(p.gsums[(m0 + mc) * p.NG + g]), tot[mc]);
        }
    }
    const int64_t n0 = b * kBlock + 8 * h;
    const int64_t valid = p.N - n0;
    for (int mc = 0; mc < MC; ++mc) {
        float* yr = p.y + (m0 + mc) * p.N + n0;
        if (valid >= 8) {
            _mm256_storeu_ps(yr, tot[mc]);
        } else {
            alignas(32) float l[8];
            _mm256_store_ps(l, tot[mc]);
            for (int64_t r = 0; r < valid; ++r) yr[r] = l[r];
        }
    }
}

// Rows of X per pass in the AVX2 GEMV (accumulators within the 16 vector registers).
constexpr int lut_mc_avx2(int q) { return q == 1 ? 4 : q == 2 ? 3 : 2; }

using LutRowsAvx2 = void (*)(const Problem&, int64_t, int, int64_t);
template <int Q, int MC>
constexpr LutRowsAvx2 lut_fn_avx2() {
    if constexpr (MC <= lut_mc_avx2(Q)) {
        return lut_rows_avx2<Q, MC>;
    } else {
        return nullptr;
    }
}
template <int Q>
constexpr LutRowsAvx2 kLutAvx2[4] = {lut_fn_avx2<Q, 1>(), lut_fn_avx2<Q, 2>(), lut_fn_avx2<Q, 3>(),
                                     lut_fn_avx2<Q, 4>()};

template <int Q>
void lut_task_avx2_q(const Problem& p, int64_t t) {
    const RowSplit rs(p.M, lut_mc_avx2(Q));
    for (int64_t b = 2 * t; b < 2 * t + 2 && b < p.NB; ++b) {
        for (int h = 0; h < 2 && b * kBlock + 8 * h < p.N; ++h) {
            for (int64_t i = 0; i < rs.nblk; ++i) kLutAvx2<Q>[rs.size(i) - 1](p, b, h, rs.start(i));
        }
    }
}

void lut_task_avx2(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) { lut_task_avx2_q<decltype(Q)::value>(p, t); });
}

// GEMV of uniform weights on the int8 tables, AVX2: lut8_rows_avx512's method on 32-byte loads
// (lane L of load u holds chunk 2u + L: plane (2u + L) % Q; its table is its octet's, from a
// broadcast or a 32-byte load of two octets' tables), one block of 16 rows per pass; the planes'
// weights 2^i by a 16-bit multiply (AVX2 has no per-word shifts).
constexpr int t8_sets_avx2(int q) { return q == 3 ? 3 : q == 4 ? 2 : 1; }

template <int Q>
SHIFTC_TARGET_AVX2 inline __m256i t8_plane_weight_avx2(int r) {
    const short w0 = short(1 << ((2 * r) % Q)), w1 = short(1 << ((2 * r + 1) % Q));
    return _mm256_setr_epi16(w0, w0, w0, w0, w0, w0, w0, w0, w1, w1, w1, w1, w1, w1, w1, w1);
}

template <int Q>
SHIFTC_TARGET_AVX2 void lut8_block_avx2(const Problem& p, int64_t b, int64_t m) {
    constexpr int R = t8_sets_avx2(Q);
    const int64_t bstride = p.octs * Q * 16;
    const int64_t half = t8_half_bytes(p.Kp);
    const uint8_t* cb = p.codes + b * bstride;
    const uint8_t* TL = p.t8 + m * 2 * half;
    const __m256i nib = _mm256_set1_epi8(0x0F);
    __m256 tot[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < p.NG; ++g) {
        _mm_prefetch((const char*)(p.su + (b * p.NG + g + kPrefetchGroups) * 32), _MM_HINT_T0);
        int64_t o0, o1;
        group_octets(p, g, &o0, &o1);
        const int64_t chunks = (o1 - o0) * Q, loads = ceil_div(chunks, 2);
        __m256i S[R], H[R];
        for (int r = 0; r < R; ++r) S[r] = H[r] = _mm256_setzero_si256();
        auto step = [&](auto rc, int64_t u) SHIFTC_TARGET_AVX2 {
            constexpr int r = decltype(rc)::value;
            const int64_t ob = o0 + (2 * u) / Q;
            const bool two = (2 * u + 1) / Q != (2 * u) / Q;  // the lanes' octets differ
            __m256i tl, th;
            if (two) {
                tl = _mm256_loadu_si256((const __m256i*)(TL + ob * 16));
                th = _mm256_loadu_si256((const __m256i*)(TL + half + ob * 16));
            } else {
                tl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(TL + ob * 16)));
                th = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(TL + half + ob * 16)));
            }
            const uint8_t* c = cb + (o0 * Q + 2 * u) * 16;
            _mm_prefetch((const char*)(c + kPrefetchBytesL2), _MM_HINT_T1);
            const bool whole = chunks - 2 * u >= 2;
            const __m256i code = whole ? _mm256_loadu_si256((const __m256i*)c)
                                       : _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)c));
            const __m256i lo = _mm256_and_si256(code, nib);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(code, 4), nib);
            __m256i a = _mm256_shuffle_epi8(tl, lo), bb = _mm256_shuffle_epi8(th, hi);
            if (!whole) {  // a lone last chunk: the upper lane looked up garbage
                a = _mm256_permute2x128_si256(a, a, 0x80);
                bb = _mm256_permute2x128_si256(bb, bb, 0x80);
            }
            S[r] = _mm256_add_epi16(S[r], _mm256_add_epi16(a, bb));
            H[r] = _mm256_add_epi16(H[r], _mm256_add_epi16(_mm256_srli_epi16(a, 8), _mm256_srli_epi16(bb, 8)));
        };
        for (int64_t u = 0; u < loads; u += R) {
            step(std::integral_constant<int, 0>{}, u);
            if constexpr (R >= 2) {
                if (u + 1 < loads) step(std::integral_constant<int, 1>{}, u + 1);
            }
            if constexpr (R == 3) {
                if (u + 2 < loads) step(std::integral_constant<int, 2>{}, u + 2);
            }
        }
        __m256i sw = _mm256_setzero_si256(), hw = _mm256_setzero_si256();
        for (int r = 0; r < R; ++r) {
            const __m256i w = t8_plane_weight_avx2<Q>(r);
            sw = _mm256_add_epi16(sw, _mm256_mullo_epi16(S[r], w));
            hw = _mm256_add_epi16(hw, _mm256_mullo_epi16(H[r], w));
        }
        sw = _mm256_add_epi16(sw, _mm256_permute2x128_si256(sw, sw, 0x01));  // both lanes: the total
        hw = _mm256_add_epi16(hw, _mm256_permute2x128_si256(hw, hw, 0x01));
        const __m256i e = _mm256_sub_epi16(sw, _mm256_slli_epi16(hw, 8));  // even rows
        const __m128i r0 = _mm256_castsi256_si128(_mm256_unpacklo_epi16(e, hw));  // rows 0..7
        const __m128i r1 = _mm256_castsi256_si128(_mm256_unpackhi_epi16(e, hw));  // rows 8..15
        const __m256 bias = _mm256_set1_ps(float(256 * (o1 - o0) * ((1 << Q) - 1)));
        const __m256 sc = _mm256_set1_ps(p.t8s[m * p.NG + g]), gs = _mm256_set1_ps(p.gsums[m * p.NG + g]);
        for (int h = 0; h < 2; ++h) {
            __m256 sh, off, mu;
            uniform_header_avx2<Q>(p, b, g, h, sh, off, mu);
            const __m256 v = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(h ? r1 : r0)), bias);
            tot[h] = _mm256_fmadd_ps(v, _mm256_mul_ps(sh, sc), tot[h]);
            tot[h] = _mm256_fmadd_ps(off, gs, tot[h]);
        }
    }
    const int64_t n0 = b * kBlock;
    for (int h = 0; h < 2; ++h) {
        const int64_t valid = p.N - n0 - 8 * h;
        if (valid <= 0) break;
        if (valid >= 8) {
            _mm256_storeu_ps(p.y + m * p.N + n0 + 8 * h, tot[h]);
        } else {
            alignas(32) float l[8];
            _mm256_store_ps(l, tot[h]);
            for (int64_t i = 0; i < valid; ++i) p.y[m * p.N + n0 + 8 * h + i] = l[i];
        }
    }
}

void lut8_task_avx2(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) {
        for (int64_t b = 2 * t; b < 2 * t + 2 && b < p.NB; ++b)
            for (int64_t m = 0; m < p.M; ++m) lut8_block_avx2<decltype(Q)::value>(p, b, m);
    });
}

// GEMM expansion, 8 rows at a time: bit j of the code bytes (zero-extended to 32-bit lanes) is
// moved into the sign bit and selects 2 alpha or 0 with blendv.
template <int Q>
SHIFTC_TARGET_AVX2 void expand_avx2(const Problem& p, int64_t b0, int nv, int64_t k0, int64_t kc,
                                    float* panel) {
    const int64_t o0 = k0 / 8, o1 = ceil_div(k0 + kc, 8);
    const int64_t width = 16 * nv;
    for (int bb = 0; bb < nv; ++bb) {
        const uint8_t* cb = p.codes + (b0 + bb) * p.octs * Q * 16;
        for (int h = 0; h < 2; ++h) {
            int64_t gnext = o0;
            __m256 base = _mm256_setzero_ps(), a2[Q];
            for (int i = 0; i < Q; ++i) a2[i] = _mm256_setzero_ps();
            for (int64_t o = o0; o < o1; ++o) {
                if (o == gnext) {  // first octet of a group (one division per group, not per octet)
                    const int64_t g = o * 8 / p.G;
                    gnext = (g + 1) * p.G / 8;
                    __m256 a[Q], off;
                    group_header_avx2<Q>(p, b0 + bb, g, h, a, off, base);
                    for (int i = 0; i < Q; ++i) a2[i] = _mm256_add_ps(a[i], a[i]);
                }
                __m256i c[Q];
                for (int i = 0; i < Q; ++i) {
                    c[i] = _mm256_slli_epi32(
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(cb + (o * Q + i) * 16 + 8 * h))),
                        24);  // bit 7 in the sign bit; one more left shift per column below
                }
                float* dst = panel + (o - o0) * 8 * width + bb * 16 + 8 * h;
                for (int j = 7; j >= 0; --j) {
                    __m256 w = base;
                    for (int i = 0; i < Q; ++i) {
                        w = _mm256_add_ps(w, _mm256_blendv_ps(_mm256_setzero_ps(), a2[i], _mm256_castsi256_ps(c[i])));
                        c[i] = _mm256_slli_epi32(c[i], 1);
                    }
                    _mm256_storeu_ps(dst + j * width, w);
                }
            }
        }
    }
}

// C[MR rows of Y, 16 columns] (+)= X[MR, kc] . panel[kc, 16] (panel row stride `ldw`). With few
// rows, KU sets of accumulators hide the FMA latency. (Partial column tiles go through a scratch
// tile in the caller: masked stores here make GCC keep the accumulators in memory.)
template <int MR>
SHIFTC_TARGET_AVX2 void mk_avx2(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc,
                                float* y, int64_t ldy, bool accumulate) {
    constexpr int KU = MR >= 4 ? 1 : MR >= 2 ? 2 : 4;
    __m256 c[KU][MR][2];
    for (int u = 0; u < KU; ++u)
        for (int r = 0; r < MR; ++r) c[u][r][0] = c[u][r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + KU <= kc; k += KU) {
        for (int u = 0; u < KU; ++u) {
            const __m256 b0 = _mm256_loadu_ps(w + (k + u) * ldw), b1 = _mm256_loadu_ps(w + (k + u) * ldw + 8);
            for (int r = 0; r < MR; ++r) {
                const __m256 a = _mm256_broadcast_ss(x + r * ldx + k + u);
                c[u][r][0] = _mm256_fmadd_ps(a, b0, c[u][r][0]);
                c[u][r][1] = _mm256_fmadd_ps(a, b1, c[u][r][1]);
            }
        }
    }
    if constexpr (KU > 1) {
        for (; k < kc; ++k) {
            const __m256 b0 = _mm256_loadu_ps(w + k * ldw), b1 = _mm256_loadu_ps(w + k * ldw + 8);
            for (int r = 0; r < MR; ++r) {
                const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
                c[0][r][0] = _mm256_fmadd_ps(a, b0, c[0][r][0]);
                c[0][r][1] = _mm256_fmadd_ps(a, b1, c[0][r][1]);
            }
        }
    }
    for (int u = 1; u < KU; ++u)
        for (int r = 0; r < MR; ++r)
            for (int v = 0; v < 2; ++v) c[0][r][v] = _mm256_add_ps(c[0][r][v], c[u][r][v]);
    for (int r = 0; r < MR; ++r) {
        float* yr = y + r * ldy;
        __m256 v0 = c[0][r][0], v1 = c[0][r][1];
        if (accumulate) {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(yr));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(yr + 8));
        }
        _mm256_storeu_ps(yr, v0);
        _mm256_storeu_ps(yr + 8, v1);
    }
}

constexpr int kMrAvx2 = 6;
using MkAvx2 = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);
constexpr MkAvx2 kMkAvx2[kMrAvx2] = {mk_avx2<1>, mk_avx2<2>, mk_avx2<3>, mk_avx2<4>, mk_avx2<5>, mk_avx2<6>};

template <int Q>
SHIFTC_TARGET_AVX2 void gemm_task_avx2_q(const Problem& p, int64_t t) {
    const int64_t b0 = 2 * t;
    const int nv = b0 + 1 < p.NB ? 2 : 1;
    const int64_t n0 = t * kTaskRows, width = 16 * nv;
    alignas(64) float panel[kKc * kTaskRows];
    const RowSplit rs(p.M, kMrAvx2);
    const int64_t ks = k_slice(p.M);
    const int64_t nsl = ceil_div(p.K, ks);
    for (int64_t sl = 0; sl < nsl; ++sl) {
        const int64_t k0 = slice_start(t, sl, nsl, ks);
        const int64_t kc = p.K - k0 < ks ? p.K - k0 : ks;
        expand_avx2<Q>(p, b0, nv, k0, kc, panel);
        for (int half = 0; half < nv; ++half) {
            const int64_t ncols = p.N - n0 - 16 * half;
            if (ncols <= 0) break;
            for (int64_t i = 0; i < rs.nblk; ++i) {
                const int64_t m0 = rs.start(i), mr = rs.size(i);
                float* yt = p.y + m0 * p.N + n0 + 16 * half;
                if (ncols >= 16) {
                    kMkAvx2[mr - 1](p.x + m0 * p.K + k0, p.K, panel + 16 * half, width, kc, yt, p.N, sl > 0);
                    continue;
                }
                float tile[kMrAvx2 * 16];  // last columns of Y: through a scratch tile
                kMkAvx2[mr - 1](p.x + m0 * p.K + k0, p.K, panel + 16 * half, width, kc, tile, 16, false);
                for (int64_t r = 0; r < mr; ++r)
                    for (int64_t n = 0; n < ncols; ++n) yt[r * p.N + n] = (sl ? yt[r * p.N + n] : 0.f) + tile[r * 16 + n];
            }
        }
    }
}

void gemm_task_avx2(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) { gemm_task_avx2_q<decltype(Q)::value>(p, t); });
}

// ===========================================================================================
// AVX-512 (F, BW, VL, DQ)
// ===========================================================================================

// The int8 tables (t8_floats) from the float tables of every row of X: per group, scale =
// max |T| / 127 (the largest entry of a table is the sum of its 4 |x|), entry = round(T / scale) + 128
// in 1..255 (round to nearest even, the MXCSR default).
SHIFTC_TARGET_AVX512 void prepare_t8_avx512(float* ws, int64_t M, int64_t Kp, int64_t NG, int64_t G) {
    float* const t8s = ws + M * Kp * 4 + M * NG + M * t8_floats(Kp);
    uint8_t* const t8 = reinterpret_cast<uint8_t*>(ws + M * Kp * 4 + M * NG);
    const int64_t half = t8_half_bytes(Kp), row = 2 * half;
    for (int64_t m = 0; m < M; ++m) {
        const float* tf = ws + m * Kp * 4;
        uint8_t* lo = t8 + m * row;
        uint8_t* hi = lo + half;
        for (int64_t g = 0; g < NG; ++g) {
            const int64_t c0 = g * G / 4, c1 = c0 + G / 4;
            __m512 mx = _mm512_setzero_ps();
            for (int64_t c = c0; c < c1; ++c) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(tf + 16 * c)));
            const float amax = _mm512_reduce_max_ps(mx);
            t8s[m * NG + g] = amax / 127.f;
            const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            for (int64_t c = c0; c < c1; ++c) {
                const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(tf + 16 * c), inv)),
                                                   _mm512_set1_epi32(128));
                _mm_storeu_si128((__m128i*)((c & 1 ? hi : lo) + (c / 2) * 16), _mm512_cvtepi32_epi8(v));
            }
        }
        t8_fill_spare(lo, hi, Kp);
    }
}

SHIFTC_TARGET_AVX512 void prepare_avx512(const float* x, int64_t M, int64_t K, int64_t G, bool tables,
                                         float* ws) {
    const int64_t NG = ceil_div(K, G), Kp = NG * G;
    float* const sums = ws + (tables ? M * Kp * 4 : 0);
    const __m512 s0 = _mm512_load_ps(kSign[0]), s1 = _mm512_load_ps(kSign[1]);
    const __m512 s2 = _mm512_load_ps(kSign[2]), s3 = _mm512_load_ps(kSign[3]);
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        float* w = ws + m * Kp * 4;
        if (tables) {
            const int64_t full = K / 4;  // quads entirely inside K
            for (int64_t c = 0; c < full; ++c) {
                const float* xs = xr + 4 * c;
                __m512 t = _mm512_mul_ps(_mm512_set1_ps(xs[0]), s0);
                t = _mm512_fmadd_ps(_mm512_set1_ps(xs[1]), s1, t);
                t = _mm512_fmadd_ps(_mm512_set1_ps(xs[2]), s2, t);
                t = _mm512_fmadd_ps(_mm512_set1_ps(xs[3]), s3, t);
                _mm512_storeu_ps(w + 16 * c, t);
            }
            for (int64_t c = full; c < Kp / 4; ++c) {
                float xs[4];
                for (int j = 0; j < 4; ++j) xs[j] = 4 * c + j < K ? xr[4 * c + j] : 0.f;
                table4_scalar(xs, w + 16 * c);
            }
        }
        w = sums + m * NG;
        for (int64_t g = 0; g < NG; ++g) {
            const int64_t end = (g + 1) * G < K ? (g + 1) * G : K;
            __m512 s = _mm512_setzero_ps();
            for (int64_t k = g * G; k < end; k += 16) {
                const int64_t n = end - k;
                const __mmask16 mk = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
                s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mk, xr + k));
            }
            w[g] = _mm512_reduce_add_ps(s);
        }
    }
    if (tables) prepare_t8_avx512(ws, M, Kp, NG, G);
}

// Uniform weights: sh = s/2 (= alpha_0), off = mu + s (2^Q - 1)/2 and mu of group g for the 16
// rows of block b (the halves by vcvtph2ps).
template <int Q>
SHIFTC_TARGET_AVX512 inline void uniform_header_avx512(const Problem& p, int64_t b, int64_t g, __m512& sh, __m512& off,
                                                       __m512& mu) {
    const uint16_t* u = p.su + (b * p.NG + g) * 32;
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)u));
    mu = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(u + 16)));
    sh = _mm512_mul_ps(s, _mm512_set1_ps(0.5f));
    off = _mm512_fmadd_ps(s, _mm512_set1_ps(float((1 << Q) - 1) * 0.5f), mu);
}

// group_header_scalar for the 16 rows of block b (one register): a[i] = alpha_i, off = the +-1
// offset, base = the value of the all-zero code (mu - sum_i alpha_i, or the uniform mu); a set
// bit i adds 2 alpha_i to base.
template <int Q>
SHIFTC_TARGET_AVX512 inline void group_header_avx512(const Problem& p, int64_t b, int64_t g, __m512* a, __m512& off,
                                                     __m512& base) {
    if (p.su) {
        uniform_header_avx512<Q>(p, b, g, a[0], off, base);
        for (int i = 1; i < Q; ++i) a[i] = _mm512_add_ps(a[i - 1], a[i - 1]);
        return;
    }
    const float* s = p.scales + (b * p.NG + g) * Q * 16;
    off = p.offsets ? _mm512_loadu_ps(p.offsets + (b * p.NG + g) * 16) : _mm512_setzero_ps();
    base = off;
    for (int i = 0; i < Q; ++i) {
        a[i] = _mm512_loadu_ps(s + i * 16);
        base = _mm512_sub_ps(base, a[i]);
    }
}

// Rows of X sharing one pass over the codes in the AVX-512 GEMV: the accumulators (2 blocks x Q
// planes x MC rows) and the running totals must fit the 32 vector registers.
constexpr int lut_mc_avx512(int q) { return q <= 2 ? 4 : q == 3 ? 3 : 2; }

// GEMV, NBLK row blocks (16 rows each, b0 and b0 + 1) x MC rows of X starting at m0. The code
// bytes of one plane and octet, zero-extended to 32-bit lanes, index the low-nibble table directly
// (permutexvar reads only the low 4 bits of each lane) and the high-nibble table after a shift by
// 4. Both blocks of a task share each table load.
// y[m0 + mc][16 (b0 + nb) ...] = tot[nb][mc], the rows past N left alone.
template <int NBLK, int MC>
SHIFTC_TARGET_AVX512 inline void store_rows_avx512(const Problem& p, int64_t b0, int64_t m0, const __m512 (&tot)[NBLK][MC]) {
    for (int nb = 0; nb < NBLK; ++nb) {
        const int64_t n0 = (b0 + nb) * kBlock;
        const int64_t valid = p.N - n0;
        const __mmask16 mk = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
        for (int mc = 0; mc < MC; ++mc) _mm512_mask_storeu_ps(p.y + (m0 + mc) * p.N + n0, mk, tot[nb][mc]);
    }
}

template <int Q, int NBLK, int MC>
SHIFTC_TARGET_AVX512 void lut_rows_avx512(const Problem& p, int64_t b0, int64_t m0) {
    // One block, one plane, one row: a single accumulator chain would bound the loop; use two.
    constexpr int U = (Q * MC * NBLK == 1) ? 2 : 1;
    const bool has_off = p.has_offset();
    const int64_t bstride = p.octs * Q * 16;
    const uint8_t* cb = p.codes + b0 * bstride;
    const float* T[MC];
    for (int mc = 0; mc < MC; ++mc) T[mc] = p.tables + (m0 + mc) * p.Kp * 4;
    __m512 tot[NBLK][MC];
    for (int nb = 0; nb < NBLK; ++nb)
        for (int mc = 0; mc < MC; ++mc) tot[nb][mc] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.NG; ++g) {
        int64_t o0, o1;
        for (int nb = 0; nb < NBLK; ++nb) {  // scales of a later group (see kPrefetchBytes)
            if (p.su) {
                _mm_prefetch((const char*)(p.su + ((b0 + nb) * p.NG + g + kPrefetchGroups) * 32), _MM_HINT_T0);
                continue;
            }
            for (int i = 0; i < Q; ++i) {
                _mm_prefetch((const char*)(p.scales + ((b0 + nb) * p.NG + g + kPrefetchGroups) * Q * 16 + i * 16),
                             _MM_HINT_T0);
            }
        }
        group_octets(p, g, &o0, &o1);
        __m512 part[U][NBLK][Q][MC];
        for (int u = 0; u < U; ++u)
            for (int nb = 0; nb < NBLK; ++nb)
                for (int i = 0; i < Q; ++i)
                    for (int mc = 0; mc < MC; ++mc) part[u][nb][i][mc] = _mm512_setzero_ps();
        for (int64_t o = o0; o < o1; o += U) {
            for (int u = 0; u < U && o + u < o1; ++u) {
                const int64_t oc = o + u;
                __m512 tlo[MC], thi[MC];
                for (int mc = 0; mc < MC; ++mc) {
                    tlo[mc] = _mm512_loadu_ps(T[mc] + 32 * oc);
                    thi[mc] = _mm512_loadu_ps(T[mc] + 32 * oc + 16);
                }
                for (int nb = 0; nb < NBLK; ++nb)
                    _mm_prefetch((const char*)(cb + nb * bstride + oc * Q * 16 + kPrefetchBytes), _MM_HINT_T0);
                for (int nb = 0; nb < NBLK; ++nb) {
                    for (int i = 0; i < Q; ++i) {
                        const __m512i lo = _mm512_cvtepu8_epi32(
                            _mm_loadu_si128((const __m128i*)(cb + nb * bstride + (oc * Q + i) * 16)));
                        const __m512i hi = _mm512_srli_epi32(lo, 4);
                        for (int mc = 0; mc < MC; ++mc) {
                            const __m512 v = _mm512_add_ps(_mm512_permutexvar_ps(lo, tlo[mc]),
                                                           _mm512_permutexvar_ps(hi, thi[mc]));
                            part[u][nb][i][mc] = _mm512_add_ps(part[u][nb][i][mc], v);
                        }
                    }
                }
            }
        }
        for (int nb = 0; nb < NBLK; ++nb) {
            if (p.su) {
                // one scale for every plane (alpha_i = 2^i s/2): sum_i 2^i part_i first (Horner, the
                // doublings exact), then one FMA by s/2 - no per-plane scale vectors to derive
                __m512 sh, off, mu;
                uniform_header_avx512<Q>(p, b0 + nb, g, sh, off, mu);
                for (int mc = 0; mc < MC; ++mc) {
                    __m512 v = part[0][nb][Q - 1][mc];
                    if (U == 2) v = _mm512_add_ps(v, part[U - 1][nb][Q - 1][mc]);
                    for (int i = Q - 2; i >= 0; --i) v = _mm512_fmadd_ps(v, _mm512_set1_ps(2.f), part[0][nb][i][mc]);
                    tot[nb][mc] = _mm512_fmadd_ps(v, sh, tot[nb][mc]);
                    tot[nb][mc] = _mm512_fmadd_ps(off, _mm512_set1_ps(p.gsums[(m0 + mc) * p.NG + g]), tot[nb][mc]);
                }
                continue;
            }
            __m512 a[Q], off, base;
            group_header_avx512<Q>(p, b0 + nb, g, a, off, base);
            for (int i = 0; i < Q; ++i) {
                for (int mc = 0; mc < MC; ++mc) {
                    __m512 v = part[0][nb][i][mc];
                    if (U == 2) v = _mm512_add_ps(v, part[U - 1][nb][i][mc]);
                    tot[nb][mc] = _mm512_fmadd_ps(v, a[i], tot[nb][mc]);
                }
            }
            if (has_off) {
                for (int mc = 0; mc < MC; ++mc) {
                    tot[nb][mc] = _mm512_fmadd_ps(off, _mm512_set1_ps(p.gsums[(m0 + mc) * p.NG + g]), tot[nb][mc]);
                }
            }
        }
    }
    store_rows_avx512<NBLK, MC>(p, b0, m0, tot);
}

using LutRowsAvx512 = void (*)(const Problem&, int64_t, int64_t);
// kLutAvx512<Q, NBLK>[MC - 1]; MC above lut_mc_avx512(Q) is never called (nullptr).
template <int Q, int NBLK, int MC>
constexpr LutRowsAvx512 lut_fn_avx512() {
    if constexpr (MC <= lut_mc_avx512(Q)) {
        return lut_rows_avx512<Q, NBLK, MC>;
    } else {
        return nullptr;
    }
}
template <int Q, int NBLK>
constexpr LutRowsAvx512 kLutAvx512[4] = {lut_fn_avx512<Q, NBLK, 1>(), lut_fn_avx512<Q, NBLK, 2>(),
                                         lut_fn_avx512<Q, NBLK, 3>(), lut_fn_avx512<Q, NBLK, 4>()};

// Task t of an AVX-512 GEMV: row blocks 2t and 2t + 1 (one at the end), X's rows in passes of at
// most mc_max; one[mc - 1] / two[mc - 1] run a pass of mc rows over one / both blocks.
void gemv_task_avx512(const Problem& p, int64_t t, int mc_max, const LutRowsAvx512* one, const LutRowsAvx512* two) {
    const RowSplit rs(p.M, mc_max);
    const bool both = 2 * t + 1 < p.NB;
    for (int64_t i = 0; i < rs.nblk; ++i) (both ? two : one)[rs.size(i) - 1](p, 2 * t, rs.start(i));
}

void lut_task_avx512(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) {
        constexpr int q = decltype(Q)::value;
        gemv_task_avx512(p, t, lut_mc_avx512(q), kLutAvx512<q, 1>, kLutAvx512<q, 2>);
    });
}

// ---- GEMV on int8 tables (uniform weights) ------------------------------------------------
// The float GEMV above spends one 16-lane permute per 16 rows and 4 columns; here one byte shuffle
// (vpshufb, 16 entries per 128-bit lane) does 64 lookups. A group's codes of one block are a
// contiguous run of (o1 - o0) Q chunks of 16 bytes (octet-major, then plane); a 64-byte load takes
// 4 chunks, lane L holding chunk 4u + L: plane (4u + L) % Q of octet (4u + L) / Q. The table
// register gives each lane its octet's table (an in-register shuffle of 4 consecutive octets'
// tables), so a lookup is one vpshufb per nibble. Entries are biased to 1..255: the sums of the
// lookups are kept as 16-bit words S (mod 2^16) beside the sums of their high bytes H, so that the
// even rows' sums are S - 256 H and the odd rows' H, exact while the weighted sum of a group's
// lookups stays below 2^16 (t8_fits). Per group: the planes weighted by 2^i (a per-lane shift),
// the lanes summed, the bias removed, then as the float kernel: y += (v * scale) s/2 + off gsum.
// The tables round x to 8 bits per group: a relative error of about 2^-9 per lookup, like the
// 8-bit activations of other CPU runtimes' low-bit kernels.

// Load positions with distinct lane -> plane maps: 3 for Q = 3 (4u mod 3 cycles), else 1.
constexpr int t8_sets(int q) { return q == 3 ? 3 : 1; }
// Rows of X per pass over the codes (accumulators: 2 blocks x sets x MC x 2 must leave room).
constexpr int lut8_mc(int q) { return q == 3 ? 1 : 3; }

// Lane L of load u (u % sets = r) reads the table of octet ob + rel(L), ob = o0 + 4u / Q: the
// vshufi32x4 immediate selecting those lanes from a register of octets ob..ob+3.
template <int Q>
constexpr int t8_select(int r) {
    int imm = 0;
    for (int L = 0; L < 4; ++L) imm |= (((4 * r + L) / Q - (4 * r) / Q) << (2 * L));
    return imm;
}
// ... and the plane of lane L, as a 16-bit shift count in every word of the lane.
template <int Q>
SHIFTC_TARGET_AVX512 inline __m512i t8_plane_shift(int r) {
    return _mm512_set_epi64((4 * r + 3) % Q * 0x0001000100010001LL, (4 * r + 3) % Q * 0x0001000100010001LL,
                            (4 * r + 2) % Q * 0x0001000100010001LL, (4 * r + 2) % Q * 0x0001000100010001LL,
                            (4 * r + 1) % Q * 0x0001000100010001LL, (4 * r + 1) % Q * 0x0001000100010001LL,
                            (4 * r) % Q * 0x0001000100010001LL, (4 * r) % Q * 0x0001000100010001LL);
}

template <int Q, int R>
SHIFTC_TARGET_AVX512 inline __m512i t8_table(const uint8_t* t, int64_t ob) {
    if constexpr (Q == 4) {
        return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(t + ob * 16)));
    } else {
        const __m512i v = _mm512_loadu_si512((const void*)(t + ob * 16));
        if constexpr (Q == 1) return v;
        else return _mm512_shuffle_i32x4(v, v, t8_select<Q>(R));
    }
}

template <int Q, int NBLK, int MC>
SHIFTC_TARGET_AVX512 void lut8_rows_avx512(const Problem& p, int64_t b0, int64_t m0) {
    constexpr int R = t8_sets(Q);
    const int64_t bstride = p.octs * Q * 16;
    const int64_t half = t8_half_bytes(p.Kp);
    const uint8_t* cb = p.codes + b0 * bstride;
    const uint8_t* TL[MC];
    for (int mc = 0; mc < MC; ++mc) TL[mc] = p.t8 + (m0 + mc) * 2 * half;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    __m512 tot[NBLK][MC];
    for (int nb = 0; nb < NBLK; ++nb)
        for (int mc = 0; mc < MC; ++mc) tot[nb][mc] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.NG; ++g) {
        for (int nb = 0; nb < NBLK; ++nb)
            _mm_prefetch((const char*)(p.su + ((b0 + nb) * p.NG + g + kPrefetchGroups) * 32), _MM_HINT_T0);
        int64_t o0, o1;
        group_octets(p, g, &o0, &o1);
        const int64_t chunks = (o1 - o0) * Q, loads = ceil_div(chunks, 4);
        __m512i S[NBLK][MC][R], H[NBLK][MC][R];
        for (int nb = 0; nb < NBLK; ++nb)
            for (int mc = 0; mc < MC; ++mc)
                for (int r = 0; r < R; ++r) S[nb][mc][r] = H[nb][mc][r] = _mm512_setzero_si512();
        auto step = [&](auto rc, int64_t u) SHIFTC_TARGET_AVX512 {
            constexpr int r = decltype(rc)::value;
            const int64_t ob = o0 + (4 * u) / Q;
            const int64_t left = chunks - 4 * u;  // 1..3 on a partial last load
            const __mmask64 mk = left >= 4 ? ~__mmask64{0} : (__mmask64{1} << (16 * left)) - 1;
            __m512i tl[MC], th[MC];
            for (int mc = 0; mc < MC; ++mc) {
                tl[mc] = t8_table<Q, r>(TL[mc], ob);
                th[mc] = t8_table<Q, r>(TL[mc] + half, ob);
            }
            for (int nb = 0; nb < NBLK; ++nb) {
                const uint8_t* c = cb + nb * bstride + (o0 * Q + 4 * u) * 16;
                _mm_prefetch((const char*)(c + kPrefetchBytesL2), _MM_HINT_T1);
                const __m512i code = left >= 4 ? _mm512_loadu_si512((const void*)c) : _mm512_maskz_loadu_epi8(mk, c);
                const __m512i lo = _mm512_and_si512(code, nib);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(code, 4), nib);
                for (int mc = 0; mc < MC; ++mc) {
                    const __m512i a = _mm512_maskz_shuffle_epi8(mk, tl[mc], lo);
                    const __m512i b = _mm512_maskz_shuffle_epi8(mk, th[mc], hi);
                    S[nb][mc][r] = _mm512_add_epi16(S[nb][mc][r], _mm512_add_epi16(a, b));
                    H[nb][mc][r] = _mm512_add_epi16(H[nb][mc][r], _mm512_add_epi16(_mm512_srli_epi16(a, 8),
                                                                                      _mm512_srli_epi16(b, 8)));
                }
            }
        };
        for (int64_t u = 0; u < loads; u += R) {
            step(std::integral_constant<int, 0>{}, u);
            if constexpr (R == 3) {
                if (u + 1 < loads) step(std::integral_constant<int, 1>{}, u + 1);
                if (u + 2 < loads) step(std::integral_constant<int, 2>{}, u + 2);
            }
        }
        // 256 (o1 - o0) (2^Q - 1): the bias of the weighted sum of a row's lookups
        const __m512 bias = _mm512_set1_ps(float(256 * (o1 - o0) * ((1 << Q) - 1)));
        for (int nb = 0; nb < NBLK; ++nb) {
            __m512 sh, off, mu;
            uniform_header_avx512<Q>(p, b0 + nb, g, sh, off, mu);
            for (int mc = 0; mc < MC; ++mc) {
                __m512i s = S[nb][mc][0], h = H[nb][mc][0];
                if constexpr (Q > 1) {
                    s = _mm512_sllv_epi16(s, t8_plane_shift<Q>(0));
                    h = _mm512_sllv_epi16(h, t8_plane_shift<Q>(0));
                }
                for (int r = 1; r < R; ++r) {
                    s = _mm512_add_epi16(s, _mm512_sllv_epi16(S[nb][mc][r], t8_plane_shift<Q>(r)));
                    h = _mm512_add_epi16(h, _mm512_sllv_epi16(H[nb][mc][r], t8_plane_shift<Q>(r)));
                }
                // the 4 lanes summed (every lane then holds the total)
                s = _mm512_add_epi16(s, _mm512_shuffle_i32x4(s, s, 0x4E));
                h = _mm512_add_epi16(h, _mm512_shuffle_i32x4(h, h, 0x4E));
                s = _mm512_add_epi16(s, _mm512_shuffle_i32x4(s, s, 0xB1));
                h = _mm512_add_epi16(h, _mm512_shuffle_i32x4(h, h, 0xB1));
                const __m512i e = _mm512_sub_epi16(s, _mm512_slli_epi16(h, 8));  // even rows
                // rows 0..7 (words E0 H0 E1 H1 ...) in lane 0, rows 8..15 in lane 1
                const __m512i rows = _mm512_mask_blend_epi64(0x0C, _mm512_unpacklo_epi16(e, h),
                                                             _mm512_unpackhi_epi16(e, h));
                const __m512 v = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(rows))),
                                               bias);
                const float sc = p.t8s[(m0 + mc) * p.NG + g];
                tot[nb][mc] = _mm512_fmadd_ps(v, _mm512_mul_ps(sh, _mm512_set1_ps(sc)), tot[nb][mc]);
                tot[nb][mc] = _mm512_fmadd_ps(off, _mm512_set1_ps(p.gsums[(m0 + mc) * p.NG + g]), tot[nb][mc]);
            }
        }
    }
    store_rows_avx512<NBLK, MC>(p, b0, m0, tot);
}

template <int Q, int NBLK>
constexpr LutRowsAvx512 kLut8Avx512[3] = {
    lut8_rows_avx512<Q, NBLK, 1>,
    Q == 3 ? nullptr : lut8_rows_avx512<Q, NBLK, (Q == 3 ? 1 : 2)>,
    Q == 3 ? nullptr : lut8_rows_avx512<Q, NBLK, (Q == 3 ? 1 : 3)>};

void lut8_task_avx512(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) {
        constexpr int q = decltype(Q)::value;
        gemv_task_avx512(p, t, lut8_mc(q), kLut8Avx512<q, 1>, kLut8Avx512<q, 2>);
    });
}

// GEMM expansion, 16 rows per register: bit j of the 16 code bytes of a plane is a 16-bit lane
// mask (vptestmb), which adds 2 alpha to the lanes that have it.
template <int Q>
SHIFTC_TARGET_AVX512 void expand_avx512(const Problem& p, int64_t b0, int nv, int64_t k0, int64_t kc,
                                        float* panel) {
    const int64_t o0 = k0 / 8, o1 = ceil_div(k0 + kc, 8);
    const int64_t width = 16 * nv;
    for (int bb = 0; bb < nv; ++bb) {
        const uint8_t* cb = p.codes + (b0 + bb) * p.octs * Q * 16;
        int64_t gnext = o0;
        __m512 base = _mm512_setzero_ps(), a2[Q];
        for (int i = 0; i < Q; ++i) a2[i] = _mm512_setzero_ps();
        for (int64_t o = o0; o < o1; ++o) {
            if (o == gnext) {  // first octet of a group (one division per group, not per octet)
                const int64_t g = o * 8 / p.G;
                gnext = (g + 1) * p.G / 8;
                __m512 a[Q], off;
                group_header_avx512<Q>(p, b0 + bb, g, a, off, base);
                for (int i = 0; i < Q; ++i) a2[i] = _mm512_add_ps(a[i], a[i]);
            }
            __m128i c[Q];
            for (int i = 0; i < Q; ++i) c[i] = _mm_loadu_si128((const __m128i*)(cb + (o * Q + i) * 16));
            float* dst = panel + (o - o0) * 8 * width + bb * 16;
            for (int j = 0; j < 8; ++j) {
                const __m128i bit = _mm_set1_epi8((char)(1 << j));
                __m512 w = base;
                for (int i = 0; i < Q; ++i) w = _mm512_mask_add_ps(w, _mm_test_epi8_mask(c[i], bit), w, a2[i]);
                _mm512_store_ps(dst + j * width, w);
            }
        }
    }
}

// C[MR rows of Y, 16 NV columns] (+)= X[MR, kc] . panel[kc, 16 NV]; columns masked by m0, m1.
// With few rows, KU sets of accumulators (k, k+1, ...) keep enough FMA chains in flight to hide
// the FMA latency.
template <int MR, int NV>
SHIFTC_TARGET_AVX512 void mk_avx512(const float* x, int64_t ldx, const float* w, int64_t kc, float* y,
                                    int64_t ldy, bool accumulate, __mmask16 m0, __mmask16 m1) {
    constexpr int KU = MR * NV >= 8 ? 1 : MR * NV >= 4 ? 2 : 4;
    __m512 c[KU][MR][NV];
    for (int u = 0; u < KU; ++u)
        for (int r = 0; r < MR; ++r)
            for (int v = 0; v < NV; ++v) c[u][r][v] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + KU <= kc; k += KU) {
        for (int u = 0; u < KU; ++u) {
            __m512 b[NV];
            for (int v = 0; v < NV; ++v) b[v] = _mm512_load_ps(w + (k + u) * 16 * NV + 16 * v);
            for (int r = 0; r < MR; ++r) {
                const __m512 a = _mm512_set1_ps(x[r * ldx + k + u]);
                for (int v = 0; v < NV; ++v) c[u][r][v] = _mm512_fmadd_ps(a, b[v], c[u][r][v]);
            }
        }
    }
    for (; k < kc; ++k) {
        __m512 b[NV];
        for (int v = 0; v < NV; ++v) b[v] = _mm512_load_ps(w + k * 16 * NV + 16 * v);
        for (int r = 0; r < MR; ++r) {
            const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
            for (int v = 0; v < NV; ++v) c[0][r][v] = _mm512_fmadd_ps(a, b[v], c[0][r][v]);
        }
    }
    for (int u = 1; u < KU; ++u)
        for (int r = 0; r < MR; ++r)
            for (int v = 0; v < NV; ++v) c[0][r][v] = _mm512_add_ps(c[0][r][v], c[u][r][v]);
    for (int r = 0; r < MR; ++r) {
        for (int v = 0; v < NV; ++v) {
            float* yr = y + r * ldy + 16 * v;
            const __mmask16 mk = v == 0 ? m0 : m1;
            __m512 acc = c[0][r][v];
            if (accumulate) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mk, yr));
            _mm512_mask_storeu_ps(yr, mk, acc);
        }
    }
}

constexpr int kMrAvx512 = 14;
using MkAvx512 = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool, __mmask16,
                          __mmask16);
template <int NV>
constexpr MkAvx512 kMkAvx512Nv[kMrAvx512] = {
    mk_avx512<1, NV>,  mk_avx512<2, NV>,  mk_avx512<3, NV>,  mk_avx512<4, NV>,  mk_avx512<5, NV>,
    mk_avx512<6, NV>,  mk_avx512<7, NV>,  mk_avx512<8, NV>,  mk_avx512<9, NV>,  mk_avx512<10, NV>,
    mk_avx512<11, NV>, mk_avx512<12, NV>, mk_avx512<13, NV>, mk_avx512<14, NV>};
constexpr const MkAvx512* kMkAvx512[2] = {kMkAvx512Nv<1>, kMkAvx512Nv<2>};

template <int Q>
SHIFTC_TARGET_AVX512 void gemm_task_avx512_q(const Problem& p, int64_t t) {
    const int64_t b0 = 2 * t;
    const int nv = b0 + 1 < p.NB ? 2 : 1;
    const int64_t n0 = t * kTaskRows;
    const int64_t ncols = p.N - n0 < 16 * nv ? p.N - n0 : 16 * nv;
    const __mmask16 m0 = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
    const __mmask16 m1 = ncols >= 32 ? (__mmask16)0xFFFF : ncols <= 16 ? (__mmask16)0 : (__mmask16)((1u << (ncols - 16)) - 1);
    alignas(64) float panel[kKc * kTaskRows];
    const RowSplit rs(p.M, kMrAvx512);
    const MkAvx512* mk = kMkAvx512[nv - 1];
    const int64_t ks = k_slice(p.M);
    const int64_t nsl = ceil_div(p.K, ks);
    for (int64_t sl = 0; sl < nsl; ++sl) {
        const int64_t k0 = slice_start(t, sl, nsl, ks);
        const int64_t kc = p.K - k0 < ks ? p.K - k0 : ks;
        expand_avx512<Q>(p, b0, nv, k0, kc, panel);
        for (int64_t i = 0; i < rs.nblk; ++i) {
            const int64_t mr0 = rs.start(i);
            mk[rs.size(i) - 1](p.x + mr0 * p.K + k0, p.K, panel, kc, p.y + mr0 * p.N + n0, p.N, sl > 0, m0, m1);
        }
    }
}

void gemm_task_avx512(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) { gemm_task_avx512_q<decltype(Q)::value>(p, t); });
}

// ===========================================================================================
// AMX-BF16 GEMM (x86-64, Sapphire Rapids and later): error-compensated bf16 products
// ===========================================================================================
//
// For M >= kAmxMinRows the GEMM path runs on the AMX tile unit (TDPBF16PS: bf16 products, exact
// in float, accumulated in float tiles). Both operands are split into bf16 parts, rounding to
// nearest even (bf16 keeps 8 significant bits, unit roundoff u = 2^-8):
//   x = x_hi + x_mid + x_lo  exactly (3 x 8 bits hold float's 24; x_mid, x_lo are the rounded
//                            remainders), converted once per thread and call (XCache below);
//                            (bf16 conversion and TDPBF16PS flush denormals, so parts below
//                            2^-126, i.e. |x| below about 2^-110, are dropped)
//   w = w_hi + w_lo + e_w,   |e_w| <= u^2 |w|  (expanded weights).
// x . w is summed per k-step of 32 columns as x_lo w_hi + x_mid w_hi + x_hi w_hi, plus
// (x_hi + x_mid + x_lo) w_lo only where some w_lo of the k-step is non-zero. With power-of-two
// scales an expanded weight usually spans few bits and is exact in bf16 (w_lo = 0); other
// weights of up to 16 significant bits (e.g. float16 scales) are exact as w_hi + w_lo. Then the
// products are exact and the error is float accumulation alone, as on the FMA path; otherwise it
// adds at most |x| |e_w| <= 2^-16 |x| |w| per product (tests/test_lut_kernels.py: RTOL_BF16X3).
//
// Per task (32 output columns = two 16-column halves h) and K-slice (as the FMA path):
//   W: the slice of the panel is expanded as in expand_avx512 and written straight to B tiles in
//      the VNNI pairing TDPBF16PS wants: tile (s, h, hi|lo) = 16 rows (column pairs 2r, 2r+1 of
//      k-step s) x 16 output columns x 2 bf16, 1 KiB contiguous; one flag per k-step says whether
//      a w_lo is non-zero.
//   X: rows in blocks of 16 (zero rows past M, zero columns past K) -> A tiles (mb, s, hi|mid|lo),
//      16 rows x 32 bf16, 1 KiB contiguous.
//   C: per pair of 16-row blocks, 4 float tiles (2 row blocks x 2 halves): 4 independent TDP
//      chains per k-step, 12 TDPs per 8 tile loads (24 per 14 where w_lo is non-zero); kept
//      across slices in a float buffer.
// Tile registers: tmm0..3 C, tmm4, tmm5 A (the two row blocks), tmm6, tmm7 B (the two halves).
// The tile configuration is loaded at the start of every task and released at its end: it is
// per thread, other code on the same thread (oneDNN, ...) may load another, and a task is
// millions of cycles against tens for LDTILECFG.
//
// The tile instructions are written as inline asm here (not GCC's amxtileintrin.h macros, which
// lack a "memory" operand, so the compiler could move the stores of the buffers past the loads).

#define SHIFTC_TARGET_AMX \
    __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#define SHIFTC_TILE_LOAD(t, base) \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"((const void*)(base)), "r"((long)64) : "memory")
#define SHIFTC_TILE_STORE(t, base) \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"((void*)(base)), "r"((long)64) : "memory")
#define SHIFTC_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
// C(tmm c) += A(tmm a) . B(tmm b)
#define SHIFTC_TDP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

constexpr int64_t kAmxMinRows = SHIFTC_BCQ_AMX_MIN_M;  // M from which the AMX path runs (measured)
constexpr int64_t kTileElems = 512;  // bf16 per 1 KiB tile
constexpr int64_t kXParts = 3;       // A tiles per row block and k-step: x_hi, x_mid, x_lo

struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

SHIFTC_TARGET_AMX void amx_load_config() {
    TileConfig cfg{};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
}

SHIFTC_TARGET_AMX void amx_release() { __asm__ volatile("tilerelease" ::: "memory"); }

// Per-thread buffers, grown as needed (64-byte aligned).
struct AmxBuffers {
    void* ptr = nullptr;
    size_t bytes = 0;
    ~AmxBuffers() { free(ptr); }
    void* get(size_t need) {
        if (need > bytes) {
            free(ptr);
            ptr = aligned_alloc(64, (need + 63) / 64 * 64);
            bytes = ptr ? need : 0;
        }
        return ptr;
    }
};
thread_local AmxBuffers t_amx;

// X converted to A tiles is the same for every task of a call, and converting it in every task
// cost more than the tile products (M = 128, K = 4096: ~2/3 of the task). So each thread keeps
// the tiles of the whole X (all Kp columns) from its first task of a call and reuses them while
// the call is the same: same x, M, K, Kp, and no shiftc_bcq_prepare since (every prepare bumps
// g_prepare_epoch; by the calling convention a new X, or new contents of the same buffer, is
// prepared before it is computed on). Above kXCacheBytes a task converts X slice by slice.
std::atomic<uint64_t> g_prepare_epoch{0};
constexpr size_t kXCacheBytes = size_t{32} << 20;
struct XCache {
    const float* x = nullptr;
    int64_t M = -1, K = -1, Kp = -1;
    uint64_t epoch = 0;
    bool valid = false;
    AmxBuffers buf;
};
thread_local XCache t_xcache;

// 16 floats (one per output column) of two consecutive K columns -> the hi and lo halves of a
// VNNI tile row: 32-bit lane n holds (bf16 of the even column, bf16 of the odd column).
SHIFTC_TARGET_AMX inline __m512i split_pair(__m512 we, __m512 wo, uint16_t* hi, uint16_t* lo, __m512i perm) {
    // cvtne2ps_pbh(a, b): words 0..15 = b, 16..31 = a; perm interleaves them (even, odd)
    const __m512i h = _mm512_permutexvar_epi16(perm, (__m512i)_mm512_cvtne2ps_pbh(wo, we));
    const __m512 he = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    const __m512 ho = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32((int)0xFFFF0000u)));
    const __m512i l = _mm512_permutexvar_epi16(
        perm, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(wo, ho), _mm512_sub_ps(we, he)));
    _mm512_store_si512((void*)hi, h);
    _mm512_store_si512((void*)lo, l);
    return l;
}

// Whether every weight a group of 16 rows can expand to (base + the 2 alpha of any subset of the
// planes, added in plane order as the expansion does) is exact in bf16 (low 16 bits zero).
template <int Q>
SHIFTC_TARGET_AMX inline bool group_exact_bf16(__m512 base, const __m512* a2) {
    __m512i bits = _mm512_setzero_si512();
    for (int c = 0; c < (1 << Q); ++c) {
        __m512 w = base;
        for (int i = 0; i < Q; ++i)
            if ((c >> i) & 1) w = _mm512_add_ps(w, a2[i]);
        bits = _mm512_or_si512(bits, _mm512_castps_si512(w));
    }
    return _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0xFFFF)) == 0;
}

// Expand columns [k0, k0 + 32 nks) of the task's two row blocks into B tiles wt[(s*2 + h)*2 + hl];
// lo_any[s] = whether any w_lo of k-step s is non-zero. A group whose weights are all exact in bf16
// (group_exact_bf16) skips the split: w_hi = w, w_lo = 0.
template <int Q>
SHIFTC_TARGET_AMX void expand_amx(const Problem& p, int64_t b0, int nv, int64_t k0, int64_t nks, uint16_t* wt,
                                  uint8_t* lo_any) {
    alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                         8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i perm = _mm512_load_si512((const void*)kInterleave);
    const int64_t o0 = k0 / 8, o1 = o0 + nks * 4;
    for (int64_t s = 0; s < nks; ++s) lo_any[s] = 0;
    for (int h = 0; h < 2; ++h) {
        if (h >= nv) {  // a lone last row block: the second half multiplies zeros
            for (int64_t s = 0; s < nks; ++s)
                for (int hl = 0; hl < 2; ++hl)
                    for (int64_t e = 0; e < kTileElems; e += 32)
                        _mm512_store_si512((void*)(wt + ((s * 2 + h) * 2 + hl) * kTileElems + e), _mm512_setzero_si512());
            continue;
        }
        const uint8_t* cb = p.codes + (b0 + h) * p.octs * Q * 16;
        int64_t gnext = o0;
        __m512 base = _mm512_setzero_ps(), a2[Q];
        for (int i = 0; i < Q; ++i) a2[i] = _mm512_setzero_ps();
        __m512i lo_or = _mm512_setzero_si512();
        bool exact = false;
        for (int64_t o = o0; o < o1; ++o) {
            if (o == gnext) {
                const int64_t g = o * 8 / p.G;
                gnext = (g + 1) * p.G / 8;
                __m512 a[Q], off;
                group_header_avx512<Q>(p, b0 + h, g, a, off, base);
                for (int i = 0; i < Q; ++i) a2[i] = _mm512_add_ps(a[i], a[i]);
                exact = group_exact_bf16<Q>(base, a2);
            }
            __m128i c[Q];
            for (int i = 0; i < Q; ++i) c[i] = _mm_loadu_si128((const __m128i*)(cb + (o * Q + i) * 16));
            const int64_t kk = (o - o0) * 8;  // column of the slice
            const int64_t s = kk / 32;
            uint16_t* hi = wt + ((s * 2 + h) * 2 + 0) * kTileElems + (kk % 32) / 2 * 32;
            uint16_t* lo = hi + kTileElems;
            for (int j = 0; j < 8; j += 2) {
                const __m128i be = _mm_set1_epi8((char)(1 << j)), bo = _mm_set1_epi8((char)(2 << j));
                __m512 we = base, wo = base;
                for (int i = 0; i < Q; ++i) {
                    we = _mm512_mask_add_ps(we, _mm_test_epi8_mask(c[i], be), we, a2[i]);
                    wo = _mm512_mask_add_ps(wo, _mm_test_epi8_mask(c[i], bo), wo, a2[i]);
                }
                if (exact) {
                    _mm512_store_si512((void*)(hi + j / 2 * 32),
                                       _mm512_permutexvar_epi16(perm, (__m512i)_mm512_cvtne2ps_pbh(wo, we)));
                    _mm512_store_si512((void*)(lo + j / 2 * 32), _mm512_setzero_si512());
                } else {
                    lo_or = _mm512_or_si512(lo_or, split_pair(we, wo, hi + j / 2 * 32, lo + j / 2 * 32, perm));
                }
            }
            if ((o - o0) % 4 == 3) {  // last octet of k-step s
                lo_any[s] |= _mm512_test_epi32_mask(lo_or, lo_or) != 0;
                lo_or = _mm512_setzero_si512();
            }
        }
    }
}

// Rows of X (all M, in 16-row blocks) x columns [k0, k0 + 32 nks) -> A tiles
// xt[(mb*nks + s)*3 + part], part 0, 1, 2 = x_hi, x_mid, x_lo.
SHIFTC_TARGET_AMX void convert_x_amx(const Problem& p, int64_t k0, int64_t nks, uint16_t* xt) {
    const int64_t nmb = ceil_div(p.M, 16);
    for (int64_t mb = 0; mb < nmb; ++mb) {
        for (int r = 0; r < 16; ++r) {
            const int64_t m = mb * 16 + r;
            const float* xr = p.x + m * p.K + k0;
            for (int64_t s = 0; s < nks; ++s) {
                uint16_t* dst = xt + (mb * nks + s) * kXParts * kTileElems + r * 32;
                for (int half = 0; half < 2; ++half) {
                    const int64_t kk = s * 32 + 16 * half;
                    const int64_t valid = m < p.M ? p.K - k0 - kk : 0;
                    __m512 v;
                    if (valid >= 16) {
                        v = _mm512_loadu_ps(xr + kk);
                    } else {
                        const __mmask16 mk = valid <= 0 ? (__mmask16)0 : (__mmask16)((1u << valid) - 1);
                        v = _mm512_maskz_loadu_ps(mk, valid <= 0 ? p.x : xr + kk);
                    }
                    for (int part = 0; part < kXParts; ++part) {  // v: the remainder, exact in float
                        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
                        _mm256_store_si256((__m256i*)(dst + part * kTileElems + 16 * half), h);
                        if (part + 1 < kXParts) {
                            v = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
                        }
                    }
                }
            }
        }
    }
}

// C tiles of row blocks mb (and mb + 1 when TWO) += X . W over nks k-steps; acc [nmb][2][16][16].
template <bool TWO>
SHIFTC_TARGET_AMX void amx_rows(const uint16_t* xa, const uint16_t* xb, const uint16_t* wt, const uint8_t* lo_any,
                                int64_t nks, float* acc_a, float* acc_b, bool first) {
    if (first) {
        SHIFTC_TILE_ZERO(0);
        SHIFTC_TILE_ZERO(1);
        if (TWO) {
            SHIFTC_TILE_ZERO(2);
            SHIFTC_TILE_ZERO(3);
        }
    } else {
        SHIFTC_TILE_LOAD(0, acc_a);
        SHIFTC_TILE_LOAD(1, acc_a + 256);
        if (TWO) {
            SHIFTC_TILE_LOAD(2, acc_b);
            SHIFTC_TILE_LOAD(3, acc_b + 256);
        }
    }
#define SHIFTC_TDP4()           \
    SHIFTC_TDP(0, 4, 6);        \
    SHIFTC_TDP(1, 4, 7);        \
    if (TWO) {                  \
        SHIFTC_TDP(2, 5, 6);    \
        SHIFTC_TDP(3, 5, 7);    \
    }
    for (int64_t s = 0; s < nks; ++s) {
        const uint16_t* a0 = xa + s * kXParts * kTileElems;  // x_hi; x_mid, x_lo follow
        const uint16_t* a1 = xb + s * kXParts * kTileElems;
        const uint16_t* w0 = wt + (s * 2 + 0) * 2 * kTileElems;  // w_hi; w_lo follows
        const uint16_t* w1 = wt + (s * 2 + 1) * 2 * kTileElems;
        // x_lo . w_hi, x_mid . w_hi, x_hi . w_hi (small terms first)
        SHIFTC_TILE_LOAD(6, w0);
        SHIFTC_TILE_LOAD(7, w1);
        SHIFTC_TILE_LOAD(4, a0 + 2 * kTileElems);
        if (TWO) SHIFTC_TILE_LOAD(5, a1 + 2 * kTileElems);
        SHIFTC_TDP4();
        SHIFTC_TILE_LOAD(4, a0 + kTileElems);
        if (TWO) SHIFTC_TILE_LOAD(5, a1 + kTileElems);
        SHIFTC_TDP4();
        SHIFTC_TILE_LOAD(4, a0);
        if (TWO) SHIFTC_TILE_LOAD(5, a1);
        SHIFTC_TDP4();
        if (lo_any[s]) {  // x_hi . w_lo, x_mid . w_lo, x_lo . w_lo
            SHIFTC_TILE_LOAD(6, w0 + kTileElems);
            SHIFTC_TILE_LOAD(7, w1 + kTileElems);
            SHIFTC_TDP4();
            SHIFTC_TILE_LOAD(4, a0 + kTileElems);
            if (TWO) SHIFTC_TILE_LOAD(5, a1 + kTileElems);
            SHIFTC_TDP4();
            SHIFTC_TILE_LOAD(4, a0 + 2 * kTileElems);
            if (TWO) SHIFTC_TILE_LOAD(5, a1 + 2 * kTileElems);
            SHIFTC_TDP4();
        }
    }
#undef SHIFTC_TDP4
    SHIFTC_TILE_STORE(0, acc_a);
    SHIFTC_TILE_STORE(1, acc_a + 256);
    if (TWO) {
        SHIFTC_TILE_STORE(2, acc_b);
        SHIFTC_TILE_STORE(3, acc_b + 256);
    }
}

template <int Q>
SHIFTC_TARGET_AMX void gemm_task_amx_q(const Problem& p, int64_t t) {
    const int64_t b0 = 2 * t;
    const int nv = b0 + 1 < p.NB ? 2 : 1;
    const int64_t n0 = t * kTaskRows;
    const int64_t ncols = p.N - n0 < 16 * nv ? p.N - n0 : 16 * nv;
    const __mmask16 m0 = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
    const __mmask16 m1 = ncols >= 32 ? (__mmask16)0xFFFF : ncols <= 16 ? (__mmask16)0 : (__mmask16)((1u << (ncols - 16)) - 1);
    const int64_t ks = k_slice(p.M);  // a multiple of 32
    const int64_t nsl = ceil_div(p.K, ks);
    const int64_t nmb = ceil_div(p.M, 16);
    const int64_t max_nks = ks / 32;
    // buffers: W tiles [max_nks][2][2][512] bf16, X tiles [nmb][max_nks][2][512] bf16, acc [nmb][2][256] float
    // X tiles of the whole call (cached per thread, see XCache) or of one slice
    const int64_t nks_all = p.Kp / 32;
    const size_t all_bytes = (size_t)nmb * nks_all * kXParts * kTileElems * 2;
    const bool whole = all_bytes <= kXCacheBytes;
    const uint16_t* xall = nullptr;
    if (whole) {
        XCache& c = t_xcache;
        const uint64_t epoch = g_prepare_epoch.load(std::memory_order_acquire);
        if (!(c.valid && c.x == p.x && c.M == p.M && c.K == p.K && c.Kp == p.Kp && c.epoch == epoch)) {
            c.valid = false;
            uint16_t* dst = static_cast<uint16_t*>(c.buf.get(all_bytes));
            if (!dst) {  // out of memory: the FMA path needs no buffers
                gemm_task_avx512_q<Q>(p, t);
                return;
            }
            convert_x_amx(p, 0, nks_all, dst);
            c.x = p.x;
            c.M = p.M;
            c.K = p.K;
            c.Kp = p.Kp;
            c.epoch = epoch;
            c.valid = true;
        }
        xall = static_cast<const uint16_t*>(c.buf.ptr);
    }
    // per-task buffers: W tiles [max_nks][2][2][512] bf16, slice X tiles [nmb][max_nks][3][512] bf16
    // (only without the whole-X tiles), acc [nmb][2][256] float, lo_any [max_nks]
    const size_t wt_elems = (size_t)max_nks * 4 * kTileElems;
    const size_t xt_elems = whole ? 0 : (size_t)nmb * max_nks * kXParts * kTileElems;
    char* buf = static_cast<char*>(t_amx.get((wt_elems + xt_elems) * 2 + (size_t)nmb * 512 * 4 + max_nks));
    if (!buf) {
        gemm_task_avx512_q<Q>(p, t);
        return;
    }
    uint16_t* wt = reinterpret_cast<uint16_t*>(buf);
    uint16_t* xt = wt + wt_elems;
    float* acc = reinterpret_cast<float*>(xt + xt_elems);
    uint8_t* lo_any = reinterpret_cast<uint8_t*>(acc + nmb * 512);
    amx_load_config();
    for (int64_t sl = 0; sl < nsl; ++sl) {
        const int64_t k0 = slice_start(t, sl, nsl, ks);
        const int64_t kc = p.K - k0 < ks ? p.K - k0 : ks;
        const int64_t nks = ceil_div(kc, 32);  // columns past K (up to Kp, a multiple of 32) are zero in X
        expand_amx<Q>(p, b0, nv, k0, nks, wt, lo_any);
        // A tiles of row block mb, k-step s of this slice: xs + (mb * xstride + s) * 3 * kTileElems
        const uint16_t* xs;
        int64_t xstride;
        if (whole) {
            xs = xall + k0 / 32 * kXParts * kTileElems;
            xstride = nks_all;
        } else {
            convert_x_amx(p, k0, nks, xt);
            xs = xt;
            xstride = nks;
        }
        const int64_t mbs = xstride * kXParts * kTileElems;
        int64_t mb = 0;
        for (; mb + 2 <= nmb; mb += 2) {
            amx_rows<true>(xs + mb * mbs, xs + (mb + 1) * mbs, wt, lo_any, nks, acc + mb * 512, acc + (mb + 1) * 512, sl == 0);
        }
        if (mb < nmb) amx_rows<false>(xs + mb * mbs, nullptr, wt, lo_any, nks, acc + mb * 512, nullptr, sl == 0);
    }
    amx_release();
    for (int64_t m = 0; m < p.M; ++m) {
        const float* a = acc + (m / 16) * 512 + (m % 16) * 16;
        float* yr = p.y + m * p.N + n0;
        _mm512_mask_storeu_ps(yr, m0, _mm512_load_ps(a));
        if (m1) _mm512_mask_storeu_ps(yr + 16, m1, _mm512_load_ps(a + 256));
    }
}

void gemm_task_amx(const Problem& p, int64_t t) {
    with_q(p.q, [&](auto Q) { gemm_task_amx_q<decltype(Q)::value>(p, t); });
}

// AMX-TILE, AMX-BF16 and AVX512-BF16 in CPUID, tile state enabled by the OS (XCR0 bits 17, 18),
// and, on Linux, the permission to use it (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA),
// requested once per process.
bool amx_usable() {
    static const bool ok = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
        if (!tile || !bf16 || a < 1) return false;  // a: highest subleaf of leaf 7
        if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1)) return false;  // AVX512-BF16
        if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
        unsigned lo, hi;
        __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if (((lo >> 17) & 3) != 3) return false;
#if defined(__linux__)
        constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
        unsigned long perm = 0;
        if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &perm) != 0) return false;
        return ((perm >> kXfeatureXtiledata) & 1) != 0;
#else
        return false;
#endif
    }();
    return ok;
}
#endif  // SHIFTC_LUT_X86

// ===========================================================================================
// Dispatch
// ===========================================================================================

bool isa_available(int isa) {
    if (isa == kScalar) return true;
#if SHIFTC_LUT_NEON
    if (isa == kNeon) return true;
#endif
#if SHIFTC_LUT_X86
    if (isa == kAvx2) return shiftc_cpu_avx2();
    if (isa == kAvx512) return shiftc_cpu_avx512();
    if (isa == kAmx) return isa_available(kAvx512) && amx_usable();
#endif
    return false;
}

int best_isa() {
    if (isa_available(kNeon)) return kNeon;
    if (isa_available(kAmx)) return kAmx;
    if (isa_available(kAvx512)) return kAvx512;
    if (isa_available(kAvx2)) return kAvx2;
    return kScalar;
}

std::atomic<int> g_isa{kAuto};  // kAuto until first use or shiftc_bcq_set_isa

int current_isa() {
    int isa = g_isa.load(std::memory_order_relaxed);
    if (isa == kAuto) {
        isa = best_isa();
        g_isa.store(isa, std::memory_order_relaxed);
    }
    return isa;
}

// Whether the AVX2 / AVX-512 GEMV of uniform weights runs on int8 tables (lut8_*): the default;
// shiftc_bcq_set_tables(1) or SHIFTC_LUT_TABLES=float32 in the environment keeps float tables.
std::atomic<int> g_tables{-1};  // -1: not yet read from the environment; 0: int8; 1: float32

int tables_mode() {
    int t = g_tables.load(std::memory_order_relaxed);
    if (t < 0) {
        const char* e = getenv("SHIFTC_LUT_TABLES");
        t = (e && std::string_view(e) == "float32") ? 1 : 0;
        g_tables.store(t, std::memory_order_relaxed);
    }
    return t;
}

#if SHIFTC_LUT_X86
bool use_t8(const Problem& p) { return p.su && tables_mode() == 0 && t8_fits(p.q, p.G); }
#endif

// Task t of a valid problem (either weight format) on the current ISA.
void run_task(const Problem& p, int64_t task) {
    const bool lut = p.M < SHIFTC_BCQ_LUT_MAX_M && p.M < kLutRowsBelow[p.q - 1];
    switch (current_isa()) {
#if SHIFTC_LUT_X86
        case kAmx:
            // the AMX GEMM expands float scales only; uniform weights take the AVX-512 FMA GEMM
            if (lut) use_t8(p) ? lut8_task_avx512(p, task) : lut_task_avx512(p, task);
            else if (p.M >= kAmxMinRows && !p.su) gemm_task_amx(p, task);
            else gemm_task_avx512(p, task);
            break;
        case kAvx512:
            if (!lut) gemm_task_avx512(p, task);
            else if (use_t8(p)) lut8_task_avx512(p, task);
            else lut_task_avx512(p, task);
            break;
        case kAvx2:
            if (!lut) gemm_task_avx2(p, task);
            else if (use_t8(p)) lut8_task_avx2(p, task);
            else lut_task_avx2(p, task);
            break;
#endif
#if SHIFTC_LUT_NEON
        case kNeon: lut ? lut_task_neon(p, task) : gemm_task_neon(p, task); break;
#endif
        default: lut ? lut_task_scalar(p, task) : gemm_task_scalar(p, task); break;
    }
}

}  // namespace

extern "C" {

int64_t shiftc_bcq_codes_bytes(int64_t N, int64_t K, int32_t q, int64_t G) {
    if (!valid_shape(N, K, q, G)) return -1;
    return ceil_div(N, kBlock) * (ceil_div(K, G) * G / 8) * q * 16;
}

int64_t shiftc_bcq_scales_floats(int64_t N, int64_t K, int32_t q, int64_t G) {
    if (!valid_shape(N, K, q, G)) return -1;
    return ceil_div(N, kBlock) * ceil_div(K, G) * q * 16;
}

int64_t shiftc_bcq_offsets_floats(int64_t N, int64_t K, int64_t G) {
    if (!valid_shape(N, K, 1, G)) return -1;
    return ceil_div(N, kBlock) * ceil_div(K, G) * 16;
}

int64_t shiftc_bcq_uniform_halves(int64_t N, int64_t K, int64_t G) {
    if (!valid_shape(N, K, 1, G)) return -1;
    return ceil_div(N, kBlock) * ceil_div(K, G) * 32;
}

int shiftc_bcq_pack_codes(const uint32_t* planes, int64_t N, int64_t K, int32_t q, int64_t G, uint8_t* codes) {
    if (!valid_shape(N, K, q, G) || !planes || !codes) return -1;
    const int64_t octs = ceil_div(K, G) * G / 8, NB = ceil_div(N, kBlock);
    const int64_t wpr = ceil_div(K, 32);
    for (int64_t b = 0; b < NB; ++b) {
        for (int64_t o = 0; o < octs; ++o) {
            const int64_t c0 = 8 * o;
            const int64_t valid = K - c0;  // columns of this octet inside K
            const uint32_t keep = valid >= 8 ? 0xFFu : valid <= 0 ? 0u : (1u << valid) - 1u;
            for (int i = 0; i < q; ++i) {
                uint8_t* dst = codes + ((b * octs + o) * q + i) * 16;
                for (int64_t r = 0; r < kBlock; ++r) {
                    const int64_t n = b * kBlock + r;
                    uint32_t byte = 0;
                    if (n < N && keep) byte = (planes[(i * N + n) * wpr + c0 / 32] >> (c0 % 32)) & keep;
                    dst[r] = (uint8_t)byte;
                }
            }
        }
    }
    return 0;
}

int shiftc_bcq_pack_lut16(const uint32_t* planes, const float* alpha, int64_t N, int64_t K, int32_t q,
                          int64_t G, int32_t coding, uint8_t* codes, float* scales, float* offsets) {
    if (!valid_shape(N, K, q, G) || (coding != 0 && coding != 1) || !planes || !alpha || !codes ||
        !scales || (coding == 1 && !offsets)) {
        return -1;
    }
    shiftc_bcq_pack_codes(planes, N, K, q, G, codes);
    const int64_t NG = ceil_div(K, G), NB = ceil_div(N, kBlock);
    const float half = coding == 1 ? 0.5f : 1.f;
    for (int64_t b = 0; b < NB; ++b) {
        for (int64_t g = 0; g < NG; ++g) {
            for (int64_t r = 0; r < kBlock; ++r) {
                const int64_t n = b * kBlock + r;
                float mu = 0.f;
                for (int i = 0; i < q; ++i) {
                    const float a = n < N ? alpha[(i * N + n) * NG + g] * half : 0.f;
                    scales[((b * NG + g) * q + i) * 16 + r] = a;
                    mu += a;
                }
                if (offsets) offsets[(b * NG + g) * 16 + r] = coding == 1 ? mu : 0.f;
            }
        }
    }
    return 0;
}

int shiftc_bcq_pack_uniform(const uint16_t* s, const uint16_t* mu, int64_t N, int64_t K, int64_t G, uint16_t* su) {
    if (!valid_shape(N, K, 1, G) || !s || !mu || !su) return -1;
    const int64_t NG = ceil_div(K, G), NB = ceil_div(N, kBlock);
    for (int64_t b = 0; b < NB; ++b) {
        for (int64_t g = 0; g < NG; ++g) {
            uint16_t* dst = su + (b * NG + g) * 32;
            for (int64_t r = 0; r < kBlock; ++r) {
                const int64_t n = b * kBlock + r;
                dst[r] = n < N ? s[n * NG + g] : 0;
                dst[16 + r] = n < N ? mu[n * NG + g] : 0;
            }
        }
    }
    return 0;
}

int64_t shiftc_bcq_workspace_floats(int64_t M, int64_t K, int64_t G) {
    if (M < 0 || !valid_shape(1, K, 1, G)) return -1;
    const int64_t NG = ceil_div(K, G);
    // GEMV: float tables, group sums, int8 tables (t8_floats) and their scales
    return M < SHIFTC_BCQ_LUT_MAX_M ? M * (NG * G * 4 + NG + t8_floats(NG * G) + NG) : M * NG;
}

int shiftc_bcq_prepare(const float* x, int64_t M, int64_t K, int64_t G, float* ws) {
    if (M < 0 || !valid_shape(1, K, 1, G) || (M > 0 && (!x || !ws))) return -1;
#if SHIFTC_LUT_X86
    g_prepare_epoch.fetch_add(1, std::memory_order_acq_rel);  // invalidates every thread's XCache
#endif
    const bool tables = M < SHIFTC_BCQ_LUT_MAX_M;
    switch (current_isa()) {
#if SHIFTC_LUT_X86
        case kAmx:
        case kAvx512: prepare_avx512(x, M, K, G, tables, ws); break;
        case kAvx2: prepare_avx2(x, M, K, G, tables, ws); break;
#endif
#if SHIFTC_LUT_NEON
        case kNeon: prepare_neon(x, M, K, G, tables, ws); break;
#endif
        default: prepare_scalar(x, M, K, G, tables, ws); break;
    }
    return 0;
}

int shiftc_bcq_compute(const float* x, const float* ws, int64_t M, int64_t K, int64_t N, int32_t q,
                       int64_t G, const uint8_t* codes, const float* scales, const float* offsets,
                       float* y, int64_t task) {
    if (M < 0 || !valid_shape(N, K, q, G) || task < 0 || task >= ceil_div(ceil_div(N, kBlock), 2)) return -1;
    if (M == 0) return 0;
    if (!x || !ws || !codes || !scales || !y) return -1;
    run_task(make_problem(x, ws, M, K, N, q, G, codes, scales, offsets, nullptr, y), task);
    return 0;
}

int shiftc_bcq_compute_uniform(const float* x, const float* ws, int64_t M, int64_t K, int64_t N, int32_t q,
                               int64_t G, const uint8_t* codes, const uint16_t* su, float* y, int64_t task) {
    if (M < 0 || !valid_shape(N, K, q, G) || task < 0 || task >= ceil_div(ceil_div(N, kBlock), 2)) return -1;
    if (M == 0) return 0;
    if (!x || !ws || !codes || !su || !y) return -1;
    run_task(make_problem(x, ws, M, K, N, q, G, codes, nullptr, nullptr, su, y), task);
    return 0;
}

int shiftc_bcq_set_isa(int isa) {
    if (isa == kAuto) {
        const int best = best_isa();
        g_isa.store(best, std::memory_order_relaxed);
        return best;
    }
    if (isa < kScalar || isa > kAmx || !isa_available(isa)) return -1;
    g_isa.store(isa, std::memory_order_relaxed);
    return isa;
}

int shiftc_bcq_isa(void) { return current_isa(); }

int shiftc_bcq_set_tables(int mode) {
    if (mode != 0 && mode != 1) return -1;
    g_tables.store(mode, std::memory_order_relaxed);
    return mode;
}

int shiftc_bcq_tables(void) { return tables_mode(); }

}  // extern "C"
