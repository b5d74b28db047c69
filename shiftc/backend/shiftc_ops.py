"""Relax lowerings of the ``ai.shiftc`` ops (see shiftc/passes/ops/ for their schemas).

BcqMatMul on CPU targets
------------------------
The packed bit planes and scale exponents are constants. At compile time they are repacked into
the kernels' ``lut16`` layout (csrc/include/shiftc/bcq_lut.h: 16-row blocks, one 4-bit table
index per row and 4 columns, scales as floats that are exact powers of two or sums of two), and
the op becomes a ``call_tir`` to a small PrimFunc that calls the C kernels of
csrc/kernels/bcq_lut.cc by name::

    shiftc_bcq_prepare(x, M, K, G, ws)             # tables of ± sums of x (decode) / group sums
    for t in parallel(ceil(N / 32)):               # TVM's thread pool
        shiftc_bcq_compute(x, ws, M, K, N, q, G, codes, scales, offsets, y, t)

The kernel source is compiled for the target and linked into the model library
(:func:`shiftc.backend.kernels.kernel_object`), so the library still needs only the TVM runtime.
The weights stay packed in the library: q bits per weight plus one float per 16-row block, group
and plane (``bits_per_weight`` in the compression metadata counts the int8 exponents the ONNX
file stores instead).

BcqMatMul on CUDA targets: the weight ``Ŵ = Σ α_i ⊙ s(B_i)`` is reconstructed once at compile
time and the op becomes a float32 matmul (exact, but not smaller or faster than fp32).
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np

from ..errors import UnsupportedError
from ..passes import ops
from .importer import SHIFTC_DOMAIN, register_converter

#: PrimFunc attribute marking functions that call the C kernels (compile.py links them in).
EXTERN_ATTR = "shiftc.extern_kernels"
ROW_BLOCK = 16  # rows per lut16 block
TASK_ROWS = 32  # output columns per kernel task

_device = contextvars.ContextVar("shiftc_lowering_device", default="cpu")
_packed = contextvars.ContextVar("shiftc_packed_weights", default=None)  # see sharing_packed_weights


@contextlib.contextmanager
def lowering_for(device_type: str):
    """Converters inside this block lower for ``device_type`` ("cpu" or "cuda")."""
    token = _device.set(device_type)
    try:
        yield
    finally:
        _device.reset(token)


def _constant(expr, node, what: str) -> np.ndarray:
    value = getattr(expr, "value", None) or getattr(expr, "data", None)
    if value is None or not hasattr(value, "numpy"):
        raise UnsupportedError(f"node '{node.name}' ({node.op_type}): input '{what}' must be a constant initializer")
    return value.numpy()


def pack_lut16(planes: np.ndarray, alpha: np.ndarray, k: int, group: int, coding: str = "pm1"):
    """ONNX-side storage -> lut16 arrays ``(codes uint8, scales float32, offsets float32 | None)``.

    The C kernels' own packer (``shiftc._native.bcq_pack_lut16``) is used where it is built;
    this numpy version is the executable statement of the layout (and what tests compare it to).
    """
    from ..passes.bcq import unpack_planes

    q, n, _ = planes.shape
    nb, ng = -(-n // ROW_BLOCK), -(-k // group)
    kp = ng * group
    bits = np.zeros((q, nb * ROW_BLOCK, kp), np.uint8)
    bits[:, :n, :k] = unpack_planes(planes, k)
    octets = bits.reshape(q, nb, ROW_BLOCK, kp // 8, 8)
    byte = (octets << np.arange(8, dtype=np.uint8)).sum(-1, dtype=np.uint8)  # [q, nb, 16, kp/8]
    codes = np.ascontiguousarray(byte.transpose(1, 3, 0, 2))  # [nb, kp/8, q, 16]
    a = np.zeros((q, nb * ROW_BLOCK, ng), np.float32)
    a[:, :n] = alpha
    offsets = None
    if coding == "01":  # α·b = (α/2)·s(b) + α/2
        a = a / 2
        offsets = np.ascontiguousarray(a.sum(0).reshape(nb, ROW_BLOCK, ng).transpose(0, 2, 1))  # [nb, ng, 16]
    elif coding != "pm1":
        raise ValueError(f"unknown coding {coding!r}")
    scales = np.ascontiguousarray(a.reshape(q, nb, ROW_BLOCK, ng).transpose(1, 3, 0, 2))  # [nb, ng, q, 16]
    return codes.reshape(-1), scales.reshape(-1), None if offsets is None else offsets.reshape(-1)


def _pack(planes, alpha, k, group, coding):
    try:
        from .. import _native

        fn = getattr(_native, "bcq_pack_lut16", None)
    except ImportError:
        fn = None
    if fn is None:
        return pack_lut16(planes, alpha, k, group, coding)
    return fn(planes, alpha, k, group, coding)


def workspace_floats(m, k: int, group: int, lut_max_m: int):
    """shiftc_bcq_workspace_floats (bcq_lut.h) as an expression of the symbolic row count ``m``."""
    from tvm import tirx

    kp, ng = -(-k // group) * group, -(-k // group)
    # float tables, group sums, int8 tables ((kp / 8 + 4) octets x 32 bytes) and their scales;
    # the GEMM path: group sums; both: X rounded to int8 (kp bytes), its scales and outliers
    x8 = kp // 4 + ng + ng * 2 * header_define("SHIFTC_BCQ_X8_OUTLIERS")
    lut = kp // 4 * 16 + ng + (kp // 8 + 4) * 8 + ng + x8
    if isinstance(m, int):
        return m * lut if m < lut_max_m else m * (ng + x8)
    return tirx.Select(m < lut_max_m, m * lut, m * (ng + x8))


def header_define(name: str) -> int:
    """An integer #define of the kernels' header (the TIR must agree with the C code)."""
    import re

    from .kernels import kernel_header

    found = re.search(rf"#define\s+{name}\s+(\d+)", kernel_header().read_text())
    if not found:
        raise RuntimeError(f"{name} not found in bcq_lut.h")
    return int(found.group(1))


def lut_max_m() -> int:
    """SHIFTC_BCQ_LUT_MAX_M from the kernels' header."""
    return header_define("SHIFTC_BCQ_LUT_MAX_M")


def _lut_primfunc(k: int, n: int, q: int, group: int, n_codes: int, n_scales: int, n_offsets: int,
                  uniform: bool = False):
    """PrimFunc (x [M, K], codes, scales, offsets, y [M, N], ws) calling the kernels (module doc):
    shiftc_bcq_compute on float32 scales (offsets NULL when ``n_offsets`` is 0), or with ``uniform``
    shiftc_bcq_compute_uniform on the float16 (scale, min) blocks (the offsets argument unused)."""
    from tvm.script import tirx as T

    ntasks = -(-n // TASK_ROWS)
    scale_dtype = "float16" if uniform else "float32"
    n_off = max(n_offsets, 1)

    def off_ptr(buf):  # the offsets, or NULL when the weight has none
        return buf.data if n_offsets else T.reinterpret("handle", T.uint64(0))

    @T.prim_func(private=True)
    def lut_matmul(x_h: T.handle, c_h: T.handle, s_h: T.handle, o_h: T.handle, y_h: T.handle, ws_h: T.handle):
        # (buffers by match_buffer: this module's annotations are strings, see __future__)
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        codes = T.match_buffer(c_h, (n_codes,), "uint8")
        scales = T.match_buffer(s_h, (n_scales,), scale_dtype)
        offsets = T.match_buffer(o_h, (n_off,), "float32")
        m = T.int64()
        w = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        ws = T.match_buffer(ws_h, (w,), "float32")
        T.evaluate(T.call_extern("int32", "shiftc_bcq_prepare", x.data, m, T.int64(k), T.int64(group), ws.data))
        for t in T.parallel(T.int32(ntasks)):  # int32 + explicit cast: the C side takes int64_t
            if uniform:  # Python constants: the parser keeps one branch
                T.evaluate(T.call_extern(
                    "int32", "shiftc_bcq_compute_uniform", x.data, ws.data, m, T.int64(k), T.int64(n), T.int32(q),
                    T.int64(group), codes.data, scales.data, y.data, T.Cast("int64", t)))
            else:
                T.evaluate(T.call_extern(
                    "int32", "shiftc_bcq_compute", x.data, ws.data, m, T.int64(k), T.int64(n), T.int32(q),
                    T.int64(group), codes.data, scales.data, off_ptr(offsets), y.data, T.Cast("int64", t)))

    # op_pattern 8 = kOpaque: operator fusion leaves the call alone
    return lut_matmul.with_attr(EXTERN_ATTR, True).with_attr("op_pattern", 8)


@register_converter(SHIFTC_DOMAIN, ops.BCQ_MATMUL.name)
def _bcq_matmul(bb, inputs, attrs, node):
    from tvm import relax

    from ..passes.bcq import exps_to_alpha, reconstruct, unpack_planes

    x = inputs[0]
    planes = _constant(inputs[1], node, "planes")
    exps = _constant(inputs[2], node, "exps")
    coding = attrs.get("coding", "pm1")
    coding = coding.decode() if isinstance(coding, bytes) else coding
    bits, group, k = int(attrs["bits"]), int(attrs["group_size"]), int(attrs["in_features"])
    if planes.shape[0] != bits:
        raise UnsupportedError(f"node '{node.name}': bits={bits} but planes has {planes.shape[0]} planes")
    if coding not in ("pm1", "01"):
        raise UnsupportedError(f"node '{node.name}': unknown coding {coding!r}")
    alpha = exps_to_alpha(exps)  # [q, N, ng]
    n = int(planes.shape[1])
    if _device.get() != "cpu":
        w = reconstruct(unpack_planes(planes, k), alpha, group, coding).astype(np.float32)  # [N, K]
        return relax.op.matmul(x, relax.const(np.ascontiguousarray(w.T), "float32"))

    packed = _shared_lut16(node, lambda: _pack(planes, alpha, k, group, coding))
    name = f"shiftc_bcq_{n}x{k}_q{bits}g{group}{'_off' if packed[5] else ''}"
    return _emit_lut16_call(bb, x, node, name, k, n, bits, group, packed)


def _emit_lut16_call(bb, x, node, name: str, k: int, n: int, bits: int, group: int, packed):
    """The kernel call of lut16 constants ``packed`` (:func:`_shared_lut16`), :func:`_emit_kernel_call`."""
    codes, scales, off, n_codes, n_scales, n_off = packed
    fn = _lut_primfunc(k, n, bits, group, n_codes, n_scales, n_off)
    return _emit_kernel_call(bb, x, node, fn, name, k, n, group, [codes, scales, off])


def _emit_kernel_call(bb, x, node, fn, name: str, k: int, n: int, group: int, weights: list):
    """Emit ``reshape(x, [rows, K]) -> call_tir(fn, [x, *weights]) -> reshape back`` for a PrimFunc
    ``fn`` (x [M, K], *weights, y [M, N], ws) calling the lut16 kernels."""
    from tvm import relax

    x = bb.normalize(x)
    x_shape = list(x.ty.shape)
    if not x_shape or int(x_shape[-1]) != k:
        raise UnsupportedError(f"node '{node.name}' ({node.op_type}): input X has shape {x_shape}, expected [..., {k}]")
    rows = _elements(x_shape[:-1])
    gv = bb.add_func(fn, name)
    x2 = bb.emit(relax.op.reshape(x, [rows, k]))
    out = bb.emit(relax.call_tir(
        gv, [x2, *weights],
        [relax.TensorType([rows, n], "float32"),
         relax.TensorType([workspace_floats(rows, k, group, lut_max_m())], "float32")]))
    y = bb.emit(relax.TupleGetItem(out, 0))
    return relax.op.reshape(y, x_shape[:-1] + [n])


def _elements(shape):
    """The product of a Relax shape's dimensions (an int, or an expression of its symbols)."""
    from tvm import tirx

    n = 1
    for d in shape:
        n = n * (int(d) if isinstance(d, tirx.IntImm) else d)
    return n


def _emit_row_gather(bb, ids, gv, tables: list, k: int):
    """``reshape(ids, [R]) -> call_tir(gv, [ids, *tables]) -> reshape to ids.shape + [K]``: the
    lowering shared by the gather ops (``gv`` a PrimFunc (ids [R], *tables, y [R, K]))."""
    from tvm import relax

    shape = list(ids.ty.shape)
    rows = _elements(shape)
    flat = bb.emit(relax.op.reshape(relax.op.astype(ids, "int64"), [rows]))
    y = bb.emit(relax.call_tir(gv, [flat, *tables], relax.TensorType([rows, k], "float32")))
    return relax.op.reshape(y, shape + [k])


def _gather_primfunc(k: int, n: int, q: int, group: int, n_codes: int, n_scales: int, n_offsets: int,
                     uniform: bool = False):
    """PrimFunc (ids [R], codes, scales, offsets, y [R, K]): rows of a lut16 weight (bcq_lut.h's
    layout read row by row), reconstructed as W[r, c] = Σ_i scales[i] · s(bit_i) + offset, or with
    ``uniform`` as scale·code + min from the compact float16 (scale, min) blocks in ``scales`` (the
    offsets argument unused). Indices wrap once from the end (ONNX Gather) and are clamped to
    [0, N) so a bad id cannot read past the table. Serial: a row is K·q adds, far below a
    thread-pool dispatch at decode."""
    from tvm.script import tirx as T

    ng = -(-k // group)
    kp8 = ng * group // 8
    has_off = n_offsets > 0
    rb = ROW_BLOCK
    scale_dtype = "float16" if uniform else "float32"

    @T.prim_func(private=True)
    def lut16_gather(i_h: T.handle, c_h: T.handle, s_h: T.handle, o_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        r = T.int64()
        ids = T.match_buffer(i_h, (r,), "int64")
        codes = T.match_buffer(c_h, (n_codes,), "uint8")
        scales = T.match_buffer(s_h, (n_scales,), scale_dtype)
        offsets = T.match_buffer(o_h, (max(n_offsets, 1),), "float32")
        y = T.match_buffer(y_h, (r, k), "float32")
        for t in T.serial(r):
            idx = T.max(T.min(T.if_then_else(ids[t] < T.int64(0), ids[t] + T.int64(n), ids[t]), T.int64(n - 1)),
                        T.int64(0))
            blk = idx // T.int64(rb)
            row = idx % T.int64(rb)
            for c in T.serial(T.int64(k)):
                grp = blk * T.int64(ng) + c // T.int64(group)
                if uniform:  # Python constants: the parser keeps one branch
                    code = T.int32(0)
                    for i in T.unroll(q):
                        byte = codes[((blk * T.int64(kp8) + c // T.int64(8)) * T.int64(q) + T.int64(i)) * T.int64(rb)
                                     + row]
                        code = code + T.shift_left(
                            T.Cast("int32", T.shift_right(byte, T.Cast("uint8", c % T.int64(8))) & T.uint8(1)), i)
                    y[t, c] = T.Cast("float32", scales[grp * T.int64(2 * rb) + row]) * T.Cast("float32", code) + \
                        T.Cast("float32", scales[grp * T.int64(2 * rb) + T.int64(rb) + row])
                else:
                    if has_off:
                        y[t, c] = offsets[grp * T.int64(rb) + row]
                    else:
                        y[t, c] = T.float32(0)
                    for i in T.unroll(q):
                        byte = codes[((blk * T.int64(kp8) + c // T.int64(8)) * T.int64(q) + T.int64(i)) * T.int64(rb)
                                     + row]
                        bit = T.Cast("int32", T.shift_right(byte, T.Cast("uint8", c % T.int64(8))) & T.uint8(1))
                        y[t, c] = y[t, c] + scales[(grp * T.int64(q) + T.int64(i)) * T.int64(rb) + row] * \
                            T.Cast("float32", bit * 2 - 1)

    return lut16_gather.with_attr("op_pattern", 8)  # opaque, as the matmul kernels' calls


def _shared(node, make):
    """``make()`` (the packed constants of ``node``'s weight initializers, inputs 1..), made once per
    import and returned as the same Relax constants to every op that reads those initializers: a
    tied LM head and its embedding lookup then hold one copy in the library."""
    cache = _packed.get()
    key = tuple(node.input[1:])
    if cache is not None and key in cache:
        return cache[key]
    entry = make()
    if cache is not None:
        cache[key] = entry
    return entry


def _shared_lut16(node, make):
    """The lut16 arrays ``(codes, scales, offsets, n_codes, n_scales, n_offsets)`` of ``node``'s
    weights as shared Relax constants (:func:`_shared`); ``make()`` returns the numpy arrays."""
    from tvm import relax

    def consts():
        codes, scales, offsets = make()
        off = offsets if offsets is not None else np.zeros(1, np.float32)
        return (relax.const(np.asarray(codes), "uint8"), relax.const(np.asarray(scales, np.float32), "float32"),
                relax.const(np.asarray(off, np.float32), "float32"), int(np.size(codes)), int(np.size(scales)),
                0 if offsets is None else int(np.size(offsets)))

    return _shared(node, consts)


@contextlib.contextmanager
def sharing_packed_weights():
    """Within this block, ops reading the same weight initializers share their packed constants."""
    token = _packed.set({})
    try:
        yield
    finally:
        _packed.reset(token)


@register_converter(SHIFTC_DOMAIN, ops.BCQ_GATHER.name)
def _bcq_gather(bb, inputs, attrs, node):
    """BcqGather (shiftc/passes/ops/): rows of a BcqMatMul weight. CPU: read from the same lut16
    constants as the tied head's BcqMatMul; CUDA: a Gather on the reconstructed table."""
    from tvm import relax

    from ..passes.bcq import exps_to_alpha, reconstruct, unpack_planes

    ids = bb.normalize(inputs[0])
    planes = _constant(inputs[1], node, "planes")
    exps = _constant(inputs[2], node, "exps")
    coding = attrs.get("coding", "pm1")
    coding = coding.decode() if isinstance(coding, bytes) else coding
    bits, group, k = int(attrs["bits"]), int(attrs["group_size"]), int(attrs["in_features"])
    if planes.shape[0] != bits or coding not in ("pm1", "01"):
        raise UnsupportedError(f"node '{node.name}' (BcqGather): bits={bits}, coding {coding!r}, planes {planes.shape}")
    n = int(planes.shape[1])
    alpha = exps_to_alpha(exps)
    if _device.get() != "cpu":
        w = reconstruct(unpack_planes(planes, k), alpha, group, coding).astype(np.float32)  # [N, K]
        return relax.op.take(relax.const(w, "float32"), ids, axis=0)
    codes, scales, off, n_codes, n_scales, n_off = _shared_lut16(node, lambda: _pack(planes, alpha, k, group, coding))
    gv = bb.add_func(_gather_primfunc(k, n, bits, group, n_codes, n_scales, n_off),
                     f"shiftc_bcq_gather_{n}x{k}_q{bits}g{group}")
    return _emit_row_gather(bb, ids, gv, [codes, scales, off], k)


def _qgather_primfunc(k: int, n: int, bits: int, group: int, row_bytes: int, ng: int):
    """PrimFunc (ids [R], codes uint8 [N, row_bytes], scales/mins float16 [N, ng], y [R, K]):
    y[r, c] = scale · code + min (QGather, shiftc/passes/ops/); indices wrap and clamp as above."""
    from tvm.script import tirx as T

    mask = (1 << bits) - 1

    @T.prim_func(private=True)
    def q_gather(i_h: T.handle, c_h: T.handle, s_h: T.handle, m_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        r = T.int64()
        ids = T.match_buffer(i_h, (r,), "int64")
        codes = T.match_buffer(c_h, (n, row_bytes), "uint8")
        scales = T.match_buffer(s_h, (n, ng), "float16")
        mins = T.match_buffer(m_h, (n, ng), "float16")
        y = T.match_buffer(y_h, (r, k), "float32")
        for t in T.serial(r):
            idx = T.max(T.min(T.if_then_else(ids[t] < T.int64(0), ids[t] + T.int64(n), ids[t]), T.int64(n - 1)),
                        T.int64(0))
            for c in T.serial(T.int64(k)):
                byte = codes[idx, c * T.int64(bits) // T.int64(8)]
                code = T.shift_right(byte, T.Cast("uint8", c * T.int64(bits) % T.int64(8))) & T.uint8(mask)
                y[t, c] = T.Cast("float32", scales[idx, c // T.int64(group)]) * T.Cast("float32", code) + \
                    T.Cast("float32", mins[idx, c // T.int64(group)])

    return q_gather.with_attr("op_pattern", 8)


@register_converter(SHIFTC_DOMAIN, ops.Q_GATHER.name)
def _q_gather(bb, inputs, attrs, node):
    """QGather (shiftc/passes/ops/): a table on a uniform grid, stored as it is in the ONNX file
    (q-bit codes, float16 scales and mins); CPU: a row gather in TIR; CUDA: Gather on Ŵ."""
    from tvm import relax

    from ..passes.uniform import BITS, dequantize

    ids = bb.normalize(inputs[0])
    codes = _constant(inputs[1], node, "codes")
    scales = _constant(inputs[2], node, "scales")
    mins = _constant(inputs[3], node, "mins")
    bits, group, k = int(attrs["bits"]), int(attrs["group_size"]), int(attrs["in_features"])
    n, ng = int(codes.shape[0]), -(-k // group)
    if bits not in BITS or codes.shape[1] != -(-k * bits // 8) or scales.shape != (n, ng) or mins.shape != (n, ng):
        raise UnsupportedError(f"node '{node.name}' (QGather): bits={bits}, K={k}, G={group} but codes {codes.shape}, "
                               f"scales {scales.shape}, mins {mins.shape}")
    if _device.get() != "cpu":
        w = dequantize(codes, scales, mins, bits, group, k)
        return relax.op.take(relax.const(w, "float32"), ids, axis=0)
    gv = bb.add_func(_qgather_primfunc(k, n, bits, group, int(codes.shape[1]), ng), f"shiftc_q_gather_{n}x{k}_q{bits}g{group}")
    return _emit_row_gather(bb, ids, gv, list(inputs[1:4]), k)


def fdb_lut16(planes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, k: int, group: int):
    """FdbMatMul storage -> lut16 arrays: the {0,1} planes packed with coding "01" (halved scales,
    offsets Σα/2) and the op's own per-group offsets μ added to those offsets."""
    q, n, _ = planes.shape
    alpha = np.ascontiguousarray(scales.astype(np.float32))
    codes, lut_scales, lut_off = _pack(planes, alpha, k, group, "01")
    nb, ng = -(-n // ROW_BLOCK), -(-k // group)
    mu = np.zeros((nb * ROW_BLOCK, ng), np.float32)
    mu[:n] = offsets.astype(np.float32)
    lut_off = np.asarray(lut_off, np.float32) + mu.reshape(nb, ROW_BLOCK, ng).transpose(0, 2, 1).reshape(-1)
    return np.asarray(codes), np.asarray(lut_scales, np.float32), np.ascontiguousarray(lut_off, np.float32)


@register_converter(SHIFTC_DOMAIN, ops.FDB_MATMUL.name)
def _fdb_matmul(bb, inputs, attrs, node):
    """FdbMatMul (shiftc/passes/ops/): W = Σ α_i·B_i + μ with {0,1} planes. CPU: the BcqMatMul
    kernels with coding "01" and μ folded into their per-group offsets; CUDA: W reconstructed."""
    from tvm import relax

    from ..passes.bcq import unpack_planes
    from ..passes.fdb import reconstruct

    x = inputs[0]
    planes = _constant(inputs[1], node, "planes")
    scales = _constant(inputs[2], node, "scales")
    offsets = _constant(inputs[3], node, "offsets")
    bits, group, k = int(attrs["bits"]), int(attrs["group_size"]), int(attrs["in_features"])
    n = int(planes.shape[1])
    if planes.shape[0] != bits or scales.shape[:2] != (bits, n) or offsets.shape[0] != n:
        raise UnsupportedError(f"node '{node.name}' (FdbMatMul): bits={bits} but planes {planes.shape}, "
                               f"scales {scales.shape}, offsets {offsets.shape}")
    if _device.get() != "cpu":
        w = reconstruct(unpack_planes(planes, k), scales, offsets, group).astype(np.float32)  # [N, K]
        return relax.op.matmul(x, relax.const(np.ascontiguousarray(w.T), "float32"))

    packed = _shared_lut16(node, lambda: fdb_lut16(planes, scales, offsets, k, group))
    return _emit_lut16_call(bb, x, node, f"shiftc_fdb_{n}x{k}_q{bits}g{group}", k, n, bits, group, packed)


# -- UniformMatMul / UniformGather ---------------------------------------------------------------
#
# CPU: the planes' lut16 codes (the same codes as BcqMatMul's) and the compact "uniform" scale
# storage of bcq_lut.h: float16 (scale, min) per 16-row block and group, [NB][NG][2][16] — q + 32/G
# bits per weight in the library, as in the ONNX file. The kernels derive each plane's scale
# (scale·2^i) and the offset per group as they go. CUDA: Ŵ reconstructed once (float32).


def pack_uniform(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """float16 scales, mins [N, NG] -> float16 [NB·NG·2·16] in the order [NB][NG][2][16] (padded rows 0)."""
    n, ng = scales.shape
    nb = -(-n // ROW_BLOCK)
    su = np.zeros((2, nb * ROW_BLOCK, ng), np.float16)
    su[0, :n], su[1, :n] = scales, mins
    return np.ascontiguousarray(su.reshape(2, nb, ROW_BLOCK, ng).transpose(1, 3, 0, 2)).reshape(-1)


def _pack_codes(planes: np.ndarray, k: int, group: int) -> np.ndarray:
    """The lut16 codes of ``planes`` (uint8, 1-D): the C packer where built, else numpy."""
    try:
        from .. import _native

        fn = getattr(_native, "bcq_pack_codes", None)
    except ImportError:
        fn = None
    if fn is not None:
        return np.asarray(fn(planes, k, group))
    q, n, _ = planes.shape
    return pack_lut16(planes, np.zeros((q, n, -(-k // group)), np.float32), k, group)[0]


def _uniform_consts(node, planes, scales, mins, k: int, group: int):
    """(codes, su, n_codes, n_su): shared Relax constants of an UniformMatMul / UniformGather weight."""
    from tvm import relax

    def consts():
        codes, su = _pack_codes(planes, k, group), pack_uniform(scales, mins)
        return relax.const(codes, "uint8"), relax.const(su, "float16"), int(codes.size), int(su.size)

    return _shared(node, consts)


def _uniform_weights(inputs, attrs, node):
    """(planes, scales, mins, bits, group, K, N) of an UniformMatMul / UniformGather, checked."""
    planes = _constant(inputs[1], node, "planes")
    scales = _constant(inputs[2], node, "scales")
    mins = _constant(inputs[3], node, "mins")
    bits, group, k = int(attrs["bits"]), int(attrs["group_size"]), int(attrs["in_features"])
    n, ng = int(planes.shape[1]), -(-k // group)
    if planes.shape != (bits, n, -(-k // 32)) or scales.shape != (n, ng) or mins.shape != (n, ng) or \
            scales.dtype != np.float16 or mins.dtype != np.float16:
        raise UnsupportedError(f"node '{node.name}' ({node.op_type}): bits={bits}, K={k}, G={group} but planes "
                               f"{planes.shape}, scales {scales.shape} {scales.dtype}, mins {mins.shape} {mins.dtype}")
    return planes, scales, mins, bits, group, k, n


@register_converter(SHIFTC_DOMAIN, ops.UNIFORM_MATMUL.name)
def _uniform_matmul(bb, inputs, attrs, node):
    from tvm import relax

    from ..passes.ops import uniform_matmul_weight

    x = inputs[0]
    planes, scales, mins, bits, group, k, n = _uniform_weights(inputs, attrs, node)
    if _device.get() != "cpu":
        w = uniform_matmul_weight(planes, scales, mins, group_size=group, in_features=k)
        return relax.op.matmul(x, relax.const(np.ascontiguousarray(w.T), "float32"))
    codes, su, n_codes, n_su = _uniform_consts(node, planes, scales, mins, k, group)
    unused = relax.const(np.zeros(1, np.float32))  # the offsets argument, not read by the uniform kernel
    return _emit_kernel_call(bb, x, node, _lut_primfunc(k, n, bits, group, n_codes, n_su, 0, uniform=True),
                             f"shiftc_uq_{n}x{k}_q{bits}g{group}", k, n, group, [codes, su, unused])


@register_converter(SHIFTC_DOMAIN, ops.UNIFORM_GATHER.name)
def _uniform_gather(bb, inputs, attrs, node):
    """UniformGather (shiftc/passes/ops/): rows of an UniformMatMul weight. CPU: read from the same
    constants as the tied head's UniformMatMul; CUDA: a Gather on the reconstructed table."""
    from tvm import relax

    from ..passes.ops import uniform_matmul_weight

    ids = bb.normalize(inputs[0])
    planes, scales, mins, bits, group, k, n = _uniform_weights(inputs, attrs, node)
    if _device.get() != "cpu":
        w = uniform_matmul_weight(planes, scales, mins, group_size=group, in_features=k)
        return relax.op.take(relax.const(w, "float32"), ids, axis=0)
    codes, su, n_codes, n_su = _uniform_consts(node, planes, scales, mins, k, group)
    gv = bb.add_func(_gather_primfunc(k, n, bits, group, n_codes, n_su, 0, uniform=True),
                     f"shiftc_uq_gather_{n}x{k}_q{bits}g{group}")
    unused = relax.const(np.zeros(1, np.float32))  # the offsets argument, not read for a uniform grid
    return _emit_row_gather(bb, ids, gv, [codes, su, unused], k)
