// Pack / unpack helpers for the bit-plane layout declared in shiftc/packed.h.
#include <cmath>
#include <cstdint>

#include "shiftc/packed.h"

namespace shiftc {
namespace kernels {

void pack_bits(const uint8_t* bits01, int64_t rows, int64_t cols, uint32_t* out) {
    const int64_t wpr = words_per_row(cols);
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* src = bits01 + r * cols;
        uint32_t* dst = out + r * wpr;
        for (int64_t w = 0; w < wpr; ++w) {
            const int64_t c0 = w * kWordBits;
            const int64_t n = (cols - c0 < kWordBits) ? (cols - c0) : kWordBits;
            uint32_t word = 0;  // padding bits stay zero
            for (int64_t j = 0; j < n; ++j) {
                word |= static_cast<uint32_t>(src[c0 + j] != 0) << j;
            }
            dst[w] = word;
        }
    }
}

void unpack_bits(const uint32_t* packed, int64_t rows, int64_t cols, uint8_t* out) {
    const int64_t wpr = words_per_row(cols);
    for (int64_t r = 0; r < rows; ++r) {
        const uint32_t* src = packed + r * wpr;
        uint8_t* dst = out + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
            dst[c] = static_cast<uint8_t>((src[c / kWordBits] >> (c % kWordBits)) & 1u);
        }
    }
}

void exp2_scales(const int8_t* e, int64_t n, float* out) {
    for (int64_t j = 0; j < n; ++j) {
        out[j] = std::ldexp(1.0f, static_cast<int>(e[j]));
    }
}

}  // namespace kernels
}  // namespace shiftc
