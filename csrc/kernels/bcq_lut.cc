// shiftc BCQ run-time kernels on the lut16 layout: sizes, pack, prepare, compute, ISA dispatch.
//
// The contract (layout, math, calling convention) is in shiftc/bcq_lut.h. The loops of each
// instruction set are in bcq_lut_<isa>.inc beside this file, included below (one object). This
// file and its includes are self-contained on purpose: `shiftc compile` compiles them standalone
// into every model library that holds a BcqMatMul, for x86-64 and for aarch64, with no ISA flags. x86-64 kernels therefore
// carry their ISA in a function attribute and are chosen at run time from the CPU; on aarch64
// NEON is baseline and is the default (scalar stays selectable):
//
//   kernel           scalar (all targets)     AVX2 + FMA               AVX-512 F/BW/VL/DQ
//   table build      prepare_scalar           prepare_avx2             prepare_avx512
//   GEMV (small M)   lut_task_scalar          lut_task_avx2 (8 rows)   lut_task_avx512 (2 x 16 rows)
//   GEMV, uniform    (float tables)           lut8_block_avx2          lut8_rows_avx512
//     int8 tables                             (16 rows, vpshufb ymm)   (2 x 16 rows, vpshufb zmm)
//                    (lut_task_* pick them for uniform weights where use_t8)
//   GEMM (larger M)  gemm_task_scalar (4x16)  gemm_task_avx2 (6x16)    gemm_task_avx512 (14x32)
//                    (2x16 on x86-64)
//   GEMM, uniform                             gemm8_task_avx2 (4x16,
//     int8 X                                  vpmaddubsw; use_x8)
//   aarch64 NEON     prepare_neon, lut_task_neon (16 rows, vqtbl4q_u8), gemm_task_neon (5x16)
//   x86-64 AMX       the AVX-512 kernels, and gemm_task_amx (bf16 parts in tiles, 2 x 16 rows x 32)
//                    for M >= SHIFTC_BCQ_AMX_MIN_M
// (the GEMV path runs for M < SHIFTC_BCQ_LUT_MAX_M and M < kLutRowsBelow[q - 1], or where the
// int8 GEMM runs, M < kLutRowsBelowX8[q - 1]).
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

// The int8 tables of the x86 uniform GEMV (lut8_*), per row of X: for every octet o of the padded
// columns the 16 entries of T[2o] (low nibbles), then, after 4 spare octets, those of T[2o + 1]
// (high nibbles); entry = round(T / scale) + 128 with one scale per group (max |T| / 127). The
// spare octets let a 64-byte load start at any octet. Size in floats for Kp padded columns (the
// workspace holds them on every target):
int64_t t8_floats(int64_t Kp) { return (Kp / 8 + 4) * 32 / 4; }
#if SHIFTC_LUT_X86
int64_t t8_half_bytes(int64_t Kp) { return (Kp / 8 + 4) * 16; }
// The 4 spare octets after each table half (loaded, never used): entries of value 0.
void t8_fill_spare(uint8_t* lo, uint8_t* hi, int64_t Kp) {
    memset(lo + Kp / 8 * 16, 128, 64);
    memset(hi + Kp / 8 * 16, 128, 64);
}
// Whether a group's weighted sum of biased lookups fits 16 bits (lut8_rows_*): per row at most
// 2 (nibbles) * 255 * (G / 8) octets * (2^Q - 1).
bool t8_fits(int q, int64_t G) { return 2 * 255 * (G / 8) * ((int64_t{1} << q) - 1) < 65536; }
#endif

// The int8 GEMM's part of the workspace (shiftc_bcq_workspace_floats): X as int8 [M][Kp], its
// scales [M][NG] and outliers (prepare_x8_avx2), after the GEMV's tables, group sums, int8 tables
// and their scales (M < SHIFTC_BCQ_LUT_MAX_M) or after the group sums.
struct X8Parts {
    int8_t* x8;
    float* scales;
    int32_t* outliers;
};
X8Parts x8_parts(float* ws, int64_t M, int64_t Kp, int64_t NG) {
    float* const at = ws + (M < SHIFTC_BCQ_LUT_MAX_M ? M * (Kp * 4 + NG + t8_floats(Kp) + NG) : M * NG);
    return {reinterpret_cast<int8_t*>(at), at + M * Kp / 4, reinterpret_cast<int32_t*>(at + M * Kp / 4 + M * NG)};
}

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
    const int8_t* x8;          // int8 GEMM: X rounded per row and group, [M][Kp] (x8_prepared)
    const float* x8s;          // [M][NG] their scales (after x8)
    const int32_t* x8o;        // outlier columns [NG][kX8Out], then their values [M][NG][kX8Out / 2] (int16 pairs)
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
    const X8Parts x8 = x8_parts(const_cast<float*>(ws), M, p.Kp, p.NG);
    p.x8 = x8.x8;
    p.x8s = x8.scales;
    p.x8o = x8.outliers;
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

// The int8 GEMM (AVX2, uniform weights; gemm8_task_avx2): X is rounded to int8 per row and group
// by prepare when int8 is the mode and M can reach the GEMM path of some bit width (M >= the
// smallest table cutoff; prepare does not know the weights' format, so it also does for float
// scales: O(M K) against the GEMM's O(M K N)); compute takes it for uniform weights on the GEMM path.
// The table path's cutoffs there (uniform weights, int8 mode, ISA AVX2): the int8 GEMM is about
// twice the float GEMM, so it wins from fewer rows (measured on Zen 3, 1 thread, SmolLM2's
// 3072 x 576, 576 x 1536, 1728 x 576 and 49152 x 576; q = 2 ties from 4 to 6 rows).
constexpr int64_t kLutRowsBelowX8[kMaxQ] = {6, 5, 2, 2};
constexpr int64_t kX8MinRows = 2;  // = min(kLutRowsBelowX8)
constexpr int kX8Out = SHIFTC_BCQ_X8_OUTLIERS;  // outlier columns per group (prepare_x8_avx2)
static_assert(kX8Out >= 2 && kX8Out % 2 == 0, "the int8 GEMM applies its outliers as pairs of int16 values");
// Byte of column j (0..3) of a quad in x8 and in the int8 panel: the order (0, 2, 1, 3).
constexpr int kX8QuadPos[4] = {0, 2, 1, 3};
bool x8_prepared(int64_t M) { return tables_mode() == 0 && M >= kX8MinRows; }
#endif

#include "bcq_lut_scalar.inc"

#if SHIFTC_LUT_NEON
#include "bcq_lut_neon.inc"
#endif  // SHIFTC_LUT_NEON

#if SHIFTC_LUT_X86
#include "bcq_lut_avx2.inc"
#include "bcq_lut_avx512.inc"
#include "bcq_lut_amx.inc"
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

#if SHIFTC_LUT_X86
// (a group must fit the int8 GEMM's panel of kKc columns)
bool use_x8(const Problem& p) { return p.su && p.G <= kKc && current_isa() == kAvx2 && x8_prepared(p.M); }
#endif

// Task t of a valid problem (either weight format) on the current ISA.
void run_task(const Problem& p, int64_t task) {
#if SHIFTC_LUT_X86
    const bool x8 = use_x8(p);
    const int64_t below = x8 ? kLutRowsBelowX8[p.q - 1] : kLutRowsBelow[p.q - 1];
#else
    const int64_t below = kLutRowsBelow[p.q - 1];
#endif
    const bool lut = p.M < SHIFTC_BCQ_LUT_MAX_M && p.M < below;
    switch (current_isa()) {
#if SHIFTC_LUT_X86
        case kAmx:
            // the AMX GEMM expands float scales only; uniform weights take the AVX-512 FMA GEMM
            if (lut) lut_task_avx512(p, task);
            else if (p.M >= kAmxMinRows && !p.su) gemm_task_amx(p, task);
            else gemm_task_avx512(p, task);
            break;
        case kAvx512: lut ? lut_task_avx512(p, task) : gemm_task_avx512(p, task); break;
        case kAvx2:
            if (lut) lut_task_avx2(p, task);
            else if (x8) gemm8_task_avx2(p, task);
            else gemm_task_avx2(p, task);
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
    // GEMV: float tables, group sums, int8 tables (t8_floats) and their scales; GEMM: group sums;
    // both: X rounded to int8 (Kp bytes per row), its scales and outliers, for the int8 GEMM
    const int64_t x8 = NG * G / 4 + NG + NG * 2 * SHIFTC_BCQ_X8_OUTLIERS;
    return M < SHIFTC_BCQ_LUT_MAX_M ? M * (NG * G * 4 + NG + t8_floats(NG * G) + NG + x8) : M * (NG + x8);
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
