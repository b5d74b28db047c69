"""End-to-end sensitivity through ONNX Runtime (no PyTorch): the model's output change when one
layer alone is quantized.

For each layer i and width b, the model runs on calibration windows with W_i replaced by
Q_b(W_i) (every other layer fp32), and the sensitivity is the mean over predicted tokens of
KL(p_fp32 ‖ p_quantized) of the next-token distributions — zero for a lossless layer, never
negative, and comparable across layers because it is measured where the loss is.

How: a copy of the graph exposes each target weight as an overridable graph input (its
initializer stays as the default value), so one ONNX Runtime session serves every (layer,
width): a run feeds only the replaced weight. A tied LM head (MatMul with Transpose(embedding))
gets its own [K, N] weight input so that the embedding Gather keeps the fp32 table.
Cost: layers × widths forward passes over ``windows`` × ``window`` tokens.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...progress import Counter


def _exposed(model: onnx.ModelProto, targets, in_place: bool = False) -> tuple[onnx.ModelProto, dict[str, tuple[str, bool]]]:
    """(model copy — or the model itself with ``in_place`` — , {layer: (input name, feed transposed [K, N])})."""
    if in_place:
        out = model
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    nodes = {(n.name or n.output[0]): n for n in g.node}
    feeds = {}
    have_inputs = {i.name for i in g.input}
    for t in targets:
        node = nodes[t.node]
        if t.transposed:  # MatMul(x, Wᵀ) / Gemm(x, Wᵀ): override the initializer itself
            name, as_t = t.weight, True
        elif node.op_type == "Gemm":  # Gemm with transB: W [N, K]
            name, as_t = t.weight, False
        else:  # tied head: MatMul(x, Transpose(E)) -> MatMul(x, own [K, N] weight)
            name, as_t = f"{t.name}.e2e.T", True
            w = numpy_helper.to_array(inits[t.weight])
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
            node.input[1] = name
        if name not in have_inputs:
            dims = [int(d) for d in (inits[name].dims if name in inits else g.initializer[-1].dims)]
            g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
            have_inputs.add(name)
        feeds[t.name] = (name, as_t)
    from ..graph import remove_dead

    remove_dead(g)
    return out, feeds


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def output_kl(model: onnx.ModelProto, targets, w_hat, windows: np.ndarray, widths: list[int], *,
              threads: int = 1, done: dict | None = None, on_layer=None,
              in_place: bool = False) -> tuple[dict[str, dict[int, float]], dict]:
    """{layer: {bits: mean KL}} with ``w_hat(name, bits) -> Ŵ [N, K]``; and run info. Layers in ``done``
    (an earlier, interrupted run) are kept; ``on_layer(result so far)`` is called after each layer.
    ``in_place`` rewrites ``model`` itself instead of a copy (saves one model's memory)."""
    import onnxruntime as ort

    from ..calibration import _decoder_feeds

    out: dict[str, dict[int, float]] = {k: dict(v) for k, v in (done or {}).items()}
    t0 = time.perf_counter()
    if all(b in out.get(t.name, {}) for t in targets for b in widths):  # all known (cached): no session
        return out, {"windows": int(len(windows)), "window": int(windows.shape[1]), "seconds": 0.0, "cached": True}
    base_feeds = [_decoder_feeds(model, w[None]) for w in windows]
    probe, feeds = _exposed(model, targets, in_place)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the overridable initializers are intended: no warning per weight
    data = probe.SerializeToString()
    del probe
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    del data
    ref = [_log_softmax(sess.run(["logits"], f)[0][0, :-1]) for f in base_feeds]
    todo = [t for t in targets if not all(b in out.get(t.name, {}) for b in widths)]
    progress = Counter(f"output KL ({len(widths)} widths)", len(todo))
    for t in todo:
        name, as_t = feeds[t.name]
        out[t.name] = {}
        for b in widths:
            w = np.asarray(w_hat(t.name, b), np.float32)
            wf = np.ascontiguousarray(w.T) if as_t else w
            kl = 0.0
            n = 0
            for f, lp in zip(base_feeds, ref):
                lq = _log_softmax(sess.run(["logits"], {**f, name: wf})[0][0, :-1])
                kl += float(np.sum(np.exp(lp) * (lp - lq)))
                n += lp.shape[0]
            out[t.name][b] = kl / n
        progress.update(extra=t.name)
        if on_layer is not None:
            on_layer(out)
    return out, {"windows": int(len(windows)), "window": int(windows.shape[1]), "seconds": round(time.perf_counter() - t0, 1)}


def kl_cache_keys(model, targets, weights: dict, hessians, sa_cfg, widths: list[int], windows: np.ndarray) -> dict:
    """{(layer, bits): key} of the output-KL values in a LayerCache (cache.kl_key): the layer's
    result key (weight, H, quantizer settings), the calibration windows and the whole model."""
    from .cache import digest, kl_key, model_digest, result_key

    mdig, idig = model_digest(model), digest(np.asarray(windows))
    h_dig = {}
    keys = {}
    for t in targets:
        wd = digest(weights[t.name])
        if t.x not in h_dig:
            h_dig[t.x] = digest(None if hessians is None else hessians.get(t.x))
        for b in widths:
            keys[(t.name, int(b))] = kl_key(result_key(t.name, wd, h_dig[t.x], int(b), sa_cfg), idig, mdig)
    return keys
