"""Per-layer quantization results on disk, so that each layer is quantized once per bit width.

Measuring sensitivity quantizes every layer at every candidate bit width; comparing allocations
(a budget sweep, baselines) assembles models from those same results. :class:`LayerCache` stores
one shift-add result per (layer, bit width) as ``<dir>/<layer>.b<bits>.<key>.npz`` holding the packed
planes (uint32 [q, N, ceil(K/32)], csrc/include/shiftc/packed.h) and the scales as the pass stores
them: the int8 exponents of BCQ (``exps``), or the float16 ``scales`` and ``mins`` of a uniform grid.

The key is a hash of everything the result depends on: the layer name, the weight's bytes, the
calibration H of its input (or "no H"), bits, the layer's group (ShiftAddConfig.group_for),
scale mode, damping, activation order and refinement rounds. A changed weight, calibration set or quantizer setting misses the cache; a
change of the quantizer's *code* does not change the key — clear the folder after upgrading
shiftc (``rm -r DIR``).
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from .. import bcq, uniform


def digest(a: np.ndarray | None) -> str:
    if a is None:
        return "none"
    a = np.ascontiguousarray(a)
    return hashlib.sha1(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def result_key(name: str, w_digest: str, h_digest: str, bits: int, cfg) -> str:
    group = cfg.group_for(name) if hasattr(cfg, "group_for") else cfg.group
    damp = cfg.damp_for(name) if hasattr(cfg, "damp_for") else cfg.damp
    s = "|".join(map(str, (name, w_digest, h_digest, bits, group, cfg.scale_mode, damp, cfg.act_order, cfg.iters)))
    return hashlib.sha1(s.encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class LayerCache:
    """A folder of per-layer results; ``None`` as folder = no caching (every get misses)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = None if folder is None else os.fspath(folder)
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)

    def path(self, name: str, bits: int, key: str) -> str | None:
        return None if not self.folder else os.path.join(self.folder, f"{_safe(name)}.b{bits}.{key}.npz")

    def get(self, name: str, bits: int, key: str, k: int, group: int,
            scale_mode: str) -> bcq.BcqResult | uniform.UniformResult | None:
        p = self.path(name, bits, key)
        if not p or not os.path.exists(p):
            return None
        fields = ("planes", "scales", "mins") if scale_mode == "uniform" else ("planes", "exps")
        try:
            with np.load(p) as z:
                arrays = [z[f] for f in fields]
        except Exception:  # a truncated file from an interrupted run, or another format: recompute
            return None
        planes = arrays[0]
        if planes.shape[0] != bits:
            return None
        codes = bcq.planes_to_codes(planes, k)
        if scale_mode == "uniform":
            return uniform.UniformResult(codes, arrays[1], arrays[2], bits, group)
        return bcq.BcqResult(codes, arrays[1], bits, group, scale_mode)

    def put(self, name: str, bits: int, key: str, planes: np.ndarray, exps: np.ndarray | None = None, *,
            scales: np.ndarray | None = None, mins: np.ndarray | None = None) -> None:
        """Store packed ``planes`` with BCQ ``exps``, or with a uniform grid's ``scales`` and ``mins``."""
        p = self.path(name, bits, key)
        if not p:
            return
        if (exps is None) == (scales is None or mins is None):
            raise ValueError("LayerCache.put: give exps (BCQ) or scales and mins (uniform)")
        arrays = {"exps": exps} if exps is not None else {"scales": scales, "mins": mins}
        tmp = p + ".tmp.npz"
        np.savez(tmp, planes=planes, **arrays)
        os.replace(tmp, p)

    def put_result(self, name: str, bits: int, key: str, result: bcq.BcqResult | uniform.UniformResult) -> None:
        if isinstance(result, uniform.UniformResult):
            self.put(name, bits, key, result.packed_planes(), scales=result.scales, mins=result.mins)
        else:
            self.put(name, bits, key, result.packed_planes(), result.exps)

    # -- scalar results (the output-KL sensitivity: one forward pass per layer and width) ---------
    def _values_path(self, kind: str) -> str | None:
        return None if not self.folder else os.path.join(self.folder, f"{_safe(kind)}.values.json")

    def get_values(self, kind: str) -> dict[str, float]:
        """{key: value} stored under ``kind`` (empty without a folder or file)."""
        import json

        p = self._values_path(kind)
        if not p or not os.path.exists(p):
            return {}
        try:
            with open(p) as f:
                return {str(k): float(v) for k, v in json.load(f).items()}
        except (OSError, ValueError):
            return {}

    def put_values(self, kind: str, values: dict[str, float]) -> None:
        """Merge ``values`` into the stored ones (written atomically)."""
        import json

        p = self._values_path(kind)
        if not p:
            return
        merged = {**self.get_values(kind), **{str(k): float(v) for k, v in values.items()}}
        with open(p + ".tmp", "w") as f:
            json.dump(merged, f)
        os.replace(p + ".tmp", p)


def model_digest(model) -> str:
    """Hash of every initializer of an ONNX model (what a whole-model measurement depends on,
    besides the graph)."""
    h = hashlib.sha1()
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(t.name.encode())
        h.update(repr(list(t.dims)).encode())
        h.update(t.raw_data if t.raw_data else t.SerializeToString())
    return h.hexdigest()[:16]


def kl_key(layer_key: str, windows_digest: str, model_dig: str) -> str:
    """Key of one output-KL value: the layer's result key, the calibration windows, the model."""
    return hashlib.sha1(f"kl|{layer_key}|{windows_digest}|{model_dig}".encode()).hexdigest()[:16]
