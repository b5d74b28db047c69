// pybind11 bindings: shiftc._native
//
// Thin numpy wrappers around the kernels declared in shiftc/packed.h. Every
// argument is validated here (dtype kind, ndim, shape) and bad input raises
// ValueError naming the function and the argument; the kernels themselves
// assume valid input. The GIL is released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "shiftc/attention.h"
#include "shiftc/bcq_lut.h"
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
                   int64_t group, const char* fn, const char* scales_name = "scales") {
    check_ndim(planes, 3, fn, "planes", "uint32 [q, N, ceil(K/32)]");
    check_ndim(scales, 3, fn, scales_name, "float32 [q, N, ceil(K/group)]");
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
        os << scales_name << " must have shape [q, N, ceil(K/group)] = (" << q << ", " << N << ", " << ng
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


// ---------------------------------------------------------------------------
// lut16 kernels (shiftc/bcq_lut.h)
// ---------------------------------------------------------------------------

// An exact-dtype, 1-D, C-contiguous view of `obj` (no conversion: these arrays come from
// bcq_pack_lut16, and a silent cast would hide a mix-up of arguments).
template <typename T>
carray<T> exact_1d(py::handle obj, const char* fn, const char* name, const char* expected,
                   int64_t size) {
    py::array a = py::array::ensure(obj);
    if (!a) {
        PyErr_Clear();
        fail(fn, std::string(name) + " must be a numpy array (" + expected + ")");
    }
    if (!a.dtype().is(py::dtype::of<T>())) {
        fail(fn, std::string(name) + " must be " + expected + ", got dtype " +
                     std::string(py::str(a.dtype())));
    }
    check_ndim(a, 1, fn, name, expected);
    if (a.shape(0) != size) {
        std::ostringstream os;
        os << name << " must hold " << size << " elements for these N, K, bits, group, got "
           << a.shape(0);
        fail(fn, os.str());
    }
    return carray<T>::ensure(a);
}

// shiftc_bcq_prepare on x [M, K], then every task of an N-row weight (ceil(N/32) tasks of 32
// output columns) split over up to `threads` threads: compute(x, ws, y, task) runs one task. The
// GIL is released throughout. Returns 0, or -1 when any kernel call rejected its arguments.
template <class Compute>
int run_lut16(const carray<float>& x, int64_t M, int64_t N, int64_t K, int64_t group, int64_t threads,
              carray<float>& y, Compute compute) {
    const int64_t ntasks = (N + 31) / 32;
    const int64_t nthreads = std::min<int64_t>(threads, ntasks);
    // workspace aligned to 64 bytes, as a TVM allocation is: each row's tables then start a
    // cache line, and no table load straddles two lines
    std::vector<float> ws_buf(static_cast<size_t>(shiftc_bcq_workspace_floats(M, K, group)) + 16);
    float* ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(ws_buf.data()) + 63) & ~uintptr_t{63});
    const float* xp = x.data();
    float* yp = y.mutable_data();
    int rc = 0;
    {
        py::gil_scoped_release nogil;
        rc = shiftc_bcq_prepare(xp, M, K, group, ws);
        auto run = [&](int64_t t0, int64_t t1, int* out) {
            for (int64_t t = t0; t < t1; ++t) {
                if (compute(xp, ws, yp, t) != 0) *out = -1;
            }
        };
        if (rc == 0) {
            std::vector<int> rcs(static_cast<size_t>(nthreads), 0);
            std::vector<std::thread> pool;
            for (int64_t i = 1; i < nthreads; ++i) {
                const int64_t t0 = ntasks * i / nthreads, t1 = ntasks * (i + 1) / nthreads;
                try {
                    pool.emplace_back(run, t0, t1, &rcs[i]);
                } catch (const std::system_error&) {
                    run(t0, t1, &rcs[i]);  // no thread to be had: this one does the range
                }
            }
            run(0, ntasks / nthreads, &rcs[0]);
            for (auto& th : pool) th.join();
            for (int r : rcs) rc |= r;
        }
    }
    return rc;
}

py::tuple py_bcq_pack_lut16(py::handle planes_obj, py::handle alpha_obj, int64_t K, int64_t group,
                            const std::string& coding_str) {
    const char* fn = "bcq_pack_lut16";
    auto planes = as_array<uint32_t>(planes_obj, fn, "planes", "iu", "a uint32 array");
    auto alpha = as_array<float>(alpha_obj, fn, "alpha", "fiu", "a float32 array");
    const shiftc::Coding coding = parse_coding(coding_str, fn);
    check_group(group, fn);
    if (K < 1) fail(fn, "K must be >= 1, got " + std::to_string(K));
    check_weights(planes, alpha, K, group, fn, "alpha");
    const int64_t q = planes.shape(0), N = planes.shape(1);
    if (q > 4) fail(fn, "planes must hold 1..4 bit-planes, got q=" + std::to_string(q));
    if (N < 1) fail(fn, "planes must hold at least one row (N >= 1), got shape " + shape_str(planes));
    const int32_t q32 = static_cast<int32_t>(q);
    carray<uint8_t> codes({shiftc_bcq_codes_bytes(N, K, q32, group)});
    carray<float> scales({shiftc_bcq_scales_floats(N, K, q32, group)});
    const bool zero_one = coding == shiftc::Coding::kZeroOne;
    carray<float> offsets({zero_one ? shiftc_bcq_offsets_floats(N, K, group) : int64_t{0}});
    int rc;
    {
        const uint32_t* pp = planes.data();
        const float* ap = alpha.data();
        uint8_t* cp = codes.mutable_data();
        float* sp = scales.mutable_data();
        float* op = zero_one ? offsets.mutable_data() : nullptr;
        py::gil_scoped_release nogil;
        rc = shiftc_bcq_pack_lut16(pp, ap, N, K, q32, group, static_cast<int32_t>(coding), cp, sp, op);
    }
    if (rc != 0) fail(fn, "shiftc_bcq_pack_lut16 rejected the arguments");
    return py::make_tuple(codes, scales, zero_one ? py::object(offsets) : py::object(py::none()));
}

// The checks the matmul bindings share: sizes, q (named as the binding names it), group, threads,
// and X [M, K] float32; returns X.
carray<float> lut16_x(py::handle x_obj, const char* fn, int64_t N, int64_t K, const char* q_name, int64_t q,
                      int64_t group, int64_t threads) {
    if (N < 1) fail(fn, "N must be >= 1, got " + std::to_string(N));
    if (K < 1) fail(fn, "K must be >= 1, got " + std::to_string(K));
    if (q < 1 || q > 4) fail(fn, std::string(q_name) + " must be in 1..4, got " + std::to_string(q));
    check_group(group, fn);
    if (threads < 1) fail(fn, "threads must be >= 1, got " + std::to_string(threads));
    auto x = as_array<float>(x_obj, fn, "x", "f", "a float array [M, K]");
    check_ndim(x, 2, fn, "x", "float32 [M, K]");
    if (x.shape(1) != K) {
        fail(fn, "x must have shape [M, K] = [M, " + std::to_string(K) + "], got " + shape_str(x));
    }
    return x;
}

carray<float> py_bcq_matmul_lut16(py::handle x_obj, py::handle codes_obj, py::handle scales_obj,
                                  py::handle offsets_obj, int64_t N, int64_t K, int64_t bits,
                                  int64_t group, int64_t threads) {
    const char* fn = "bcq_matmul_lut16";
    auto x = lut16_x(x_obj, fn, N, K, "bits", bits, group, threads);
    const int32_t q = static_cast<int32_t>(bits);
    auto codes = exact_1d<uint8_t>(codes_obj, fn, "codes", "uint8 [codes_bytes] from bcq_pack_lut16",
                                   shiftc_bcq_codes_bytes(N, K, q, group));
    auto scales = exact_1d<float>(scales_obj, fn, "scales", "float32 [scales] from bcq_pack_lut16",
                                  shiftc_bcq_scales_floats(N, K, q, group));
    carray<float> offsets;
    const bool has_offsets = !offsets_obj.is_none();
    if (has_offsets) {
        offsets = exact_1d<float>(offsets_obj, fn, "offsets", "float32 [offsets] from bcq_pack_lut16 or None",
                                  shiftc_bcq_offsets_floats(N, K, group));
    }
    const int64_t M = x.shape(0);
    carray<float> y({M, N});
    if (M == 0) return y;
    const float* sp = scales.data();
    const float* op = has_offsets ? offsets.data() : nullptr;
    const uint8_t* cp = codes.data();
    const int rc = run_lut16(x, M, N, K, group, threads, y, [&](const float* xp, const float* ws, float* yp, int64_t t) {
        return shiftc_bcq_compute(xp, ws, M, K, N, q, group, cp, sp, op, yp, t);
    });
    if (rc != 0) fail(fn, "the lut16 kernel rejected the arguments");
    return y;
}

// Uniform scales (shiftc/bcq_lut.h, "Uniform scales").

carray<uint8_t> py_bcq_pack_codes(py::handle planes_obj, int64_t K, int64_t group) {
    const char* fn = "bcq_pack_codes";
    auto planes = as_array<uint32_t>(planes_obj, fn, "planes", "iu", "a uint32 array");
    check_group(group, fn);
    if (K < 1) fail(fn, "K must be >= 1, got " + std::to_string(K));
    check_ndim(planes, 3, fn, "planes", "uint32 [q, N, ceil(K/32)]");
    const int64_t q = planes.shape(0), N = planes.shape(1);
    if (q < 1 || q > 4) fail(fn, "planes must hold 1..4 bit-planes, got shape " + shape_str(planes));
    if (N < 1) fail(fn, "planes must hold at least one row (N >= 1), got shape " + shape_str(planes));
    if (planes.shape(2) != shiftc::words_per_row(K)) {
        std::ostringstream os;
        os << "planes must have shape [q, N, ceil(K/32)] = [q, N, " << shiftc::words_per_row(K) << "] for K=" << K
           << ", got " << shape_str(planes);
        fail(fn, os.str());
    }
    const int32_t q32 = static_cast<int32_t>(q);
    carray<uint8_t> codes({shiftc_bcq_codes_bytes(N, K, q32, group)});
    int rc;
    {
        const uint32_t* pp = planes.data();
        uint8_t* cp = codes.mutable_data();
        py::gil_scoped_release nogil;
        rc = shiftc_bcq_pack_codes(pp, N, K, q32, group, cp);
    }
    if (rc != 0) fail(fn, "shiftc_bcq_pack_codes rejected the arguments");
    return codes;
}

// A float16 array's bit patterns as a C-contiguous uint16 array (no conversion from other dtypes:
// rounding scales to half is the caller's choice).
carray<uint16_t> halves(py::handle obj, const char* fn, const char* name) {
    py::array a = py::array::ensure(obj);
    if (!a) {
        PyErr_Clear();
        fail(fn, std::string(name) + " must be a numpy float16 array");
    }
    if (!a.dtype().is(py::dtype("float16"))) {
        fail(fn, std::string(name) + " must be float16, got dtype " + std::string(py::str(a.dtype())));
    }
    return carray<uint16_t>::ensure(a.attr("view")(py::dtype::of<uint16_t>()));
}

carray<uint16_t> py_bcq_pack_uniform(py::handle s_obj, py::handle mu_obj, int64_t K, int64_t group) {
    const char* fn = "bcq_pack_uniform";
    auto s = halves(s_obj, fn, "s");
    auto mu = halves(mu_obj, fn, "mu");
    check_group(group, fn);
    if (K < 1) fail(fn, "K must be >= 1, got " + std::to_string(K));
    check_ndim(s, 2, fn, "s", "float16 [N, ceil(K/group)]");
    const int64_t N = s.shape(0), ng = shiftc::n_groups(K, group);
    if (N < 1) fail(fn, "s must hold at least one row (N >= 1), got shape " + shape_str(s));
    if (s.shape(1) != ng) {
        std::ostringstream os;
        os << "s must have shape [N, ceil(K/group)] = [N, " << ng << "] for K=" << K << ", group=" << group
           << ", got " << shape_str(s);
        fail(fn, os.str());
    }
    if (mu.ndim() != 2 || mu.shape(0) != N || mu.shape(1) != ng) {
        fail(fn, "mu must have the shape of s " + shape_str(s) + ", got " + shape_str(mu));
    }
    carray<uint16_t> su({shiftc_bcq_uniform_halves(N, K, group)});
    int rc;
    {
        const uint16_t* sp = s.data();
        const uint16_t* mp = mu.data();
        uint16_t* up = su.mutable_data();
        py::gil_scoped_release nogil;
        rc = shiftc_bcq_pack_uniform(sp, mp, N, K, group, up);
    }
    if (rc != 0) fail(fn, "shiftc_bcq_pack_uniform rejected the arguments");
    return su;
}

carray<float> py_bcq_matmul_uniform(py::handle x_obj, py::handle codes_obj, py::handle su_obj, int64_t N,
                                    int64_t K, int64_t q, int64_t group, int64_t threads) {
    const char* fn = "bcq_matmul_uniform";
    auto x = lut16_x(x_obj, fn, N, K, "q", q, group, threads);
    const int32_t q32 = static_cast<int32_t>(q);
    auto codes = exact_1d<uint8_t>(codes_obj, fn, "codes", "uint8 [codes_bytes] from bcq_pack_codes",
                                   shiftc_bcq_codes_bytes(N, K, q32, group));
    auto su = exact_1d<uint16_t>(su_obj, fn, "su", "uint16 [uniform_halves] from bcq_pack_uniform",
                                 shiftc_bcq_uniform_halves(N, K, group));
    const int64_t M = x.shape(0);
    carray<float> y({M, N});
    if (M == 0) return y;
    const uint8_t* cp = codes.data();
    const uint16_t* up = su.data();
    const int rc = run_lut16(x, M, N, K, group, threads, y, [&](const float* xp, const float* ws, float* yp, int64_t t) {
        return shiftc_bcq_compute_uniform(xp, ws, M, K, N, q32, group, cp, up, yp, t);
    });
    if (rc != 0) fail(fn, "the lut16 kernel rejected the arguments");
    return y;
}

const char* isa_name(int isa) {
    switch (isa) {
        case 1: return "scalar";
        case 2: return "avx2";
        case 3: return "avx512";
        case 4: return "neon";
        case 5: return "amx";
        default: return "unknown";
    }
}

int parse_isa(const std::string& name, const char* fn) {
    if (name == "auto") return 0;
    if (name == "scalar") return 1;
    if (name == "avx2") return 2;
    if (name == "avx512") return 3;
    if (name == "neon") return 4;
    if (name == "amx") return 5;
    fail(fn, "name must be \"auto\", \"scalar\", \"avx2\", \"avx512\", \"amx\" or \"neon\", got \"" + name + "\"");
}

std::string py_bcq_set_isa(const std::string& name) {
    const char* fn = "bcq_set_isa";
    const int got = shiftc_bcq_set_isa(parse_isa(name, fn));
    if (got < 0) fail(fn, "ISA \"" + name + "\" is not available on this CPU / build");
    return isa_name(got);
}

std::string py_bcq_isa() { return isa_name(shiftc_bcq_isa()); }

std::string py_bcq_set_tables(const std::string& name) {
    if (name != "int8" && name != "float32") fail("bcq_set_tables", "name must be \"int8\" or \"float32\", got \"" + name + "\"");
    return shiftc_bcq_set_tables(name == "int8" ? 0 : 1) == 0 ? "int8" : "float32";
}

std::string py_bcq_tables() { return shiftc_bcq_tables() == 0 ? "int8" : "float32"; }

// -- attention over an in-place KV cache (shiftc/attention.h) ------------------------------------

// A cache [B, KVH, M, D] of float32 or float16 as (pointer, is float16), checked against `shape`.
std::pair<const void*, bool> cache_rows(const py::array& a, const char* fn, const char* name,
                                        const std::vector<py::ssize_t>& shape) {
    const bool f16 = a.dtype().kind() == 'f' && a.itemsize() == 2;
    const bool f32 = a.dtype().kind() == 'f' && a.itemsize() == 4;
    if (!(f16 || f32) || !(a.flags() & py::array::c_style))
        fail(fn, std::string(name) + " must be a C-contiguous float32 or float16 array, got dtype " +
                     std::string(py::str(a.dtype())));
    check_ndim(a, 4, fn, name, "[B, KVH, M, D]");
    for (size_t i = 0; i < shape.size(); ++i)
        if (shape[i] >= 0 && a.shape(static_cast<py::ssize_t>(i)) != shape[i])
            fail(fn, std::string(name) + " has shape " + shape_str(a) + ", which does not match q and mask");
    return {a.data(), f16};
}

carray<float> py_attention(py::handle q_obj, py::array kc, py::array vc, py::handle mask_obj, float scale) {
    const char* fn = "attention";
    auto q = as_array<float>(q_obj, fn, "q", "f", "float32 [B, KVH, G, S, D]");
    auto mask = as_array<float>(mask_obj, fn, "mask", "f", "float32 [B, S, T]");
    check_ndim(q, 5, fn, "q", "[B, KVH, G, S, D]");
    check_ndim(mask, 3, fn, "mask", "[B, S, T]");
    const int64_t B = q.shape(0), KVH = q.shape(1), G = q.shape(2), S = q.shape(3), D = q.shape(4);
    const int64_t T = mask.shape(2);
    if (mask.shape(0) != B || mask.shape(1) != S) fail(fn, "mask must be [B, S, T] for q " + shape_str(q));
    auto [k, k16] = cache_rows(kc, fn, "kc", {B, KVH, -1, D});
    auto [v, v16] = cache_rows(vc, fn, "vc", {B, KVH, kc.shape(2), D});
    if (k16 != v16) fail(fn, "kc and vc must have the same dtype");
    const int64_t M = kc.shape(2);
    carray<float> out({B, KVH, G, S, D});
    const float* qp = q.data();
    const float* mp = mask.data();
    float* op = out.mutable_data();
    int rc = 0;
    {
        py::gil_scoped_release release;
        for (int64_t t = 0; t < B * KVH * G && rc == 0; ++t)
            rc = k16 ? shiftc_attention_f16(qp, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), mp, B,
                                            KVH, G, S, T, M, D, scale, op, t)
                     : shiftc_attention(qp, static_cast<const float*>(k), static_cast<const float*>(v), mp, B, KVH, G,
                                        S, T, M, D, scale, op, t);
    }
    if (rc != 0) fail(fn, "the kernel rejected the arguments (need S <= T <= M)");
    return out;
}

py::array py_kv_write_f16(py::array cache, py::handle rows_obj, int64_t T) {
    const char* fn = "kv_write_f16";
    if (!(cache.dtype().kind() == 'f' && cache.itemsize() == 2) || !(cache.flags() & py::array::c_style) ||
        !cache.writeable())
        fail(fn, "cache must be a writeable C-contiguous float16 array [B, KVH, M, D]");
    check_ndim(cache, 4, fn, "cache", "[B, KVH, M, D]");
    auto rows = as_array<float>(rows_obj, fn, "rows", "f", "float32 [B, KVH, S, D]");
    check_ndim(rows, 4, fn, "rows", "[B, KVH, S, D]");
    const int64_t B = cache.shape(0), H = cache.shape(1), M = cache.shape(2), D = cache.shape(3);
    if (rows.shape(0) != B || rows.shape(1) != H || rows.shape(3) != D)
        fail(fn, "rows " + shape_str(rows) + " do not match cache " + shape_str(cache));
    if (shiftc_kv_write_f16(static_cast<uint16_t*>(cache.mutable_data()), rows.data(), B * H, rows.shape(2), T, M, D) != 0)
        fail(fn, "need S <= T <= M");
    return cache;
}

std::string py_attention_set_isa(const std::string& name) {
    const char* fn = "attention_set_isa";
    const int got = shiftc_attention_set_isa(parse_isa(name, fn));
    if (got < 0) fail(fn, "ISA \"" + name + "\" is not available to the attention kernel on this CPU / build");
    return isa_name(got);
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

    m.attr("BCQ_LUT_MAX_M") = SHIFTC_BCQ_LUT_MAX_M;
    m.attr("BCQ_AMX_MIN_M") = SHIFTC_BCQ_AMX_MIN_M;
    m.attr("BCQ_X8_OUTLIERS") = SHIFTC_BCQ_X8_OUTLIERS;
    m.def("bcq_pack_lut16", &py_bcq_pack_lut16, py::arg("planes"), py::arg("alpha"), py::arg("K"),
          py::arg("group"), py::arg("coding") = "pm1",
          "bcq_pack_lut16(planes: uint32 [q, N, ceil(K/32)], alpha: float32 [q, N, ceil(K/group)],\n"
          "               K: int, group: int, coding: 'pm1'|'01')\n"
          "    -> (codes: uint8 1-D, scales: float32 1-D, offsets: float32 1-D or None)\n\n"
          "Repacks ONNX-side bit planes into the lut16 layout of shiftc/bcq_lut.h. A '01' plane\n"
          "becomes a +-1 plane with alpha/2 and offsets sum_i alpha_i/2; 'pm1' has no offsets.");
    m.def("bcq_matmul_lut16", &py_bcq_matmul_lut16, py::arg("x"), py::arg("codes"), py::arg("scales"),
          py::arg("offsets"), py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("group"),
          py::arg("threads") = 1,
          "bcq_matmul_lut16(x: float32 [M, K], codes, scales, offsets, N, K, bits, group, threads=1)\n"
          "    -> float32 [M, N]\n\n"
          "Y = X W^T on the lut16 arrays of bcq_pack_lut16 (N, K, bits, group as given to it: the\n"
          "array sizes do not pin K within a group): table lookups for small M (< BCQ_LUT_MAX_M),\n"
          "expanded panels and FMA otherwise. threads > 1 splits the 32-column tasks over threads.");
    m.def("bcq_pack_codes", &py_bcq_pack_codes, py::arg("planes"), py::arg("K"), py::arg("group"),
          "bcq_pack_codes(planes: uint32 [q, N, ceil(K/32)], K: int, group: int) -> codes: uint8 1-D\n\n"
          "The codes of bcq_pack_lut16 alone (they do not depend on the scales), for the uniform format.");
    m.def("bcq_pack_uniform", &py_bcq_pack_uniform, py::arg("s"), py::arg("mu"), py::arg("K"), py::arg("group"),
          "bcq_pack_uniform(s: float16 [N, ceil(K/group)], mu: float16 [N, ceil(K/group)], K: int, group: int)\n"
          "    -> su: uint16 1-D (the halves' bit patterns)\n\n"
          "The scale array of the uniform format, W[n, k] = mu[n, g] + s[n, g] * sum_i 2**i B_i[n, k]\n"
          "(g = k // group; shiftc/bcq_lut.h): per 16-row block and group the 16 rows' s, then their mu.");
    m.def("bcq_matmul_uniform", &py_bcq_matmul_uniform, py::arg("x"), py::arg("codes"), py::arg("su"),
          py::arg("N"), py::arg("K"), py::arg("q"), py::arg("group"), py::arg("threads") = 1,
          "bcq_matmul_uniform(x: float32 [M, K], codes, su, N, K, q, group, threads=1) -> float32 [M, N]\n\n"
          "Y = X W^T for uniform weights: codes from bcq_pack_codes (q planes), su from bcq_pack_uniform;\n"
          "the paths and threads of bcq_matmul_lut16.");
    m.def("bcq_set_isa", &py_bcq_set_isa, py::arg("name"),
          "bcq_set_isa(name: 'auto'|'scalar'|'avx2'|'avx512'|'amx'|'neon') -> str: the ISA now used by\n"
          "the lut16 kernels (process-wide; 'amx' = the AVX-512 kernels plus the AMX-BF16 GEMM for\n"
          "M >= BCQ_AMX_MIN_M). Raises ValueError if the CPU or build lacks it.");
    m.def("bcq_isa", &py_bcq_isa, "bcq_isa() -> str: the ISA the lut16 kernels use now.");
    m.def("bcq_set_tables", &py_bcq_set_tables, py::arg("name"),
          "bcq_set_tables(name: 'int8'|'float32') -> str: the int8 paths of uniform weights: the GEMV tables on\n"
          "AVX2/AVX-512 and the AVX2 GEMM's X (process-wide; int8 is the default, SHIFTC_LUT_TABLES=float32\n"
          "in the environment selects float32 before the first call). Other ISAs and the float-scale format\n"
          "always use float32.");
    m.def("bcq_tables", &py_bcq_tables, "bcq_tables() -> str: the GEMV table precision now selected.");
    m.def("attention", &py_attention, py::arg("q"), py::arg("kc"), py::arg("vc"), py::arg("mask"), py::arg("scale"),
          "attention(q: float32 [B, KVH, G, S, D], kc, vc: float32 or float16 [B, KVH, M, D], mask: float32 [B, S, T],\n"
          "          scale) -> float32 [B, KVH, G, S, D]\n\n"
          "Attention of the S query rows over cache rows [0, T) (shiftc/attention.h), every task in turn.");
    m.def("kv_write_f16", &py_kv_write_f16, py::arg("cache"), py::arg("rows"), py::arg("T"),
          "kv_write_f16(cache: float16 [B, KVH, M, D], rows: float32 [B, KVH, S, D], T) -> cache\n\n"
          "Writes rows into cache rows [T - S, T) in place, rounded to nearest even.");
    m.def("attention_set_isa", &py_attention_set_isa, py::arg("name"),
          "attention_set_isa(name: 'auto'|'scalar'|'avx2'|'avx512'|'neon') -> str: the ISA the attention\n"
          "kernel now uses (process-wide). Raises ValueError if the CPU or build lacks it.");
    m.def("attention_isa", [] { return std::string(isa_name(shiftc_attention_isa())); },
          "attention_isa() -> str: the ISA the attention kernel uses now.");
}
