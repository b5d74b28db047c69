// shiftc packed bit-plane weight format (BCQ: binary-coding quantization).
//
// This is THE single definition of the packed weight layout shared by the
// Python bindings (shiftc._native), the compiler passes that emit it and the
// C++ runtime kernels that consume it. Change it only together with all three.
//
// ---------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------
// A weight matrix W of shape [rows = N out-features, cols = K in-features] is
// approximated by q binary bit-planes:
//
//     W  ~=  sum_{i < q}  alpha_i (.) s(B_i)
//
//   B_i     in {0,1}^{N x K}             (the stored bits)
//   s(b)    = 2b - 1 in {-1,+1}          for Coding::kPm1    ("pm1")
//   s(b)    = b      in { 0, 1}          for Coding::kZeroOne ("01")
//   alpha_i  [N, n_groups(K, G)]          one scale per (plane, row, group of G
//                                         consecutive columns), broadcast over
//                                         the G columns of its group.
//
// so that   y[n] = sum_i sum_g alpha[i][n][g] * sum_{c in group g} s(B_i[n,c]) * x[c].
//
// ---------------------------------------------------------------------------
// Bit layout (one plane)
// ---------------------------------------------------------------------------
//   * row-major, rows = N, each row is words_per_row(K) = ceil(K/32) uint32 words;
//   * B[r, c] lives in word  (r * words_per_row(K) + c / 32),  bit  (c % 32)
//     (bit 0 = least-significant bit). Bit value 1 means +1 in pm1 coding and
//     1 in 01 coding; bit value 0 means -1 (pm1) or 0 (01).
//   * columns are padded up to a multiple of 32 with ZERO bits. Kernels must
//     treat columns >= K as absent (activations x are NOT padded; a zero pad
//     bit would otherwise mean -1 in pm1 coding).
//   * words are stored in native (little-endian on every supported target)
//     byte order, so the byte stream equals np.packbits(bits, bitorder="little")
//     of the zero-padded row.
//   * q planes are stored plane-major: planes[i][r][w], i.e. the whole plane 0,
//     then plane 1, ... (shape [q, N, ceil(K/32)] in numpy).
//
// ---------------------------------------------------------------------------
// Scales
// ---------------------------------------------------------------------------
//   * group size G is a positive multiple of 32 (a group never splits a word);
//     n_groups(K, G) = ceil(K/G) (the last group may be partial when G does not
//     divide K).
//   * scales are stored [q][N][n_groups] (plane-major, like the bits).
//   * default storage: int8 exponents e, alpha = 2^e (power-of-two scales turn
//     the multiply into a shift / exponent add; e in [-128, 127]).
//   * optional storage: float32 alpha, for the non-power-of-two case.
//   * the reference kernels take float alpha; callers holding exponents
//     convert with exp2_scales() first.
//
// Storage cost ("effectively N bits per weight", ignoring the column padding):
//   exponent scales:  bpw = q + q*8/G      e.g. q=3, G=128 -> 3.1875 bpw
//                                               q=2, G=64  -> 2.25   bpw
//   float32 scales:   bpw = q + q*32/G     e.g. q=3, G=128 -> 3.75   bpw
// ---------------------------------------------------------------------------

#pragma once

#include <cstddef>
#include <cstdint>

namespace shiftc {

// Bits in one packed word. Everything below assumes 32.
constexpr int kWordBits = 32;

// One packed word: 32 consecutive columns (c0 .. c0+31, c0 % 32 == 0) of one
// row of one bit-plane. Column c0+j is bit j (LSB first).
using packed_word_t = uint32_t;
static_assert(sizeof(packed_word_t) * 8 == kWordBits, "packed word must be 32 bits");

// Power-of-two scale exponent: alpha = 2^e.
using scale_exp_t = int8_t;
static_assert(sizeof(scale_exp_t) == 1, "exponent scales must be 1 byte (q*8/G bpw)");

// Non-power-of-two scale.
using scale_f32_t = float;
static_assert(sizeof(scale_f32_t) == 4, "float scales must be 4 bytes (q*32/G bpw)");

// Interpretation of a stored bit.
enum class Coding : int32_t {
    kPm1 = 0,      // bit 1 -> +1, bit 0 -> -1     (python: "pm1")
    kZeroOne = 1,  // bit 1 ->  1, bit 0 ->  0     (python: "01")
};
static_assert(sizeof(Coding) == 4, "Coding is serialized as int32");

// Number of uint32 words holding one row of `cols` columns (= ceil(cols/32)).
constexpr int64_t words_per_row(int64_t cols) { return (cols + kWordBits - 1) / kWordBits; }

// Number of scale groups per row (= ceil(cols/group)).
constexpr int64_t n_groups(int64_t cols, int64_t group) { return (cols + group - 1) / group; }

// Is `group` a valid scale-group size (positive multiple of 32)?
constexpr bool valid_group(int64_t group) { return group > 0 && group % kWordBits == 0; }

// Bit (0/1) of B[r, c] in a single plane with `wpr` = words_per_row(cols).
inline uint32_t get_bit(const packed_word_t* plane, int64_t wpr, int64_t r, int64_t c) {
    return (plane[r * wpr + c / kWordBits] >> (c % kWordBits)) & 1u;
}

static_assert(words_per_row(0) == 0 && words_per_row(1) == 1 && words_per_row(32) == 1 &&
                  words_per_row(33) == 2,
              "words_per_row is ceil(cols/32)");
static_assert(n_groups(128, 64) == 2 && n_groups(129, 64) == 3, "n_groups is ceil(cols/G)");

// Non-owning view of one packed BCQ weight matrix (all arrays C-contiguous).
// Exactly one of exp_scales / f32_scales is non-null.
struct BcqMatrixView {
    const packed_word_t* planes;   // [q][rows][words_per_row(cols)], zero-padded columns
    const scale_exp_t* exp_scales; // [q][rows][n_groups(cols, group)] alpha = 2^e, or nullptr
    const scale_f32_t* f32_scales; // [q][rows][n_groups(cols, group)] alpha as float, or nullptr
    int64_t rows;                  // N, out-features
    int64_t cols;                  // K, in-features (logical, unpadded)
    int32_t q;                     // number of bit-planes (>= 1)
    int32_t group;                 // G, columns per scale, multiple of 32
    Coding coding;                 // bit interpretation
};

// Effective storage bits per weight of a BCQ matrix (excluding column padding).
constexpr double bits_per_weight(int q, int group, bool float_scales = false) {
    return q + q * (float_scales ? 32.0 : 8.0) / group;
}
static_assert(bits_per_weight(3, 128) == 3.1875, "q + q*8/G");

namespace kernels {

// Pack a row-major 0/1 byte matrix bits01[rows][cols] into
// out[rows][words_per_row(cols)] (layout above). Any non-zero byte packs as 1.
// Padding bits are written as zero. out must hold rows*words_per_row(cols) words.
void pack_bits(const uint8_t* bits01, int64_t rows, int64_t cols, uint32_t* out);

// Inverse of pack_bits: out[rows][cols] receives 0/1 bytes. Padding bits are ignored.
void unpack_bits(const uint32_t* packed, int64_t rows, int64_t cols, uint8_t* out);

// alpha[j] = 2^e[j] for j < n (exact, including the denormal e = -127, -128).
void exp2_scales(const int8_t* e, int64_t n, float* out);

// Scalar reference ("_generic") BCQ matrix-vector product.
//   x       [cols]                           activations
//   planes  [q][rows][words_per_row(cols)]   packed bits
//   scales  [q][rows][n_groups(cols, group)] float alpha
//   y       [rows]                           output (overwritten)
// y[n] = sum_i sum_g scales[i][n][g] * sum_{c in group g, c < cols} s(B_i[n,c]) * x[c]
// Accumulates in double. group must satisfy valid_group().
void bcq_gemv_ref(const float* x, const uint32_t* planes, const float* scales, int64_t q,
                  int64_t rows, int64_t cols, int64_t group, Coding coding, float* y);

// Scalar reference BCQ matrix-matrix product: Y[m] = gemv(X[m]) for m < M.
//   X [M][cols], Y [M][rows]; other arguments as bcq_gemv_ref.
void bcq_gemm_ref(const float* X, int64_t M, const uint32_t* planes, const float* scales,
                  int64_t q, int64_t rows, int64_t cols, int64_t group, Coding coding, float* Y);

}  // namespace kernels
}  // namespace shiftc
