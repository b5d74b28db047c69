"""HAWQ-V2 Hessian traces: Tr(∇²_{W_i} L) per quantized layer, by Hutchinson's estimator in PyTorch.

For a Rademacher vector v (entries ±1 with probability ½), E[vᵀHv] = Tr(H). One probe draws an
independent v_i for every layer's weight W_i at once and computes the Hessian-vector product
Hv = ∇(∇L · v) by double backpropagation; the per-layer parts v_iᵀ(Hv)_i are unbiased estimates of
the diagonal blocks' traces Tr(H_ii) (the off-diagonal blocks vanish in expectation because the
v_i are independent). L is the mean next-token cross-entropy of the fp32 PyTorch model on one
calibration window; each probe takes the next window, so the estimate averages over the data too.

Stopping rule (HAWQ-V2's): after at least ``min_probes`` probes, stop when the running mean of the
total trace Σ_i Tr(H_ii) changes by less than ``tol`` (relative) from one probe to the next, or
at ``max_probes``. The standard error of each layer's mean is reported beside it.

The PyTorch model comes from the source the ONNX file was exported from (a Hugging Face folder
or a GGUF file, loaded to fp32 by transformers; shiftc/frontend/export.py). Layer names are
the shift-add pass's: ``<module>.weight.T`` is the parameter ``<module>.weight``; ``lm_head`` is the
LM head (a tied head is untied for the estimate, so its trace is the head's alone, not the
embedding's).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ...errors import UsageError
from ...progress import Counter


def _param_name(layer: str) -> str:
    if layer == "lm_head":
        return "lm_head.weight"
    return layer[: -len(".T")] if layer.endswith(".weight.T") else layer


def load_torch_model(source: str):
    from ...frontend.export import load_hf_model

    model, task, _ = load_hf_model(source)
    if task != "causal-lm":
        raise UsageError(f"--sensitivity hawq: '{source}' is a {task} model; the HAWQ estimate needs a causal LM")
    return model


def hessian_traces(model, layers: list[str], windows: np.ndarray, *, tol: float = 0.02, min_probes: int = 4,
                   max_probes: int = 32, seed: int = 0) -> dict:
    """{"traces": {layer: Tr}, "sem": {layer: standard error}, "probes": k, "converged": bool,
    "history": [running mean of the total trace], "seconds"} for the torch causal LM ``model``."""
    import torch

    if min_probes < 2 or max_probes < min_probes:
        raise UsageError(f"--hawq-probes: need 2 <= min_probes <= max_probes (got {min_probes}, {max_probes})")
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight and "lm_head" in layers:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())  # untie: the head's own Hessian block
    named = dict(model.named_parameters())
    params = []
    for ly in layers:
        p = named.get(_param_name(ly))
        if p is None:
            raise UsageError(f"--sensitivity hawq: layer '{ly}' has no parameter '{_param_name(ly)}' in the PyTorch "
                             f"model (is the ONNX file exported from this source?)")
        params.append(p)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    samples = []  # [k][layer]
    history = []
    t0 = time.perf_counter()
    progress = Counter("hawq hessian traces", max_probes)
    converged = False
    for k in range(max_probes):
        ids = torch.as_tensor(np.asarray(windows[k % len(windows)], np.int64))[None]
        loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
        gv = sum((g * v).sum() for g, v in zip(grads, vs))
        hv = torch.autograd.grad(gv, params)
        samples.append([float((h * v).sum()) for h, v in zip(hv, vs)])
        del grads, gv, hv, loss
        history.append(float(np.sum(np.mean(samples, axis=0))))
        progress.update(extra=f"total trace {history[-1]:.4g}")
        if k + 1 >= min_probes and abs(history[-1] - history[-2]) <= tol * abs(history[-2]):
            converged = True
            break
    s = np.array(samples)
    mean = s.mean(0)
    sem = s.std(0, ddof=1) / math.sqrt(len(s))
    for p in model.parameters():
        p.requires_grad_(False)
    return {"traces": dict(zip(layers, map(float, mean))), "sem": dict(zip(layers, map(float, sem))),
            "probes": len(s), "converged": converged, "tol": tol, "history": history,
            "tokens_per_probe": int(np.asarray(windows).shape[1]), "seconds": round(time.perf_counter() - t0, 1)}


def attach(table, result: dict) -> None:
    """Store Hutchinson traces in a :class:`~.sensitivity.SensitivityTable` (enables kind "hawq")."""
    for ly in table.layers:
        ly.hessian_trace = result["traces"][ly.name]
        ly.hessian_trace_sem = result["sem"][ly.name]
    table.info["hawq"] = {k: result[k] for k in ("probes", "converged", "tol", "history", "tokens_per_probe", "seconds")}
