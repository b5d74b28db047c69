"""Latency model for the allocation: measured BcqMatMul kernel time per layer shape and bit width.

The model's time is modelled as Σ_i t(N_i, K_i, b_i) + t_other: the quantized layers' kernel
times, each measured on this machine with shiftc's LUT kernels (``shiftc._native.bcq_matmul_lut16``,
the code the compiled library runs; csrc/include/shiftc/bcq_lut.h), plus the rest of the model
(attention, norms, embedding), a constant the caller supplies (``other_ms``; e.g. measured on the
compiled fp32 model minus its matmuls, or 0 to budget the quantized layers alone).

Each (N, K, b) is timed once on random packed weights: ``m`` rows of x (1 = decode, the
default), ``threads`` threads, the fastest of ``repeats`` runs after a warm-up. Distinct shapes are
few in a transformer (SmolLM2-135M: 5 shapes), so this takes seconds.

Only the host can be measured: ``--target`` other than ``host`` is refused (no remote timing).
"""

from __future__ import annotations

import time

import numpy as np

from ...errors import UnsupportedError, UsageError


def kernel_available() -> bool:
    try:
        from ... import _native
    except ImportError:
        return False
    return hasattr(_native, "bcq_matmul_lut16") and hasattr(_native, "bcq_pack_lut16")


def require_kernel(target: str = "host") -> None:
    if target not in ("host", None):
        raise UnsupportedError(f"--latency-budget-ms with --target {target}: kernel times can only be measured on "
                               f"this machine (--target host) for now")
    if not kernel_available():
        raise UnsupportedError("--latency-budget-ms needs per-shape kernel timings from the LUT kernels "
                               "(shiftc._native.bcq_matmul_lut16), which this build of shiftc lacks; rebuild "
                               "shiftc with the LUT kernels or drop --latency-budget-ms (size-only plan)")


def time_kernel(n: int, k: int, bits: int, group: int, *, m: int = 1, threads: int = 1, repeats: int = 20,
                seed: int = 0) -> float:
    """Seconds of one BcqMatMul [m, k] x [n, k]ᵀ at ``bits`` with the LUT kernel: the fastest of
    ``repeats`` runs (on a shared machine the median includes time the process was preempted)."""
    from ... import _native

    rng = np.random.default_rng(seed)
    words = -(-k // 32)
    planes = rng.integers(0, 2**32, (bits, n, words), dtype=np.uint64).astype(np.uint32)
    alpha = np.exp2(rng.integers(-8, -2, (bits, n, -(-k // group)))).astype(np.float32)
    codes, scales, offsets = _native.bcq_pack_lut16(planes, alpha, k, group, "pm1")
    x = rng.standard_normal((m, k)).astype(np.float32)
    _native.bcq_matmul_lut16(x, codes, scales, offsets, n, k, bits, group, threads)  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _native.bcq_matmul_lut16(x, codes, scales, offsets, n, k, bits, group, threads)
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts))


def layer_times(shapes: list[tuple[int, int]], widths: list[int], group: int, *, m: int = 1, threads: int = 1,
                repeats: int = 20, timer=None, target: str = "host") -> tuple[np.ndarray, dict]:
    """Milliseconds [layers, widths], one timing per distinct (N, K, width); and the table of
    distinct timings {"NxK": {bits: ms}}. ``timer(n, k, bits)`` -> seconds replaces the kernel
    (tests, or timings from elsewhere)."""
    if timer is None:
        require_kernel(target)

        def timer(n, k, b):
            return time_kernel(n, k, b, group, m=m, threads=threads, repeats=repeats)
    if m < 1 or threads < 1:
        raise UsageError(f"latency model: m and threads must be >= 1 (got {m}, {threads})")
    per_shape: dict[tuple[int, int, int], float] = {}
    for n, k in dict.fromkeys(tuple(map(int, s)) for s in shapes):
        for b in widths:
            per_shape[(n, k, b)] = 1e3 * float(timer(n, k, b))
    t = np.array([[per_shape[(int(n), int(k), b)] for b in widths] for n, k in shapes])
    table = {f"{n}x{k}": {str(b): per_shape[(n, k, b)] for b in widths}
             for n, k in dict.fromkeys((n, k) for n, k, _ in per_shape)}
    return t, table
