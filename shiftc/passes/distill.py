"""Deviation-aware distillation (DAD) of a binarized model's scales and offsets.

After the binarize pass (shiftc/passes/binarize.py) every FdbMatMul holds fixed {0,1} planes and
float16 scales α [q, N, ng] and offsets μ [N, ng]. When the PyTorch model the ONNX file came from
is available (HF folder or GGUF), this step fine-tunes α and μ — the planes stay as they are —
so that the binarized model's next-token distributions match the fp32 model's on calibration
text, then writes them back into the ONNX file (float16 again).

Student: the fp32 model with each binarized Linear replaced by :class:`FdbLinear`
(Ŵ = Σ_i α_i·B_i + μ rebuilt from its parameters at every forward, from planes unpacked to float
once, with a hand-written backward for α and μ). The tied LM head becomes its own FdbLinear (the
embedding lookup keeps the fp32 table, as in the ONNX graph). Teacher: the fp32 model; its logits
for every training window are computed once and kept (float16) when they fit ``cache_gb``.
Only α and μ receive gradients (AdamW, cosine-decayed learning rate).

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

Bounded by ``steps`` and ``minutes`` (whichever comes first); progress and loss are printed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BadInputError, UsageError
from ..progress import log
from . import bcq

LOSSES = ("dad", "kl")


@dataclass
class DistillConfig:
    steps: int = 200
    minutes: float | None = None
    loss: str = "dad"  # dad | kl
    lr: float = 1e-4
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


class FdbLinear(_TORCH.nn.Module):
    """A Linear whose weight is Σ_i α_i·B_i + μ: fixed {0,1} planes, trainable scales/offsets.

    The planes are unpacked once into float32 [N, ceil(K/G), q, G], zero-padded to whole groups;
    each forward rebuilds Ŵ [N, ceil(K/G)·G] with q fused multiply-adds and multiplies it with the
    input zero-padded to the same width (cheaper than slicing Ŵ and its gradient every step)."""

    def __init__(self, planes01: np.ndarray, scales: np.ndarray, offsets: np.ndarray, group: int, bias=None):
        torch = _torch()
        super().__init__()
        q, n, k = planes01.shape
        ng = -(-k // group)
        self.group, self.in_features, self.out_features = group, k, n
        padded = np.zeros((n, ng, q, group), np.float32)
        for i in range(q):
            row = np.zeros((n, ng * group), np.float32)
            row[:, :k] = planes01[i]
            padded[:, :, i, :] = row.reshape(n, ng, group)
        self.register_buffer("planes", torch.from_numpy(padded), persistent=False)
        self.pad = ng * group - k
        self.scales = torch.nn.Parameter(torch.as_tensor(scales.astype(np.float32)))
        self.offsets = torch.nn.Parameter(torch.as_tensor(offsets.astype(np.float32)))
        self.bias = bias

    def weight_hat(self):
        """Ŵ [N, K]."""
        return _Reconstruct.apply(self.scales, self.offsets, self.planes)[:, :self.in_features]

    def forward(self, x):
        F = _torch().nn.functional
        w = _Reconstruct.apply(self.scales, self.offsets, self.planes)
        return F.linear(F.pad(x, (0, self.pad)) if self.pad else x, w, self.bias)


def token_losses(t_logits, s_logits, kind: str):
    """(loss, mean KL) for logits [..., V] of teacher and student (see the module doc)."""
    torch = _torch()
    lpt = torch.log_softmax(t_logits.float(), -1)
    lps = torch.log_softmax(s_logits.float(), -1)
    pt = lpt.exp()
    kl = (pt * (lpt - lps)).sum(-1)
    if kind == "kl":
        return kl.mean(), kl.mean()
    with torch.no_grad():
        w = -(pt * lps).sum(-1)  # teacher-student (cross-)entropy H(p_t, q_t) = H(p_t) + KL_t
        w = w / w.mean().clamp_min(1e-12)
    return (w * kl).mean(), kl.mean()


def _fdb_layers(model: onnx.ModelProto) -> dict[str, tuple]:
    """{torch module path: (node, planes name, scales name, offsets name)} of the FdbMatMul nodes."""
    out = {}
    for n in model.graph.node:
        if n.op_type == "FdbMatMul":
            prefix = n.input[1][: -len(".fdb_planes")] if n.input[1].endswith(".fdb_planes") else n.input[1]
            out[prefix] = (n, *n.input[1:4])
    return out


def build_student(teacher, model: onnx.ModelProto):
    """A copy of ``teacher`` with every layer binarized in ``model`` replaced by FdbLinear."""
    import copy

    torch = _torch()
    from onnx import helper

    student = copy.deepcopy(teacher)
    inits = {t.name: t for t in model.graph.initializer}
    modules = {}
    for path, (node, pn, sn, on) in _fdb_layers(model).items():
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        try:
            lin = student.get_submodule(path)
        except AttributeError:
            raise BadInputError(f"layer '{path}' (node '{node.name}') has no module of that name in the PyTorch model") from None
        if not isinstance(lin, torch.nn.Linear):
            raise BadInputError(f"layer '{path}' (node '{node.name}') is a {type(lin).__name__}, not a Linear")
        planes = bcq.unpack_planes(numpy_helper.to_array(inits[pn]), a["in_features"])
        scales, offsets = numpy_helper.to_array(inits[sn]), numpy_helper.to_array(inits[on])
        if tuple(lin.weight.shape) != (planes.shape[1], planes.shape[2]):
            raise BadInputError(f"layer '{path}': ONNX weight {planes.shape[1:]} vs PyTorch {tuple(lin.weight.shape)}")
        bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        fl = FdbLinear(planes, scales, offsets, int(a["group_size"]), bias)
        parent, _, name = path.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, name, fl)
        modules[path] = fl
    if not modules:
        raise BadInputError("the model has no FdbMatMul layer to distill (run --binarize first)")
    for p in student.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.scales.requires_grad_(True)
        m.offsets.requires_grad_(True)
    return student, modules


def write_back(model: onnx.ModelProto, modules: dict) -> onnx.ModelProto:
    """A copy of ``model`` with each distilled layer's scales/offsets (float16) replaced."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    layers = _fdb_layers(out)
    new = {}
    for path, m in modules.items():
        _, _, sn, on = layers[path]
        new[sn] = m.scales.detach().numpy().astype(np.float16)
        new[on] = m.offsets.detach().numpy().astype(np.float16)
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


def mean_kl(student, teacher, ids: np.ndarray) -> float:
    """Mean per-token KL(teacher || student) over windows ``ids`` (no gradient): a development metric."""
    torch = _torch()
    tot = 0.0
    with torch.no_grad():
        for i in range(len(ids)):
            x = torch.as_tensor(ids[i:i + 1], dtype=torch.long)
            tot += float(token_losses(teacher(input_ids=x).logits, student(input_ids=x).logits, "kl")[1])
    return tot / max(len(ids), 1)


def distill(model: onnx.ModelProto, teacher, ids: np.ndarray, cfg: DistillConfig,
            dev_ids: np.ndarray | None = None) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune the FdbMatMul scales/offsets of ``model`` against ``teacher`` (a torch causal LM)
    on token windows ``ids`` [W, T]; returns (updated model, report with the loss history).
    ``dev_ids``: held-out windows (of the calibration split) on which the mean KL is measured before
    and after, for tuning without touching the evaluation split."""
    torch = _torch()
    if cfg.loss not in LOSSES:
        raise UsageError(f"--distill-loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.steps < 1 and not cfg.minutes:
        raise UsageError("--distill-steps must be >= 1")
    torch.manual_seed(cfg.seed)
    teacher.eval()
    student, modules = build_student(teacher, model)
    student.eval()  # no dropout; gradients still flow
    t_cache = _teacher_logits(teacher, ids, cfg.cache_gb * 2**30) if cfg.cache_gb else None
    dev_before = mean_kl(student, teacher, dev_ids) if dev_ids is not None and len(dev_ids) else None
    params = [p for m in modules.values() for p in (m.scales, m.offsets)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
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
        s_logits = student(input_ids=x).logits
        loss, kl = token_losses(t_logits, s_logits, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:  # cosine decay over the step budget
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        step += 1
        history.append({"step": step, "loss": float(loss.detach()), "kl": float(kl.detach()), "s": round(time.perf_counter() - t0, 1)})
        if step == 1 or step % 10 == 0:
            log(f"distill ({cfg.loss}) step {step}/{steps}: loss {float(loss.detach()):.4f}, KL {float(kl.detach()):.4f}, "
                f"{time.perf_counter() - t0:.0f}s")
    report = {"loss": cfg.loss, "steps": step, "seconds": round(time.perf_counter() - t0, 1), "lr": cfg.lr,
              "seed": cfg.seed, "window": int(ids.shape[1]), "windows": int(len(ids)), "batch": cfg.batch,
              "layers": len(modules), "teacher_cached": t_cache is not None, "history": history}
    if dev_before is not None:
        report["dev_kl_before"] = dev_before
        report["dev_kl_after"] = mean_kl(student, teacher, dev_ids)
        report["dev_windows"] = int(len(dev_ids))
    return write_back(model, modules), report


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
