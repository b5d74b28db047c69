// pybind11 bindings: shiftc._native
//
// Thin numpy wrappers around the kernels declared in shiftc/packed.h. Every
// argument is validated here (dtype kind, ndim, shape) and bad input raises
// ValueError naming the function and the argument; the kernels themselves
// assume valid input. The GIL is released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "shiftc/packed.h"

namespace py = pybind11;

namespace {

constexpr int kFlags = py::array::c_style | py::array::forcecast;

template <typename T>
using carray = py::array_t<T, kFlags>;

[[noreturn]] void fail(const char* fn, const std::string& msg) {
    throw py::value_error(std::string(fn) + ": " + msg);
}

std::string shape_str(const py::array& a) {
    std::ostringstream os;
    os << "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) {
        if (d) os << ", ";
        os << a.shape(d);
    }
    if (a.ndim() == 1) os << ",";
    os << ")";
    return os.str();
}

// Convert `obj` to a C-contiguous numpy array of T after checking that its
// dtype kind is one of `kinds` (numpy kind chars: b=bool, i=int, u=uint, f=float).
template <typename T>
carray<T> as_array(py::handle obj, const char* fn, const char* name, const char* kinds,
                   const char* expected) {
    py::array a = py::array::ensure(obj);
    if (!a) {
        PyErr_Clear();
        fail(fn, std::string(name) + " must be array-like (" + expected + ")");
    }
    const char kind = a.dtype().kind();
    if (std::string(kinds).find(kind) == std::string::npos) {
        fail(fn, std::string(name) + " must be " + expected + ", got dtype " +
                     std::string(py::str(a.dtype())));
    }
    carray<T> out = carray<T>::ensure(a);
    if (!out) {
        PyErr_Clear();
        fail(fn, std::string(name) + " could not be converted to " + expected);
    }
    return out;
}

void check_ndim(const py::array& a, py::ssize_t ndim, const char* fn, const char* name,
                const char* layout) {
    if (a.ndim() != ndim) {
        std::ostringstream os;
        os << name << " must be " << ndim << "-D " << layout << ", got ndim=" << a.ndim()
           << " shape " << shape_str(a);
        fail(fn, os.str());
    }
}

shiftc::Coding parse_coding(const std::string& coding, const char* fn) {
    if (coding == "pm1") return shiftc::Coding::kPm1;
    if (coding == "01") return shiftc::Coding::kZeroOne;
    fail(fn, "coding must be \"pm1\" or \"01\", got \"" + coding + "\"");
}

void check_group(int64_t group, const char* fn) {
    if (!shiftc::valid_group(group)) {
        fail(fn, "group must be a positive multiple of 32, got " + std::to_string(group));
    }
}

// Validate planes [q, N, ceil(K/32)] and scales [q, N, ceil(K/G)] for a given K.
void check_weights(const carray<uint32_t>& planes, const carray<float>& scales, int64_t K,
                   int64_t group, const char* fn) {
    check_ndim(planes, 3, fn, "planes", "uint32 [q, N, ceil(K/32)]");
    check_ndim(scales, 3, fn, "scales", "float32 [q, N, ceil(K/group)]");
    const int64_t q = planes.shape(0), N = planes.shape(1);
    if (q < 1) fail(fn, "planes must hold at least one bit-plane (q >= 1), got shape " +
                            shape_str(planes));
    const int64_t wpr = shiftc::words_per_row(K);
    if (planes.shape(2) != wpr) {
        std::ostringstream os;
        os << "planes must have shape [q, N, ceil(K/32)] = [q, N, " << wpr << "] for K=" << K
           << ", got " << shape_str(planes);
        fail(fn, os.str());
    }
    const int64_t ng = shiftc::n_groups(K, group);
    if (scales.shape(0) != q || scales.shape(1) != N || scales.shape(2) != ng) {
        std::ostringstream os;
        os << "scales must have shape [q, N, ceil(K/group)] = (" << q << ", " << N << ", " << ng
           << ") for K=" << K << ", group=" << group << ", got " << shape_str(scales);
        fail(fn, os.str());
    }
}

// ---------------------------------------------------------------------------

carray<uint32_t> py_pack_bits(py::handle bits_obj) {
    const char* fn = "pack_bits";
    auto bits = as_array<uint8_t>(bits_obj, fn, "bits", "biu", "a uint8/bool array of 0/1");
    check_ndim(bits, 2, fn, "bits", "[rows, cols]");
    const int64_t rows = bits.shape(0), cols = bits.shape(1);
    const uint8_t* src = bits.data();
    bool ok = true;
    {
        py::gil_scoped_release nogil;
        for (int64_t j = 0; j < rows * cols; ++j) ok &= (src[j] <= 1);
    }
    if (!ok) fail(fn, "bits must contain only 0 and 1 (after conversion to uint8)");
    carray<uint32_t> out({rows, shiftc::words_per_row(cols)});
    uint32_t* dst = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        shiftc::kernels::pack_bits(src, rows, cols, dst);
    }
    return out;
}

carray<uint8_t> py_unpack_bits(py::handle packed_obj, int64_t cols) {
    const char* fn = "unpack_bits";
    auto packed = as_array<uint32_t>(packed_obj, fn, "packed", "iu", "a uint32 array");
    check_ndim(packed, 2, fn, "packed", "uint32 [rows, ceil(cols/32)]");
    if (cols < 0) fail(fn, "cols must be >= 0, got " + std::to_string(cols));
    const int64_t rows = packed.shape(0), wpr = shiftc::words_per_row(cols);
    if (packed.shape(1) != wpr) {
        std::ostringstream os;
        os << "packed must have shape [rows, ceil(cols/32)] = [rows, " << wpr
           << "] for cols=" << cols << ", got " << shape_str(packed);
        fail(fn, os.str());
    }
    carray<uint8_t> out({rows, cols});
    const uint32_t* src = packed.data();
    uint8_t* dst = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        shiftc::kernels::unpack_bits(src, rows, cols, dst);
    }
    return out;
}

py::array py_exp2_scales(py::handle e_obj) {
    const char* fn = "exp2_scales";
    auto e64 = as_array<int64_t>(e_obj, fn, "e", "iu", "an int8 exponent array");
    const int64_t n = e64.size();
    const int64_t* ep = e64.data();
    for (int64_t j = 0; j < n; ++j) {
        if (ep[j] < -128 || ep[j] > 127) {
            fail(fn, "e must be in the int8 range [-128, 127], got " + std::to_string(ep[j]));
        }
    }
    auto e8 = carray<int8_t>::ensure(e64);
    std::vector<py::ssize_t> shape(e64.shape(), e64.shape() + e64.ndim());
    carray<float> out(shape);
    const int8_t* src = e8.data();
    float* dst = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        shiftc::kernels::exp2_scales(src, n, dst);
    }
    return std::move(out);
}

carray<float> py_bcq_gemv_ref(py::handle x_obj, py::handle planes_obj, py::handle scales_obj,
                              int64_t group, const std::string& coding_str) {
    const char* fn = "bcq_gemv_ref";
    auto x = as_array<float>(x_obj, fn, "x", "fiu", "a float32 array");
    auto planes = as_array<uint32_t>(planes_obj, fn, "planes", "iu", "a uint32 array");
    auto scales = as_array<float>(scales_obj, fn, "scales", "fiu", "a float32 array");
    const shiftc::Coding coding = parse_coding(coding_str, fn);
    check_group(group, fn);
    check_ndim(x, 1, fn, "x", "float32 [K]");
    const int64_t K = x.shape(0);
    check_weights(planes, scales, K, group, fn);
    const int64_t q = planes.shape(0), N = planes.shape(1);
    carray<float> y({N});
    const float* xp = x.data();
    const uint32_t* pp = planes.data();
    const float* sp = scales.data();
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release nogil;
        shiftc::kernels::bcq_gemv_ref(xp, pp, sp, q, N, K, group, coding, yp);
    }
    return y;
}

carray<float> py_bcq_gemm_ref(py::handle X_obj, py::handle planes_obj, py::handle scales_obj,
                              int64_t group, const std::string& coding_str) {
    const char* fn = "bcq_gemm_ref";
    auto X = as_array<float>(X_obj, fn, "X", "fiu", "a float32 array");
    auto planes = as_array<uint32_t>(planes_obj, fn, "planes", "iu", "a uint32 array");
    auto scales = as_array<float>(scales_obj, fn, "scales", "fiu", "a float32 array");
    const shiftc::Coding coding = parse_coding(coding_str, fn);
    check_group(group, fn);
    check_ndim(X, 2, fn, "X", "float32 [M, K]");
    const int64_t M = X.shape(0), K = X.shape(1);
    check_weights(planes, scales, K, group, fn);
    const int64_t q = planes.shape(0), N = planes.shape(1);
    carray<float> Y({M, N});
    const float* xp = X.data();
    const uint32_t* pp = planes.data();
    const float* sp = scales.data();
    float* yp = Y.mutable_data();
    {
        py::gil_scoped_release nogil;
        shiftc::kernels::bcq_gemm_ref(xp, M, pp, sp, q, N, K, group, coding, yp);
    }
    return Y;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() =
        "shiftc native kernels: packed bit-plane (BCQ) weight format helpers and scalar "
        "reference kernels. Layout: csrc/include/shiftc/packed.h.";

    m.attr("WORD_BITS") = shiftc::kWordBits;

    m.def("pack_bits", &py_pack_bits, py::arg("bits"),
          "pack_bits(bits: uint8 [rows, cols] of 0/1) -> uint32 [rows, ceil(cols/32)]\n\n"
          "Bit c%32 of word c//32 of row r holds bits[r, c]; padding bits are zero.");
    m.def("unpack_bits", &py_unpack_bits, py::arg("packed"), py::arg("cols"),
          "unpack_bits(packed: uint32 [rows, ceil(cols/32)], cols: int) -> uint8 [rows, cols]");
    m.def("exp2_scales", &py_exp2_scales, py::arg("e"),
          "exp2_scales(e: int8 array, any shape) -> float32 array of 2**e, same shape");
    m.def("bcq_gemv_ref", &py_bcq_gemv_ref, py::arg("x"), py::arg("planes"), py::arg("scales"),
          py::arg("group"), py::arg("coding") = "pm1",
          "bcq_gemv_ref(x: float32 [K], planes: uint32 [q, N, ceil(K/32)],\n"
          "             scales: float32 [q, N, ceil(K/group)], group: int, coding: 'pm1'|'01')\n"
          "    -> float32 [N]\n\n"
          "y[n] = sum_i sum_g scales[i,n,g] * sum_{c in group g} s(B_i[n,c]) * x[c],\n"
          "s(1)=+1, s(0)=-1 for 'pm1'; s(1)=1, s(0)=0 for '01'. Scalar reference.");
    m.def("bcq_gemm_ref", &py_bcq_gemm_ref, py::arg("X"), py::arg("planes"), py::arg("scales"),
          py::arg("group"), py::arg("coding") = "pm1",
          "bcq_gemm_ref(X: float32 [M, K], planes, scales, group, coding) -> float32 [M, N]\n\n"
          "Row m of the result is bcq_gemv_ref(X[m], ...).");
}
