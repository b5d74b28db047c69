"""Per-layer sensitivity to shift-add quantization at each candidate bit width.

Every quantized layer i (a constant-weight MatMul/Gemm that the shift-add pass matches, weight
W_i [N, K], input X_i [T, K] on the calibration text, H_i = X_iᵀX_i) is quantized *alone* at each
candidate bit width b with the shift-add quantizer at the layer's own group (shiftadd.fit_layer:
BCQ + power-of-two scales, or a uniform grid as planes, inside GPTQ; shiftc/passes/bcq.py,
uniform.py), giving ΔW_i(b) = W_i − Q_b(W_i). From it:

  calib   (no PyTorch)  the layer's output error on the calibration tokens,
              E_i(b) = ‖X_i ΔW_iᵀ‖²_F = tr(ΔW_i H_i ΔW_iᵀ)
          — the quantity GPTQ minimises, summed over all calibration tokens;
  kl      (no PyTorch)  the model's mean next-token KL(p_fp32 ‖ p) with layer i alone quantized,
          through ONNX Runtime on calibration windows (e2e.py): measured where the loss is;
  hawq    (HAWQ-V2)     Ω_i(b) = Tr(∇²_{W_i} L) / n_i · ‖ΔW_i(b)‖²_F, with the trace of the loss
          Hessian block of layer i estimated by Hutchinson's method (hawq.py); n_i = N·K; a
          negative trace estimate counts as 0.

Also recorded per layer: ‖ΔW‖², tr(W H Wᵀ) (the output energy, for relative errors) and the score
ShiftAddLLM (You et al., NeurIPS 2024) sorts layers by for its mixed 2/3-bit allocation
(:func:`shiftaddllm_score`).

The quantized results go to a :class:`~.cache.LayerCache`, so a plan is assembled from them later
without quantizing again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
from onnx import numpy_helper

from ...progress import Counter
from .. import bcq, shiftadd, uniform
from .cache import LayerCache, digest, result_key

KINDS = ("calib", "hawq", "kl")


@dataclass
class LayerStats:
    name: str  # layer name of the shift-add pass (weight initializer name, or "lm_head")
    x: str  # ONNX tensor feeding the layer (layers with the same x share their input)
    shape: tuple[int, int]  # (N, K)
    out_ref: float | None = None  # tr(W H Wᵀ) = ‖X Wᵀ‖²
    shiftaddllm: float | None = None  # ShiftAddLLM's layer score
    out_err: dict[int, float] = field(default_factory=dict)  # bits -> tr(ΔW H ΔWᵀ)
    w_err: dict[int, float] = field(default_factory=dict)  # bits -> ‖ΔW‖²_F
    hessian_trace: float | None = None  # Tr of the loss Hessian block (Hutchinson), for hawq
    hessian_trace_sem: float | None = None  # its standard error over the probes
    kl: dict[int, float] = field(default_factory=dict)  # bits -> output KL, this layer alone quantized (e2e.py)
    group: int | None = None  # columns per scale of this layer (ShiftAddConfig.group_for); None: the table's

    @property
    def n(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])

    def sensitivity(self, kind: str, bits: int) -> float:
        if kind == "calib":
            return self.out_err[bits]
        if kind == "hawq":
            if self.hessian_trace is None:
                raise ValueError(f"layer '{self.name}': no Hessian trace (run the HAWQ estimate first)")
            # a negative estimate (noise, or a direction of negative curvature) counts as zero
            return max(self.hessian_trace, 0.0) / self.n * self.w_err[bits]
        if kind == "kl":
            if bits not in self.kl:
                raise ValueError(f"layer '{self.name}': no output KL at {bits} bits (run the ONNX Runtime estimate first)")
            return self.kl[bits]
        raise ValueError(f"sensitivity kind must be one of {KINDS}, got {kind!r}")


@dataclass
class SensitivityTable:
    layers: list[LayerStats]
    bits: list[int]
    group: int
    scale_mode: str
    info: dict = field(default_factory=dict)

    def matrix(self, kind: str) -> np.ndarray:
        """float64 [layers, len(bits)]."""
        return np.array([[ly.sensitivity(kind, b) for b in self.bits] for ly in self.layers], np.float64)

    def sizes(self) -> np.ndarray:
        return np.array([ly.n for ly in self.layers], np.int64)

    def layer_bits_per_weight(self) -> np.ndarray:
        """[layers, len(bits)]: stored bits per weight with scales (bcq.bits_per_weight) at each
        layer's own group."""
        return np.array([[bcq.bits_per_weight(b, ly.group or self.group, self.scale_mode) for b in self.bits]
                         for ly in self.layers], np.float64)

    def bits_per_weight(self) -> np.ndarray:
        """[len(bits)]: stored bits per weight with scales of every layer at one width, averaged
        over the weights (one group for all layers: bcq.bits_per_weight)."""
        if not self.layers:
            return np.array([bcq.bits_per_weight(b, self.group, self.scale_mode) for b in self.bits])
        n = self.sizes().astype(np.float64)
        return n @ self.layer_bits_per_weight() / n.sum()

    def layer_bytes(self) -> np.ndarray:
        """int64 [layers, len(bits)]: bytes of each layer as stored at each width (size.layer_bytes)."""
        from .size import layer_bytes_table

        return layer_bytes_table(self, self.scale_mode)

    def names(self) -> list[str]:
        return [ly.name for ly in self.layers]

    @classmethod
    def merged(cls, tables: list[SensitivityTable], bits: list[int]) -> SensitivityTable:
        """One table from tables of the same layers measured at different widths (``bits``):
        the first table, with every other table's per-width errors added to its layers."""
        table = tables[0]
        for tb in tables[1:]:
            for ly, lb in zip(table.layers, tb.layers):
                ly.out_err.update(lb.out_err)
                ly.w_err.update(lb.w_err)
        table.bits = list(bits)
        return table

    def to_json(self) -> dict:
        return {"bits": self.bits, "group": self.group, "scale_mode": self.scale_mode, "info": self.info,
                "layers": [{"name": ly.name, "x": ly.x, "shape": list(ly.shape), "out_ref": ly.out_ref,
                            "shiftaddllm": ly.shiftaddllm, "hessian_trace": ly.hessian_trace,
                            "hessian_trace_sem": ly.hessian_trace_sem,
                            "out_err": {str(b): v for b, v in ly.out_err.items()},
                            "w_err": {str(b): v for b, v in ly.w_err.items()},
                            "kl": {str(b): v for b, v in ly.kl.items()},
                            **({"group": ly.group} if ly.group is not None else {})} for ly in self.layers]}

    @classmethod
    def from_json(cls, d: dict) -> "SensitivityTable":
        layers = [LayerStats(e["name"], e["x"], tuple(e["shape"]), e.get("out_ref"), e.get("shiftaddllm"),
                             {int(b): v for b, v in e["out_err"].items()}, {int(b): v for b, v in e["w_err"].items()},
                             e.get("hessian_trace"), e.get("hessian_trace_sem"),
                             {int(b): v for b, v in e.get("kl", {}).items()}, e.get("group")) for e in d["layers"]]
        return cls(layers, [int(b) for b in d["bits"]], int(d["group"]), d["scale_mode"], d.get("info", {}))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, path: str) -> "SensitivityTable":
        with open(path) as f:
            return cls.from_json(json.load(f))


def _damped(h: np.ndarray, damp: float) -> np.ndarray:
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    return h


def shiftaddllm_score(w: np.ndarray, h: np.ndarray, damp: float = 0.01) -> float:
    """ShiftAddLLM's per-layer score (paper §4.3; its reference code, ``ShiftAddLLM.analyse``).

    U = upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ — the factor GPTQ propagates errors
    with; 1/U_jj² weighs column j's squared quantization error in GPTQ's loss. With
    WH = W / diag(U) (column j divided by U_jj), the score is ‖WH‖_F · std(WH)²: large when the
    weights are large where the output is sensitive. ShiftAddLLM sorts layers by it and gives the
    top fraction more bits (:func:`..allocate.sort_and_threshold`).
    """
    import torch

    w = np.asarray(w, np.float64).copy()
    hd = _damped(h, damp)
    w[:, np.diag(np.asarray(h)) == 0] = 0.0
    H = torch.as_tensor(hd)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d = torch.diag(U).numpy()
    wh = w / d[None, :]
    return float(np.linalg.norm(wh) * wh.std(ddof=1) ** 2)


def _weights(model, targets) -> dict[str, np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for t in targets:
        w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
        out[t.name] = w.T if t.transposed else w
    return out


def quantize_layer(name: str, w: np.ndarray, h: np.ndarray | None, bits: int, cfg, cache: LayerCache,
                   w_digest: str | None = None, h_digest: str | None = None) -> bcq.BcqResult | uniform.UniformResult:
    """The shift-add result of one layer at ``bits`` and its own group (``cfg.group_for(name)``),
    as the pass would fit it (shiftadd.fit_layer); from the cache when there."""
    group = cfg.group_for(name)
    key = result_key(name, w_digest or digest(w), h_digest or digest(h), bits, cfg)
    r = cache.get(name, bits, key, w.shape[1], group, cfg.scale_mode)
    if r is None:
        r = shiftadd.fit_layer(w, h, bits, group, scale_mode=cfg.scale_mode, damp=cfg.damp_for(name),
                               act_order=cfg.act_order, iters=cfg.iters)
        cache.put_result(name, bits, key, r)
    return r


def measure(model, targets, hessians: dict[str, np.ndarray] | None, cfg, bits: list[int],
            cache: LayerCache | None = None, *, layer_filter=None) -> SensitivityTable:
    """Quantize every target layer alone at every bit width in ``bits``; record the errors.

    ``cfg`` is the :class:`~shiftc.passes.shiftadd.ShiftAddConfig` (group, scale mode, damping, ...);
    ``hessians`` {input tensor: H} from shiftc/passes/calibration.py (None: data-free, then only
    weight errors exist and the calib sensitivity is the weight error).
    """
    cache = cache or LayerCache(None)
    weights = _weights(model, targets)
    layers = []
    t0 = time.perf_counter()
    todo = [t for t in targets if layer_filter is None or layer_filter(t.name)]
    progress = Counter(f"sensitivity ({len(bits)} bit widths)", len(todo))
    h_digests = {}
    for t in todo:
        w = weights[t.name]
        h = None if hessians is None else hessians.get(t.x)
        if t.x not in h_digests:
            h_digests[t.x] = digest(h)
        st = LayerStats(t.name, t.x, tuple(w.shape), group=cfg.group_for(t.name))
        wd = digest(w)
        w64 = w.astype(np.float64)
        if h is not None:
            st.out_ref = float(np.einsum("nk,nk->", w64 @ h, w64))
            st.shiftaddllm = shiftaddllm_score(w, h, cfg.damp)
        for b in bits:
            r = quantize_layer(t.name, w, h, b, cfg, cache, wd, h_digests[t.x])
            d = w64 - r.dequantize().astype(np.float64)
            st.w_err[b] = float(np.sum(d * d))
            st.out_err[b] = float(np.einsum("nk,nk->", d @ h, d)) if h is not None else st.w_err[b]
        layers.append(st)
        progress.update(extra=t.name)
    return SensitivityTable(layers, list(bits), cfg.group, cfg.scale_mode,
                            {"seconds": round(time.perf_counter() - t0, 1), "calibrated": hessians is not None})


def kendall_tau(a: np.ndarray, b: np.ndarray) -> dict:
    """Rank agreement of two sensitivity vectors (scipy.stats.kendalltau, tau-b)."""
    from scipy.stats import kendalltau

    r = kendalltau(np.asarray(a), np.asarray(b))
    return {"tau": float(r.statistic), "p_value": float(r.pvalue), "n": int(len(a))}


def rank_agreement(table: SensitivityTable, kinds=("calib", "hawq")) -> dict:
    """Kendall τ between the layer rankings of two sensitivity kinds, at each bit width and over
    all (layer, bit width) pairs."""
    m = {k: table.matrix(k) for k in kinds}
    a, b = kinds
    out = {f"{bw}-bit": kendall_tau(m[a][:, j], m[b][:, j]) for j, bw in enumerate(table.bits)}
    out["all"] = kendall_tau(m[a].ravel(), m[b].ravel())
    return out
