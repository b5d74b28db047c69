"""Calibration statistics for output-error-aware quantization: H = XᵀX per linear-layer input.

For every tensor X that feeds a layer to be quantized (q/k/v share one input, as do gate/up: H is
computed once per distinct tensor), H = Σ_windows X_wᵀ X_w with X_w [tokens, K] the rows of X for
one calibration window. The ONNX graph itself is run by ONNX Runtime on a copy of the model whose
graph outputs are those tensors; H is accumulated window by window (float64), so memory holds
two windows' activations plus the H matrices, never all activations: the XᵀX products (BLAS,
float32) of one window run on a thread while ONNX Runtime computes the next.

Sequential calibration (:func:`quantize_sequential`, GPTQ's order): the inputs are split, in graph
order, into ``stages`` consecutive chunks; H of a chunk's layers is collected on the model whose
layers of the earlier chunks are already quantized (their Ŵ written back as fp32 weights), so each
layer is fitted to the activations it will really see. Each stage runs only the part of the graph
its tensors depend on, so the total cost is about (stages + 1) / 2 full calibration passes.

Calibration text: the ``calib`` split of :mod:`shiftc.frontend.data` (disjoint from the ``eval``
split perplexity is measured on), cut into ``windows`` windows of ``window`` tokens with the
tokenizer recorded in the model (``shiftc.tokenizer``) or given explicitly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import UsageError
from ..frontend import metadata as md
from ..frontend.data import texts_for, token_windows
from ..progress import Counter


def calibration_windows(model: onnx.ModelProto, *, corpus: str = "wikipedia", split: str | None = None,
                        windows: int = 16, window: int = 256, tokenizer: str | None = None,
                        model_path: str = "the model", at_most: bool = False, data=None) -> np.ndarray:
    """int64 [windows, window] token ids for calibrating a causal LM. ``at_most``: fewer windows
    than asked are fine (all the text holds, at least one), instead of an error. ``data``: the
    user's text (a path or strings, frontend.data.load_user_texts) instead of ``corpus``; ``split``
    defaults to calib (a corpus) or all (data)."""
    from ..tokenizer import tokenizer_for

    info = md.get_info(model)
    if info.get("task") != "causal-lm" or "decoder" not in info:
        raise UsageError(f"--calib {corpus}: calibration from text needs a causal LM; '{model_path}' is "
                         f"'{info.get('task')}' (use --calib none for a data-free fit)")
    if windows < 1 or window < 2:
        raise UsageError(f"--calib-windows must be >= 1 and --calib-window >= 2 (got {windows}, {window})")
    tok = tokenizer_for(info, tokenizer, model_path)
    texts, name, split = texts_for(corpus, split, data, corpus_split="calib", flag="--calib-data")
    ids = token_windows(tok, texts, window=window, n_tokens=windows * window, what=f"{name} ({split})")
    if len(ids) < windows and not (at_most and len(ids)):
        raise UsageError(f"--calib-windows {windows}: the {name}/{split} text holds only {len(ids)} windows of {window}")
    return ids


def _decoder_feeds(model: onnx.ModelProto, ids: np.ndarray) -> dict[str, np.ndarray]:
    dec = md.get_info(model)["decoder"]
    b, s = ids.shape
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, s), np.int64),
             "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()}
    empty = np.zeros((b, dec["num_kv_heads"], 0, dec["head_dim"]), np.float32)
    for i in range(dec["num_layers"]):
        feeds[f"past_key_values.{i}.key"] = empty
        feeds[f"past_key_values.{i}.value"] = empty
    return feeds


def collect_hessians(model: onnx.ModelProto, inputs: list[str], windows: np.ndarray, *,
                     threads: int | None = None) -> dict[str, np.ndarray]:
    """{tensor name: H float64 [K, K]} for each name in ``inputs`` (deduplicated), over ``windows``."""
    import onnxruntime as ort

    names = list(dict.fromkeys(inputs))
    probe = _probe(model, names)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del probe
    hs: dict[str, np.ndarray] = {}
    progress = Counter("calibration", len(windows))

    def accumulate(outs):
        for n, x in zip(names, outs):
            x2 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            h = x2.T @ x2  # float32 (BLAS syrk), summed in float64
            if n in hs:
                np.add(hs[n], h, out=hs[n])
            else:
                hs[n] = h.astype(np.float64)

    # one window after the other: ONNX Runtime's threads, then BLAS's for XᵀX. Overlapping the two
    # (XᵀX of window i on a thread while ONNX Runtime runs window i + 1) puts both thread pools on
    # the same cores: 2.3 s per window against 1.25 s in turn (SmolLM2-135M, 512 tokens, 2 cores)
    for w in windows:
        accumulate(sess.run(names, _decoder_feeds(model, w[None])))
        progress.update()
    return hs


def _probe(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model whose outputs are ``names``, keeping only the nodes they depend on (all
    graph inputs stay, so the same feeds work)."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    need, stack, keep = set(), list(names), set()
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        if t in producer and producer[t] not in keep:
            keep.add(producer[t])
            node = g.node[producer[t]]
            stack.extend(i for i in node.input if i)
            for a in node.attribute:  # tensors read by subgraphs from the outer scope
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    stack.extend(i for n in sub.node for i in n.input if i)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.node[:]
    probe.graph.node.extend(g.node[i] for i in sorted(keep))
    live = [t for t in g.initializer if t.name in need]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(live)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return probe


def quantize_sequential(model: onnx.ModelProto, targets: list, windows: np.ndarray, quantize, *, stages: int,
                        threads: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Sequential calibration (module docstring). ``targets`` are shift-add
    :class:`~shiftc.passes.shiftadd.Target` s; ``quantize(target, W [N, K], H)`` returns a result with
    ``dequantize()``. Returns ({layer name: result}, {input tensor: H the layer was fitted with})."""
    from onnx import numpy_helper

    from ..progress import log

    inputs = list(dict.fromkeys(t.x for t in targets))
    stages = max(1, min(int(stages), len(inputs)))
    bounds = [round(i * len(inputs) / stages) for i in range(stages + 1)]
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name: t for t in work.graph.initializer}
    nodes = {(n.name or n.output[0]): n for n in work.graph.node}
    readers: dict[str, int] = {}
    for n in work.graph.node:
        for i in set(n.input):
            readers[i] = readers.get(i, 0) + 1
    results, hessians = {}, {}
    for s in range(stages):
        chunk = inputs[bounds[s]:bounds[s + 1]]
        log(f"sequential calibration: stage {s + 1}/{stages} ({len(chunk)} inputs)")
        hs = collect_hessians(work, chunk, windows, threads=threads)
        hessians.update(hs)
        for t in (t for t in targets if t.x in hs):
            w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
            w = w.T if t.transposed else w
            r = results[t.name] = quantize(t, w, hs[t.x])
            if s == stages - 1:
                continue
            w_hat = r.dequantize()
            node = nodes[t.node]
            if node.op_type == "Gemm" or (t.transposed and readers.get(t.weight, 0) == 1):
                # the node reads the initializer directly: write Ŵ back in its stored orientation
                new = np.ascontiguousarray(w_hat.T if t.transposed else w_hat)
                name = t.weight if readers.get(t.weight, 0) == 1 else f"{t.name}.calib_q"
            else:  # tied head (MatMul of a Transpose) or a shared initializer: a new [K, N] weight
                new, name = np.ascontiguousarray(w_hat.T), f"{t.name}.calib_q.T"
            if name == t.weight:
                inits[name].CopyFrom(numpy_helper.from_array(new, name))
            else:
                work.graph.initializer.append(numpy_helper.from_array(new, name))
                node.input[1] = name
    return results, hessians
