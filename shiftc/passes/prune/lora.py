"""LoRA on the PyTorch decoder: the LoRAPrune criterion and recovery fine-tuning after pruning.

Used for causal LMs of the Llama family exported by shiftc (``shiftc export`` of a GGUF file or a
Hugging Face folder): the torch model is rebuilt from the export source recorded in the ONNX
metadata, LoRA adapters (rank r, ``W + (α/r)·B·A``, B = 0 at the start) are attached to every
q/k/v/o/gate/up/down projection, and the adapters are trained on windows of the Wikipedia
*calibration* split (never the held-out eval split) with the base weights frozen.

    LoRAPrune (``--prune-criterion lorapr``), per step t of the fine-tune:
        G      = ∂B·A + B·∂A − ∂B·∂A          LoRA's own gradients, an estimate of ∂L/∂W
        I_t    = |G ⊙ (W + (α/r)·B·A)|        elementwise importance
        Ī      = β·Ī + (1 − β)·I_t             moving average (β = 0.9)
        unit score = Σ over the group's layers of (Σ of Ī over the unit's slice) / (its mean over
                     the layer's units)        (the same rule as criteria.unit_scores)
        removed units per group = round(s(t) · final count), s(t) = 1 − (1 − t/T_p)³ (cubic),
                     T_p = ``prune_fraction`` of the fine-tune; pruned units are masked (their
                     projection outputs multiplied by 0), so the fine-tune adapts to the pruned net
    At the end LoRA is merged into W, the merged weights replace the ONNX initializers
    ``<prefix>.weight.T`` and the moving-average importance (masked units set to 0), keyed by
    those names, drives the ONNX surgery (:class:`~.prune.PrunePass`, criterion ``lorapr``).

    Recovery (``--recover-steps S`` / ``--recover-minutes M`` with magnitude or activation):
    the ONNX pass chooses the units; the same LoRA fine-tune (same data, steps, seed) runs with
    those units masked from the first step; LoRA is merged and the same plan is applied to the
    merged weights.

The final counts per group (KV groups per layer, MLP channels per layer) come from the ONNX
pass's budget (:meth:`~.prune.PrunePass.counts`), so torch masks and ONNX surgery agree.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import UsageError
from ...frontend import metadata as md
from ...progress import log

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MLP_ROOT = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight\.T$")
_HEAD_ROOT = re.compile(r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight\.T$")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    steps: int | None = None  # optimizer steps                  (--recover-steps)
    minutes: float | None = None  # wall-clock budget of the fine-tune (--recover-minutes)
    lr: float = 3e-4
    window: int = 128  # tokens per training window
    batch: int = 1  # windows per step
    seed: int = 0
    beta: float = 0.9  # moving average of the LoRAPrune importance
    prune_fraction: float = 0.75  # share of the fine-tune over which the pruning ratio rises (lorapr)
    threads: int | None = None


def export_source(model: onnx.ModelProto, source: str | None = None, flag: str = "--prune-criterion lorapr") -> str:
    """The GGUF file / HF folder ``model`` was exported from (the tokenizer source shiftc records)."""
    info = md.get_info(model)
    src = source or info.get("tokenizer")
    if info.get("task") != "causal-lm" or "decoder" not in info:
        raise UsageError(f"{flag}: LoRA fine-tuning needs a causal LM exported by shiftc (task "
                         f"'{info.get('task')}'); use --prune-criterion magnitude|activation without recovery")
    if not src or not os.path.exists(src):
        raise UsageError(f"{flag}: needs the PyTorch model the ONNX was exported from (the GGUF file or Hugging "
                         f"Face folder recorded in its metadata), and '{src}' does not exist here")
    return src


def load_torch_decoder(model: onnx.ModelProto, source: str | None = None, flag: str = "--prune-criterion lorapr"):
    """The torch ``*ForCausalLM`` of ``model``'s export source, checked against the ONNX weights."""
    import torch

    from ...frontend.export import load_hf_model

    src = export_source(model, source, flag)
    tm, task, _ = load_hf_model(src)
    if task != "causal-lm":
        raise UsageError(f"{flag}: '{src}' is a {task} model, not a causal LM")
    inits = {t.name: t for t in model.graph.initializer}
    sd = tm.state_dict()
    for i in (0, tm.config.num_hidden_layers - 1):
        for p in PROJ:
            key = f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}"
            t = inits.get(f"{key}.weight.T")
            w = sd.get(f"{key}.weight")
            if t is None or w is None or tuple(t.dims) != tuple(w.shape[::-1]):
                raise UsageError(f"{flag}: the ONNX weight '{key}.weight.T' does not match '{src}' (was the model "
                                 "already pruned or compressed? prune the exported fp32 model)")
    x = numpy_helper.to_array(inits["model.layers.0.self_attn.q_proj.weight.T"])
    if not np.allclose(x, sd["model.layers.0.self_attn.q_proj.weight"].T.numpy(), atol=1e-5):
        raise UsageError(f"{flag}: the ONNX weights differ from '{src}'; prune the model exported from it")
    for p in tm.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    return tm


class LoraLinear:
    """Adapter state of one projection (kept outside nn.Module so the HF model stays unchanged)."""

    def __init__(self, linear, rank: int, alpha: float, gen):
        import torch

        out_f, in_f = linear.weight.shape
        self.linear = linear
        self.scale = alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f))
        self.B = torch.nn.Parameter(torch.zeros(out_f, rank))
        self.mask = None  # [out] multiplicative mask of output channels (pruned units -> 0)
        self.imp = None  # moving-average importance [out, in] (LoRAPrune)
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, _mod, inputs, out):
        y = out + (inputs[0] @ self.A.t() @ self.B.t()) * self.scale
        return y * self.mask if self.mask is not None else y

    def delta(self):
        return (self.B @ self.A) * self.scale

    def importance(self):
        """|G ⊙ (W + BA)| with G = ∂B·A + B·∂A − ∂B·∂A (from the last backward pass)."""
        import torch

        with torch.no_grad():
            gA, gB = self.A.grad, self.B.grad
            if gA is None or gB is None:
                return None
            g = gB @ self.A + self.B @ gA - gB @ gA
            return (g * (self.linear.weight + self.delta())).abs()

    def merge(self):
        import torch

        with torch.no_grad():
            self.linear.weight += self.delta()
        self.handle.remove()


def _units(tm) -> dict:
    c = tm.config
    n_heads = c.num_attention_heads
    kvh = getattr(c, "num_key_value_heads", None) or n_heads
    d = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return {"kvh": kvh, "group": n_heads // kvh, "head_dim": d, "inter": c.intermediate_size}


def _slices(kind: str, p: str, u: dict):
    """[(projection, axis of torch W [out, in], elements per unit)] of a group kind."""
    d, gsz = u["head_dim"], u["group"]
    if kind == "mlp":
        return [(f"{p}.mlp.gate_proj", 0, 1), (f"{p}.mlp.up_proj", 0, 1), (f"{p}.mlp.down_proj", 1, 1)]
    return [(f"{p}.self_attn.q_proj", 0, gsz * d), (f"{p}.self_attn.k_proj", 0, d),
            (f"{p}.self_attn.v_proj", 0, d), (f"{p}.self_attn.o_proj", 1, gsz * d)]


def _unit_scores(kind: str, p: str, u: dict, imp: dict) -> np.ndarray:
    """Score per unit, the rule of criteria.unit_scores (per-layer sums normalised by their mean)."""
    total = None
    for name, axis, per in _slices(kind, p, u):
        x = imp[name].float().sum(dim=1 - axis).double().numpy()
        s = x.reshape(-1, per).sum(axis=1)
        m = s.mean()
        s = s / m if m > 0 else s
        total = s if total is None else total + s
    return total


def _set_masks(adapters: dict, kind: str, p: str, u: dict, removed) -> None:
    import torch

    removed = np.asarray(sorted(removed), np.int64)
    if kind == "mlp":
        m = torch.ones(u["inter"])
        m[removed] = 0
        adapters[f"{p}.mlp.gate_proj"].mask = m
        adapters[f"{p}.mlp.up_proj"].mask = m
    else:
        d, gsz = u["head_dim"], u["group"]
        keep = torch.ones(u["kvh"])
        keep[removed] = 0
        adapters[f"{p}.self_attn.q_proj"].mask = keep.repeat_interleave(gsz * d)
        adapters[f"{p}.self_attn.k_proj"].mask = keep.repeat_interleave(d)
        adapters[f"{p}.self_attn.v_proj"].mask = keep.repeat_interleave(d)


def group_targets(counts: dict) -> list[tuple[str, str, int]]:
    """[(kind, torch layer prefix, units to remove)] from PrunePass.counts ({root: (kind, units, n)})."""
    out = []
    for root, (_kind, _units_n, n) in counts.items():
        m = _MLP_ROOT.match(root) or _HEAD_ROOT.match(root)
        if m is None or not n:
            continue
        out.append(("mlp" if _MLP_ROOT.match(root) else "heads", f"model.layers.{m.group(1)}", n))
    return out


def finetune(onnx_model: onnx.ModelProto, cfg: LoraConfig, targets: list, *, fixed: dict | None = None,
             source: str | None = None, flag: str = "--prune-criterion lorapr", model_path: str = "the model"):
    """LoRA fine-tune of the torch decoder with pruning masks; returns (merged state, scores, removed, log).

    ``targets``: [(kind, layer prefix, units to remove)]. ``fixed``: {(kind, prefix): removed units}
    masked from the start (recovery after magnitude/activation); without it the units are chosen
    by the LoRAPrune importance on the cubic schedule. ``scores``: {ONNX weight name: float32
    importance [in, out]} (LoRAPrune; masked units 0), ``removed``: {(kind, prefix): units}.
    """
    import torch

    from ..calibration import calibration_windows

    if cfg.steps is None and cfg.minutes is None:
        raise UsageError(f"{flag}: give a fine-tune budget, --recover-steps S or --recover-minutes M")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tm = load_torch_decoder(onnx_model, source, flag)
    _trim()
    u = _units(tm)
    gen = torch.Generator().manual_seed(cfg.seed)
    mods = dict(tm.named_modules())
    adapters = {n: LoraLinear(m, cfg.rank, cfg.alpha, gen) for n, m in mods.items() if n.split(".")[-1] in PROJ}
    params = [q for a in adapters.values() for q in (a.A, a.B)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    # training windows: the calibration split only (the eval split stays held out)
    n_win = max(8, min(1024, (cfg.steps or 256) * cfg.batch))
    windows = calibration_windows(onnx_model, split="calib", windows=n_win, window=cfg.window, model_path=model_path)
    order = np.random.default_rng(cfg.seed).permutation(len(windows))
    removed = {(k, p): np.asarray(sorted(fixed[(k, p)]), np.int64) for k, p, _ in targets} if fixed else \
        {(k, p): np.zeros(0, np.int64) for k, p, _ in targets}
    for (k, p), r in removed.items():
        _set_masks(adapters, k, p, u, r)
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else None
    t0 = time.perf_counter()
    history = []
    step = 0
    tm.train()
    while True:
        elapsed = time.perf_counter() - t0
        if (cfg.steps is not None and step >= cfg.steps) or (budget_s is not None and elapsed >= budget_s):
            break
        idx = [order[(step * cfg.batch + b) % len(order)] for b in range(cfg.batch)]
        ids = torch.from_numpy(windows[idx])
        out = tm(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if not fixed:  # LoRAPrune: importance from this step's LoRA gradients, moving average
            for a in adapters.values():
                i_t = a.importance()
                if i_t is not None:  # kept in bfloat16: float32 range at half the memory
                    a.imp = (i_t if a.imp is None else cfg.beta * a.imp.float() + (1 - cfg.beta) * i_t).bfloat16()
        opt.step()
        step += 1
        progress = max(step / cfg.steps if cfg.steps else 0.0,
                       (time.perf_counter() - t0) / budget_s if budget_s else 0.0)
        if not fixed:  # the cubic schedule: the share of each target's units removed by now
            _prune_to(1.0 - (1.0 - min(progress / cfg.prune_fraction, 1.0)) ** 3, targets, removed, u, adapters)
        history.append(round(float(out.loss.detach()), 4))
        if step % 10 == 0:
            log(f"LoRA fine-tune step {step}: loss {np.mean(history[-10:]):.3f}")
    if not fixed:  # budget ended before the schedule did: finish the schedule at the last scores
        _prune_to(1.0, targets, removed, u, adapters)
    scores = _importance(adapters, removed, u) if not fixed else {}
    for a in adapters.values():
        a.merge()
    merged = {}
    for n, a in adapters.items():  # the torch weight is released as soon as it is copied out
        merged[f"{n}.weight.T"] = a.linear.weight.detach().t().contiguous().numpy()
        a.linear.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    info = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "rank": cfg.rank, "lr": cfg.lr,
            "window": cfg.window, "batch": cfg.batch, "seed": cfg.seed,
            "loss_first10": round(float(np.mean(history[:10])), 4) if history else None,
            "loss_last10": round(float(np.mean(history[-10:])), 4) if history else None}
    del tm, adapters, opt
    _trim()
    return merged, scores, removed, info


def _prune_to(share: float, targets: list, removed: dict, u, adapters: dict) -> None:
    """Mask more units where fewer than ``share`` of a target's are masked: the lowest LoRAPrune
    importance first; masked units stay masked."""
    imp = {n: a.imp for n, a in adapters.items()}
    for k, p, n in targets:
        want = int(round(share * n))
        if want > len(removed[(k, p)]):
            sc = _unit_scores(k, p, u, imp)
            sc[removed[(k, p)]] = -np.inf
            removed[(k, p)] = np.sort(np.argsort(sc, kind="stable")[:want])
            _set_masks(adapters, k, p, u, removed[(k, p)])


def _importance(adapters: dict, removed: dict, u) -> dict:
    """{ONNX weight name: float32 importance [in, out]} from the adapters' moving averages (taken
    from them), the removed units' entries 0."""
    scores = {}
    for name, a in adapters.items():
        if a.imp is not None:
            scores[f"{name}.weight.T"] = a.imp
            a.imp = None
    for (k, p), r in removed.items():
        for name, axis, per in _slices(k, p, u):
            sl = np.concatenate([np.arange(x * per, (x + 1) * per) for x in r]) if len(r) else np.zeros(0, np.int64)
            s = scores[f"{name}.weight.T"]
            if axis == 0:
                s[sl] = 0
            else:
                s[:, sl] = 0
    for n in list(scores):  # one weight at a time (memory)
        scores[n] = scores[n].t().float().contiguous().numpy()
    return scores


def _trim() -> None:
    """Return freed heap to the system (loading a GGUF file leaves large freed blocks behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def with_weights(model: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """Copy of ``model`` with the initializers named in ``weights`` replaced (same shapes).

    ``weights`` is emptied on the way (each array freed once written: one model copy at a time)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in weights:
            w = weights.pop(t.name)
            if tuple(t.dims) != tuple(w.shape):
                raise RuntimeError(f"fine-tuned weight '{t.name}' has shape {w.shape}, the model {tuple(t.dims)}")
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), t.name))
    return out
