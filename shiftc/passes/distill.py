"""Distillation of a compressed model's scales against the fp32 model (shift-add and binarize).

After the shift-add pass (shiftc/passes/shiftadd.py) every BcqMatMul holds fixed ±1 planes and
power-of-two scales α [q, N, ng]; after the binarize pass (shiftc/passes/binarize.py) every
FdbMatMul holds fixed {0,1} planes, float16 scales α [q, N, ng] and offsets μ [N, ng]. When the
PyTorch model the ONNX file came from is available (HF folder or GGUF), this step fine-tunes α
(and μ) so that the compressed model's next-token distributions match the fp32 model's on
calibration text, then writes them back into the ONNX file. By default the planes stay as they
are; with ``planes`` (``--distill-planes``) they are trained too (quantization-aware training,
below).

Student: the fp32 model with each compressed Linear replaced by :class:`PlaneLinear`
(Ŵ = Σ_i α_i·s(B_i) + μ rebuilt from its parameters at every forward, from planes unpacked to float
once, with a hand-written backward for α and μ). The tied LM head becomes its own PlaneLinear (the
embedding lookup keeps the fp32 table, as in the ONNX graph). Teacher: the fp32 model; its logits
for every training window are computed once and kept (float16) when they fit ``cache_gb``.
Only α and μ receive gradients (AdamW, cosine-decayed learning rate). Shift-add scales must stay
sums of powers of two (the kernels shift, they do not multiply): the forward uses α rounded to the
op's scale grid (bcq.round_scales) and the gradient goes straight through the rounding to a float
latent α (straight-through estimator); the rounded α is what is written back, so the ONNX model
is exactly the trained student. FdbMatMul's α and μ are trained as floats and stored as float16.

Plane training: each PlaneLinear gets a float latent weight per weight, initialised to Ŵ (so the
nearest codes are the planes the pass chose). Every forward replaces each latent weight by the
nearest of its group's 2^q code values Σ_i α_i·s(c_i) + μ (α rounded as above), i.e. re-chooses the
planes; the gradient reaches the latent weight straight through (dW_latent = dŴ), with its own
learning rate ``plane_lr``, and α, μ exactly for the chosen codes. The codes of the
final latent weights are packed back into the planes initializer, so the ONNX model is again
exactly the student.

Loss per token t with teacher distribution p_t and student q_t over the vocabulary:
    KL_t      = Σ_v p_t(v) (log p_t(v) − log q_t(v))
    H(p_t, q_t) = −Σ_v p_t(v) log q_t(v) = H(p_t) + KL_t        (teacher–student cross-entropy)
    plain ``kl``: mean_t KL_t
    ``dad``     : mean_t w_t·KL_t,   w_t = H(p_t, q_t) / mean_s H(p_s, q_s)    (w without gradient)

Source: DB-LLM (Chen et al. 2024, "DB-LLM: Accurate Dual-Binarization for Efficient LLMs",
arXiv:2402.11960, §3.3 "Deviation-Aware Distillation"; code link github.com/Hon-Chen/DB-LLM). The
paper observes that a 2-bit model's predictions deviate most on *ambiguous* samples and proposes
to use the teacher–student entropy as the indicator of that ambiguity, re-weighting the
distillation loss so that such tokens get more emphasis. The weight above is that indicator: it
grows with the teacher's own uncertainty H(p_t) and with the student's deviation KL_t. Caveat: the
paper's equation itself could not be retrieved where this was written (only the abstract and
third-party summaries of §3.3 were; the reference repository's code was not available), so the
exact functional form (e.g. an exponent on the weight) is our reading of that description, not a
verified transcription. The normalisation by the batch mean is ours: it keeps the loss on the
scale of plain KL so that both use the same learning rate. An earlier version of this module used
w_t ∝ H(p_t)/H(q_t) (our own guess, not the paper's).

The default is plain ``kl``: on SmolLM2-135M FDB 2-bit at the same budget and seed it reached
perplexity 152.5 against dad's 159.6 (benchmarks/results/fdb_distill.json), and among six token
weightings compared on held-out calibration windows (benchmarks/bench_dad_weights.py) plain KL had
the lowest NLL.

Bounded by ``steps`` and ``minutes`` (whichever comes first); the learning rate follows a cosine
over whichever budget runs out first (:func:`schedule_progress`); progress and loss are printed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import BadInputError, UsageError
from .. import options as opts
from ..options import option
from ..progress import log
from . import bcq, fdb, ops

LOSSES = ("dad", "kl")


@dataclass
class DistillFields:
    """The distillation keys of the shift-add and binarize recipe sections (and their flags).
    Defaults: the settings measured on SmolLM2-135M (benchmarks/results/fdb_distill.json,
    shiftadd_distill.json): plain KL at lr 6e-4, one distinct window of 512 tokens per step (the
    evaluation's context: 200 steps of 512 tokens beat 400 of 256 on shift-add 3-bit, 42.32 vs
    43.67, in the same time)."""

    distill_steps: int = option(0, flag="--distill-steps", parse=opts.positive, metavar="N", enables=False,
                                help="after shift-add or --binarize: fine-tune the scales (binarize: and offsets) "
                                     "against the fp32 PyTorch model for N steps (shift-add scales stay powers of two)")
    distill_minutes: float | None = option(None, flag="--distill-minutes", parse=float, metavar="MIN", enables=False,
                                           help="distillation time bound; the learning rate decays over it (or over "
                                                "--distill-steps if they run out first)")
    distill_loss: str = option("kl", flag="--distill-loss", choices=LOSSES[::-1], enables=False,
                               help="kl: plain KL to the fp32 model (default); dad: KL re-weighted per token by the "
                                    "teacher-student cross-entropy H(p, q)")
    distill_source: str | None = option(None, flag="--distill-source", enables=False,
                                        help="HF folder or .gguf of the fp32 model (default: the export source)")
    distill_lr: float = 6e-4
    distill_windows: int = 0  # calibration windows; 0: one distinct window per step (<= 1024 and what the text holds)
    distill_window: int = 512  # tokens per training window
    distill_seed: int = 0
    distill_norms: bool = option(False, flag="--distill-norms", enables=False,
                                 help="also tune the RMSNorm gains during distillation (default off)")
    distill_planes: bool = option(False, flag="--distill-planes", enables=False,
                                  help="also train the bit planes during distillation (quantization-aware training: a "
                                       "latent float weight per weight, nearest code in each forward; default off)")
    distill_plane_lr: float = option(3e-4, flag="--distill-plane-lr", parse=float, metavar="LR", enables=False,
                                     help="learning rate of the latent weights with --distill-planes (default {default})")

    def distill_enabled(self) -> bool:
        return bool(self.distill_steps or self.distill_minutes)


def validate_fields(cfg: DistillFields, bad) -> None:
    """Check the distill_* values; ``bad(flag, message)`` raises the caller's usage error."""
    if not isinstance(cfg.distill_steps, int) or cfg.distill_steps < 0:
        bad("--distill-steps", f"must be an integer >= 0, got {cfg.distill_steps!r}")
    if cfg.distill_minutes is not None and not float(cfg.distill_minutes) > 0:
        bad("--distill-minutes", f"must be > 0, got {cfg.distill_minutes!r}")
    if cfg.distill_loss not in LOSSES:
        bad("--distill-loss", f"must be one of {', '.join(LOSSES)}, got {cfg.distill_loss!r}")
    if not float(cfg.distill_lr) > 0:
        bad("distill_lr", f"must be > 0, got {cfg.distill_lr!r}")
    if not float(cfg.distill_plane_lr) > 0:
        bad("--distill-plane-lr", f"must be > 0, got {cfg.distill_plane_lr!r}")
    for key, low in (("distill_windows", 0), ("distill_window", 2)):
        v = getattr(cfg, key)
        if not isinstance(v, int) or v < low:
            bad(key, f"must be an integer >= {low}, got {v!r}")


def run_configured(source: onnx.ModelProto, compressed: onnx.ModelProto, cfg: DistillFields, calib,
                   src: str) -> dict:
    """The pipeline's distillation step (shiftc compress --distill-steps): ``compressed`` is updated
    in place with the distilled scales; returns the report. Teacher from ``cfg.distill_source`` or
    the export source recorded in ``source``; training windows from the calibration corpus
    (``calib``: recipe.CalibConfig; Wikipedia when calibration is off)."""
    from .calibration import calibration_windows

    teacher = load_teacher(source, cfg.distill_source, src)
    ids = calibration_windows(source, corpus=calib.corpus if calib.corpus != "none" else "wikipedia",
                              windows=distill_windows(cfg), window=cfg.distill_window, tokenizer=calib.tokenizer,
                              model_path=src, at_most=not cfg.distill_windows,  # default: as many as the text holds
                              data=getattr(calib, "data", None))
    dcfg = DistillConfig(steps=cfg.distill_steps or 10**9, minutes=cfg.distill_minutes, loss=cfg.distill_loss,
                         lr=cfg.distill_lr, seed=cfg.distill_seed, norms=bool(cfg.distill_norms),
                         planes=bool(cfg.distill_planes), plane_lr=float(cfg.distill_plane_lr))
    distilled, report = distill(compressed, teacher, ids, dcfg)
    compressed.CopyFrom(distilled)
    return report


#: windows when distill_windows is 0 and only a time bound is given; the most distinct windows used
AUTO_WINDOWS, MAX_AUTO_WINDOWS = 512, 1024


def distill_windows(cfg: DistillFields) -> int:
    """Training windows: ``distill_windows``, or (0) one distinct window per step so that no window
    is seen twice (FDB 2-bit, 240 steps: 240 distinct windows reach perplexity 128.9 where 64 windows
    cycled reach 150.6; benchmarks/results/fdb_distill.json), capped at MAX_AUTO_WINDOWS (~262k
    tokens of the calibration split at 256 per window) and cycled beyond. Above the teacher-logit
    cache bound (4 GiB: ~170 windows of 256 tokens) the teacher is run at every step instead."""
    if cfg.distill_windows:
        return cfg.distill_windows
    return min(cfg.distill_steps or AUTO_WINDOWS, MAX_AUTO_WINDOWS)


@dataclass
class DistillConfig:
    steps: int = 200
    minutes: float | None = None
    loss: str = "kl"  # kl | dad
    norms: bool = False  # also tune the normalisation gains (written back to their fp32 initializers)
    lr: float = 1e-4
    planes: bool = False  # also train the planes (latent weights, nearest code per forward: QAT)
    plane_lr: float = 3e-4  # learning rate of the latent weights (benchmarks/results/shiftadd_planes_tuning.json)
    windows: int = 64  # calibration windows cycled through
    window: int = 256  # tokens per window
    batch: int = 1
    seed: int = 0
    cache_gb: float = 4.0  # teacher logits of all windows kept (float16) when they fit; 0: recompute each step
    source: str | None = None  # HF folder or .gguf (default: the source recorded at export)


def _torch():
    import torch

    return torch


_TORCH = _torch()


class _Reconstruct(_TORCH.autograd.Function):
    """Ŵ [N, ng·G] = Σ_i α_i ⊙ B_i + μ from fixed float 0/1 planes laid out [N, ng, q, G].

    Hand-written backward: dμ[n, g] = Σ_k dŴ[n, g, k] and dα_i[n, g] = Σ_k dŴ[n, g, k]·B_i[n, g, k]
    (one batched matrix-vector product over the N·ng groups), so autograd keeps no [q, N, K]
    temporaries and the planes (a buffer) are not copied per step."""

    @staticmethod
    def forward(ctx, scales, offsets, planes):
        n, ng, q, g = planes.shape
        w = offsets.detach().unsqueeze(-1).expand(n, ng, g).contiguous()
        for i in range(q):
            w.addcmul_(scales.detach()[i].unsqueeze(-1), planes[:, :, i, :])
        ctx.save_for_backward(planes)
        return w.view(n, ng * g)

    @staticmethod
    def backward(ctx, gw):
        (planes,) = ctx.saved_tensors
        n, ng, q, g = planes.shape
        g3 = gw.contiguous().view(n, ng, g)
        d_off = g3.sum(-1) if ctx.needs_input_grad[1] else None
        d_sc = None
        if ctx.needs_input_grad[0]:
            d = _TORCH.bmm(planes.view(n * ng, q, g), g3.view(n * ng, g, 1))  # [N·ng, q, 1]
            d_sc = d.view(n, ng, q).permute(2, 0, 1)
        return d_sc, d_off, None


class _NearestCode(_TORCH.autograd.Function):
    """Ŵ [N, ng·G]: each latent weight replaced by the nearest of its group's 2^q code values
    v_c = Σ_i α_i·P[c, i] + μ (P [2^q, q]: the ±1 signs or 0/1 bits of code c), i.e. the planes
    are re-chosen from the latent weights at every forward.

    Backward: straight-through to the latent weights (dW_latent = dŴ) and exact for the scales and
    offsets given the chosen codes: dα_i[n, g] = Σ_k dŴ[n, g, k]·P[c(n, g, k), i], dμ[n, g] = Σ_k dŴ."""

    @staticmethod
    def forward(ctx, latent, scales, offsets, patterns, coding):
        code, w = nearest_code(latent.detach(), scales.detach(), offsets.detach(), coding)
        ctx.save_for_backward(code.to(_TORCH.uint8), patterns)
        n, ng, g = latent.shape
        return w.view(n, ng * g)

    @staticmethod
    def backward(ctx, gw):
        code, patterns = ctx.saved_tensors
        n, ng, g = code.shape
        g3 = gw.contiguous().view(n, ng, g)
        d_sc = d_off = None
        if ctx.needs_input_grad[1]:
            code = code.long()
            d_sc = _TORCH.stack([(g3 * patterns[:, i][code]).sum(-1) for i in range(patterns.shape[1])])
        if ctx.needs_input_grad[2]:
            d_off = g3.sum(-1)
        return g3, d_sc, d_off, None, None


def nearest_code(latent, scales, offsets, coding: str):
    """(code int64 [N, ng, G], value [N, ng, G]): per latent weight the nearest of its group's
    code values (α [q, N, ng], μ [N, ng]), by the quantizers' own search with one group per row:
    bcq.nearest_codes for ±1 planes (no offset), fdb.nearest for 0/1 planes."""
    n, ng, g = latent.shape
    w, a = latent.reshape(n * ng, g), scales.reshape(scales.shape[0], n * ng)
    code, value = bcq.nearest_codes(w, a) if coding == "pm1" else fdb.nearest(w, a, offsets.reshape(n * ng))
    return code.view(n, ng, g), value.view(n, ng, g)


class PlaneLinear(_TORCH.nn.Module):
    """A Linear whose weight is Σ_i α_i·s(B_i) + μ: trainable scales (and offsets); planes fixed,
    or re-chosen from latent weights after :meth:`train_planes`.

    ``coding`` "01" (FdbMatMul: s(b) = b, float16 α and μ, both trained) or "pm1" (BcqMatMul:
    s(b) = 2b − 1, no offset). ``scale_mode`` "pow2" / "pow2x2" (BcqMatMul): the forward uses α
    rounded to the op's representable scales (bcq.round_scales) and the gradient passes straight
    through the rounding to the latent float α (straight-through estimator), so the trained model
    is exactly the one written back. None: α is used as it is (FdbMatMul).

    The planes are unpacked once into float32 [N, ceil(K/G), q, G], zero-padded to whole groups;
    each forward rebuilds Ŵ [N, ceil(K/G)·G] with q fused multiply-adds and multiplies it with the
    input zero-padded to the same width (cheaper than slicing Ŵ and its gradient every step)."""

    def __init__(self, planes01: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, group: int, bias=None,
                 coding: str = "01", scale_mode: str | None = None):
        torch = _torch()
        super().__init__()
        q, n, k = planes01.shape
        ng = -(-k // group)
        self.group, self.in_features, self.out_features = group, k, n
        self.coding, self.scale_mode = coding, scale_mode
        padded = np.zeros((n, ng, q, group), np.float32)
        for i in range(q):
            row = np.zeros((n, ng * group), np.float32)
            row[:, :k] = planes01[i] if coding == "01" else 2.0 * planes01[i] - 1.0
            padded[:, :, i, :] = row.reshape(n, ng, group)
        self.register_buffer("planes", torch.from_numpy(padded), persistent=False)
        self.pad = ng * group - k
        self.scales = torch.nn.Parameter(torch.as_tensor(scales.astype(np.float32)))
        if offsets is None:
            self.register_buffer("offsets", torch.zeros(n, ng), persistent=False)
        else:
            self.offsets = torch.nn.Parameter(torch.as_tensor(offsets.astype(np.float32)))
        self.bias = bias
        self.latent = None  # float [N, ng, G] once train_planes() is called

    def trainable(self) -> list:
        return [p for p in (self.scales, self.offsets) if isinstance(p, _TORCH.nn.Parameter)]

    def patterns(self):
        """[2^q, q]: the plane values of each code (±1 signs or 0/1 bits)."""
        torch = _torch()
        q = self.scales.shape[0]
        c = torch.arange(2**q)
        bits = ((c[:, None] >> torch.arange(q)[None, :]) & 1).float()
        return bits if self.coding == "01" else 2 * bits - 1

    def train_planes(self):
        """Make the planes trainable (quantization-aware training): a float latent weight per
        weight, initialised to Ŵ (so the nearest codes are the current planes), from which every
        forward re-chooses the nearest code (:class:`_NearestCode`). Returns the latent parameter."""
        torch = _torch()
        with torch.no_grad():
            w = _Reconstruct.apply(self.effective_scales(), self.offsets, self.planes)
        self.latent = torch.nn.Parameter(w.view(self.out_features, -1, self.group).clone())
        self.register_buffer("code_values", self.patterns(), persistent=False)
        self.planes = None  # rebuilt from the latent weights (planes01)
        return self.latent

    def planes01(self) -> np.ndarray:
        """uint8 0/1 [q, N, K]: the planes the module uses now."""
        torch = _torch()
        if self.latent is None:
            p = self.planes.permute(2, 0, 1, 3).reshape(self.planes.shape[2], self.out_features, -1)
            p = p if self.coding == "01" else (p + 1) * 0.5
        else:
            with torch.no_grad():
                code, _ = nearest_code(self.latent, self.effective_scales(), self.offsets, self.coding)
            q = self.code_values.shape[1]
            p = torch.stack([(code >> i) & 1 for i in range(q)]).view(q, self.out_features, -1)
        return p[..., :self.in_features].numpy().astype(np.uint8)

    def effective_scales(self):
        """α as the op stores it: rounded to powers of two (STE) for BcqMatMul, else α."""
        a = self.scales
        if self.scale_mode is None:
            return a
        return a + (bcq.round_scales(a.detach(), self.scale_mode)[0] - a).detach()

    def _weight_padded(self):
        if self.latent is not None:
            return _NearestCode.apply(self.latent, self.effective_scales(), self.offsets, self.code_values, self.coding)
        return _Reconstruct.apply(self.effective_scales(), self.offsets, self.planes)

    def weight_hat(self):
        """Ŵ [N, K]."""
        return self._weight_padded()[:, :self.in_features]

    def forward(self, x):
        F = _torch().nn.functional
        return F.linear(F.pad(x, (0, self.pad)) if self.pad else x, self._weight_padded(), self.bias)


def _w_cross_entropy(pt, lpt, lps, kl, progress):
    return -(pt * lps).sum(-1)  # teacher-student (cross-)entropy H(p_t, q_t) = H(p_t) + KL_t


#: re-weighted losses: name -> per-token weight (pt, log pt, log qt, KL_t, progress) -> w_t, used
#: without gradient and normalised to mean 1 per batch; progress is the fraction of the training
#: budget used (:func:`schedule_progress`), for weightings that change over training.
#: benchmarks/bench_dad_weights.py adds variants here.
TOKEN_WEIGHTS = {"dad": _w_cross_entropy}


def token_losses(t_logits, s_logits, kind: str, progress: float = 0.0):
    """(loss, mean KL) for logits [..., V] of teacher and student (see the module doc)."""
    torch = _torch()
    lpt = torch.log_softmax(t_logits.float(), -1)
    lps = torch.log_softmax(s_logits.float(), -1)
    pt = lpt.exp()
    kl = (pt * (lpt - lps)).sum(-1)
    if kind == "kl":
        return kl.mean(), kl.mean()
    with torch.no_grad():
        w = TOKEN_WEIGHTS[kind](pt, lpt, lps, kl, progress)
        w = w / w.mean().clamp_min(1e-12)
    return (w * kl).mean(), kl.mean()


#: ops whose scales can be distilled -> (suffix of the planes initializer, coding)
_OPS = {spec.name: (spec.initializers[0], spec.coding) for spec in (ops.FDB_MATMUL, ops.BCQ_MATMUL)}


def _plane_layers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """{torch module path: node} of the FdbMatMul / BcqMatMul nodes (the path is the planes
    initializer's name without its suffix, e.g. ``model.layers.0.mlp.up_proj`` or ``lm_head``)."""
    out = {}
    for n in model.graph.node:
        if n.op_type in _OPS:
            suffix = _OPS[n.op_type][0]
            out[n.input[1][: -len(suffix)] if n.input[1].endswith(suffix) else n.input[1]] = n
    return out


def _plane_linear(node: onnx.NodeProto, inits: dict, bias) -> PlaneLinear:
    """The student module of one FdbMatMul (planes, scales, offsets) or BcqMatMul (planes, exps)."""

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    coding = _OPS[node.op_type][1]
    planes = bcq.unpack_planes(numpy_helper.to_array(inits[node.input[1]]), a["in_features"])
    if node.op_type == ops.FDB_MATMUL.name:
        scales, offsets = numpy_helper.to_array(inits[node.input[2]]), numpy_helper.to_array(inits[node.input[3]])
        return PlaneLinear(planes, scales, offsets, int(a["group_size"]), bias, coding="01")
    exps = numpy_helper.to_array(inits[node.input[2]])
    mode = {t: m for m, t in bcq.SCALE_MODES.items()}[exps.shape[-1]]
    return PlaneLinear(planes, bcq.exps_to_alpha(exps), None, int(a["group_size"]), bias, coding="pm1", scale_mode=mode)


def build_student(teacher, model: onnx.ModelProto):
    """A copy of ``teacher`` with every FdbMatMul / BcqMatMul layer of ``model`` replaced by PlaneLinear."""
    import copy

    torch = _torch()
    student = copy.deepcopy(teacher)
    inits = {t.name: t for t in model.graph.initializer}
    modules = {}
    for path, node in _plane_layers(model).items():
        try:
            lin = student.get_submodule(path)
        except AttributeError:
            raise BadInputError(f"layer '{path}' (node '{node.name}') has no module of that name in the PyTorch model") from None
        if not isinstance(lin, torch.nn.Linear):
            raise BadInputError(f"layer '{path}' (node '{node.name}') is a {type(lin).__name__}, not a Linear")
        bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        pl = _plane_linear(node, inits, bias)
        if tuple(lin.weight.shape) != (pl.out_features, pl.in_features):
            raise BadInputError(f"layer '{path}': ONNX weight {(pl.out_features, pl.in_features)} vs PyTorch {tuple(lin.weight.shape)}")
        parent, _, name = path.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, name, pl)
        modules[path] = pl
    if not modules:
        raise BadInputError("the model has no FdbMatMul / BcqMatMul layer to distill (run --binarize or --shiftadd-bits first)")
    _tie_embedding(student, model, modules)
    for p in student.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        for p in m.trainable():
            p.requires_grad_(True)
    return student, modules


class TiedEmbedding(_TORCH.nn.Module):
    """An input embedding whose table is a PlaneLinear's Ŵ (a head tied to its embedding)."""

    def __init__(self, linear: PlaneLinear):
        super().__init__()
        self._linear = [linear]  # a plain list: the head's parameters are not registered twice

    def forward(self, ids):
        return _TORCH.nn.functional.embedding(ids, self._linear[0].weight_hat())


def _tie_embedding(student, model: onnx.ModelProto, modules: dict) -> None:
    """Where the ONNX model looks its embedding up in a head's planes (``BcqGather``, the tied
    embedding of the shift-add pass), the student's input embedding becomes that head's Ŵ, so the
    student trains the model that is deployed (the head's scales get both uses' gradients); where
    it looks it up in a table of its own (``QGather``), the student's table is that table's Ŵ."""
    by_planes = {n.input[1]: path for path, n in _plane_layers(model).items()}
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "BcqGather" and n.input[1] in by_planes:
            student.set_input_embeddings(TiedEmbedding(modules[by_planes[n.input[1]]]))
        elif n.op_type == ops.Q_GATHER.name:  # a table of its own, fixed: the student looks up its Ŵ
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            w = ops.qgather_weight(*(numpy_helper.to_array(inits[i]) for i in n.input[1:]), **a)
            emb = student.get_input_embeddings()
            emb.weight = _TORCH.nn.Parameter(_TORCH.from_numpy(np.ascontiguousarray(w)), requires_grad=False)


def trainable_norms(student, model: onnx.ModelProto) -> dict:
    """{name: parameter} of the student's normalisation weights (``*norm.weight``: RMSNorm /
    LayerNorm gains) that the ONNX graph holds as initializers of the same name and shape; marked
    trainable. Tuning them re-scales each compressed layer's input channels (their gains multiply
    the inputs of q/k/v and gate/up) at no cost at run time."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = {}
    for name, p in student.named_parameters():
        if name.endswith("norm.weight") and shapes.get(name) == tuple(p.shape):
            p.requires_grad_(True)
            out[name] = p
    return out


def write_back(model: onnx.ModelProto, modules: dict, norms: dict | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with each distilled layer's scales written back: FdbMatMul's scales and
    offsets as float16, BcqMatMul's as the int8 exponents of the rounded scales (what the student
    used in its forward); ``norms`` ({initializer name: parameter}) as float32."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    layers = _plane_layers(out)
    new = {}
    for path, m in modules.items():
        node = layers[path]
        if node.op_type == ops.FDB_MATMUL.name:
            new[node.input[2]] = m.scales.detach().numpy().astype(np.float16)
            new[node.input[3]] = m.offsets.detach().numpy().astype(np.float16)
        else:
            new[node.input[2]] = bcq.round_scales(m.scales.detach(), m.scale_mode)[1].numpy().astype(np.int8)
        if m.latent is not None:
            new[node.input[1]] = bcq.pack_planes(m.planes01())
    for name, p in (norms or {}).items():
        new[name] = p.detach().numpy().astype(np.float32)
    for t in out.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name], t.name))
    return out


def _teacher_logits(teacher, ids: np.ndarray, budget_bytes: float):
    """Teacher logits of every window, float16, computed once; None when they would not fit ``budget_bytes``."""
    torch = _torch()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if ids.size * vocab * 2 > budget_bytes:
        return None
    with torch.no_grad():
        return [teacher(input_ids=torch.as_tensor(ids[i:i + 1], dtype=torch.long)).logits[0].half() for i in range(len(ids))]


def dev_metrics(student, teacher, ids: np.ndarray) -> dict:
    """Development metrics over windows ``ids`` (no gradient): the mean per-token KL(teacher ||
    student) and the student's mean next-token NLL on the windows' own text (log perplexity)."""
    torch = _torch()
    kl = nll = 0.0
    n = 0
    with torch.no_grad():
        for i in range(len(ids)):
            x = torch.as_tensor(ids[i:i + 1], dtype=torch.long)
            s_logits = student(input_ids=x).logits
            kl += float(token_losses(teacher(input_ids=x).logits, s_logits, "kl")[1])
            lp = torch.log_softmax(s_logits[0, :-1].float(), -1)
            nll += float(-lp.gather(-1, x[0, 1:, None]).sum())
            n += x.shape[1] - 1
    return {"kl": kl / max(len(ids), 1), "nll": nll / max(n, 1)}


def schedule_progress(step: int, steps: int, elapsed_s: float, minutes: float | None) -> float:
    """Fraction of the training budget used before update ``step`` (0-based), in [0, 1]: the larger of
    the step fraction and, with a time budget, the time fraction. So ``--distill-minutes`` alone (or a
    step count the time budget cuts short) still decays the learning rate to ~0 by the deadline."""
    done = step / max(steps, 1)
    if minutes:
        done = max(done, elapsed_s / (60.0 * minutes))
    return min(done, 1.0)


def distill(model: onnx.ModelProto, teacher, ids: np.ndarray, cfg: DistillConfig,
            dev_ids: np.ndarray | None = None) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune the BcqMatMul scales / FdbMatMul scales and offsets of ``model`` (and, with
    ``cfg.norms``, its normalisation gains) against ``teacher`` (a torch causal LM) on token windows
    ``ids`` [W, T]; returns (updated model, report with the loss history).
    ``dev_ids``: held-out windows (of the calibration split) on which the mean KL and NLL are
    measured before and after (:func:`dev_metrics`), for tuning without touching the evaluation split."""
    torch = _torch()
    if cfg.loss != "kl" and cfg.loss not in TOKEN_WEIGHTS:
        raise UsageError(f"--distill-loss must be one of {', '.join(('kl', *TOKEN_WEIGHTS))}, got {cfg.loss!r}")
    if cfg.steps < 1 and not cfg.minutes:
        raise UsageError("--distill-steps must be >= 1")
    torch.manual_seed(cfg.seed)
    teacher.eval()
    student, modules = build_student(teacher, model)
    student.eval()  # no dropout; gradients still flow
    t_cache = _teacher_logits(teacher, ids, cfg.cache_gb * 2**30) if cfg.cache_gb else None
    dev_before = dev_metrics(student, teacher, dev_ids) if dev_ids is not None and len(dev_ids) else None
    norms = trainable_norms(student, model) if cfg.norms else {}
    groups = [{"params": [p for m in modules.values() for p in m.trainable()] + list(norms.values()), "base_lr": cfg.lr}]
    planes_before = {k: m.planes01() for k, m in modules.items()} if cfg.planes else {}
    if cfg.planes:
        groups.append({"params": [m.train_planes() for m in modules.values()], "base_lr": cfg.plane_lr})
    opt = torch.optim.AdamW([dict(g, lr=g["base_lr"]) for g in groups], weight_decay=0.0)
    order = np.random.default_rng(cfg.seed).permutation(len(ids))
    steps = max(cfg.steps, 1)
    deadline = time.perf_counter() + 60 * cfg.minutes if cfg.minutes else math.inf
    history, t0 = [], time.perf_counter()
    step = 0
    while step < steps and time.perf_counter() < deadline:
        sel = [int(order[(step * cfg.batch + i) % len(order)]) for i in range(cfg.batch)]
        x = torch.as_tensor(ids[sel], dtype=torch.long)
        if t_cache is not None:
            t_logits = torch.stack([t_cache[i] for i in sel])
        else:
            with torch.no_grad():  # rounded like the cache, so both paths give the same numbers
                t_logits = teacher(input_ids=x).logits.half()
        done = schedule_progress(step, steps, time.perf_counter() - t0, cfg.minutes)
        s_logits = student(input_ids=x).logits
        loss, kl = token_losses(t_logits, s_logits, cfg.loss, done)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:  # cosine decay over the step or time budget, whichever runs out first
            g["lr"] = g["base_lr"] * 0.5 * (1 + math.cos(math.pi * done))
        opt.step()
        step += 1
        history.append({"step": step, "loss": float(loss.detach()), "kl": float(kl.detach()), "s": round(time.perf_counter() - t0, 1)})
        if step == 1 or step % 10 == 0:
            log(f"distill ({cfg.loss}) step {step}/{steps}: loss {float(loss.detach()):.4f}, KL {float(kl.detach()):.4f}, "
                f"{time.perf_counter() - t0:.0f}s")
    report = {"loss": cfg.loss, "steps": step, "seconds": round(time.perf_counter() - t0, 1), "lr": cfg.lr,
              "seed": cfg.seed, "window": int(ids.shape[1]), "windows": int(len(ids)), "batch": cfg.batch,
              "layers": len(modules), "norms": len(norms),
              "planes": bool(cfg.planes), "plane_lr": cfg.plane_lr if cfg.planes else None, "teacher_cached": t_cache is not None, "history": history}
    if planes_before:
        changed = sum(int((m.planes01() != planes_before[k]).sum()) for k, m in modules.items())
        report["plane_bits_changed"] = changed / sum(v.size for v in planes_before.values())
    if dev_before is not None:
        dev_after = dev_metrics(student, teacher, dev_ids)
        report.update({f"dev_{k}_{when}": v[k] for when, v in (("before", dev_before), ("after", dev_after)) for k in v})
        report["dev_windows"] = int(len(dev_ids))
    return write_back(model, modules, norms), report


def load_teacher(model: onnx.ModelProto, source: str | None, model_path: str = "the model"):
    """The fp32 PyTorch model: ``source`` or the source recorded in the ONNX metadata at export."""
    from ..frontend import metadata as md
    from ..frontend.export import load_hf_model

    if source is None:
        info = md.get_info(model)
        source = info.get("tokenizer")  # the HF folder or .gguf the model was exported from
    if not source or not os.path.exists(str(source)):
        raise UsageError(f"--distill-source: the PyTorch model of '{model_path}' is needed (HF folder or .gguf)"
                         + (f"; recorded source '{source}' does not exist" if source else ""))
    teacher, task, _ = load_hf_model(str(source))
    if task != "causal-lm":
        raise UsageError(f"--distill-source '{source}': distillation needs a causal LM, got {task}")
    return teacher
