// Scalar ("_generic") reference BCQ kernels. Portable C++17, no intrinsics.
//
// This file is the ground truth the per-ISA kernels (bcq_avx2.cc,
// bcq_avx512.cc, bcq_neon.cc, ... placed beside it) are tested against; keep it
// simple and obviously correct rather than fast. It accumulates in double.
#include <cstdint>

#include "shiftc/packed.h"

namespace shiftc {
namespace kernels {

void bcq_gemv_ref(const float* x, const uint32_t* planes, const float* scales, int64_t q,
                  int64_t rows, int64_t cols, int64_t group, Coding coding, float* y) {
    const int64_t wpr = words_per_row(cols);
    const int64_t ng = n_groups(cols, group);
    const bool pm1 = (coding == Coding::kPm1);
    for (int64_t n = 0; n < rows; ++n) {
        double acc = 0.0;
        for (int64_t i = 0; i < q; ++i) {
            const uint32_t* row_bits = planes + (i * rows + n) * wpr;
            const float* row_scales = scales + (i * rows + n) * ng;
            for (int64_t g = 0; g < ng; ++g) {
                const int64_t c_begin = g * group;
                const int64_t c_end = (c_begin + group < cols) ? (c_begin + group) : cols;
                double part = 0.0;
                for (int64_t c = c_begin; c < c_end; ++c) {
                    const uint32_t b = (row_bits[c / kWordBits] >> (c % kWordBits)) & 1u;
                    const double xv = static_cast<double>(x[c]);
                    if (pm1) {
                        part += b ? xv : -xv;
                    } else if (b) {
                        part += xv;
                    }
                }
                acc += static_cast<double>(row_scales[g]) * part;
            }
        }
        y[n] = static_cast<float>(acc);
    }
}

void bcq_gemm_ref(const float* X, int64_t M, const uint32_t* planes, const float* scales,
                  int64_t q, int64_t rows, int64_t cols, int64_t group, Coding coding, float* Y) {
    for (int64_t m = 0; m < M; ++m) {
        bcq_gemv_ref(X + m * cols, planes, scales, q, rows, cols, group, coding, Y + m * rows);
    }
}

}  // namespace kernels
}  // namespace shiftc
