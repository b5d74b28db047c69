"""Calibration statistics for output-error-aware quantization: H = XᵀX per linear-layer input.

For every tensor X that feeds a layer to be quantized (q/k/v share one input, as do gate/up: H is
computed once per distinct tensor), H = Σ_windows X_wᵀ X_w with X_w [tokens, K] the rows of X for
one calibration window. The ONNX graph itself is run by ONNX Runtime on a copy of the model whose
graph outputs are those tensors; H is accumulated window by window (float64), so memory holds
one window's activations plus the H matrices, never all activations.

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
from ..frontend.data import load_corpus, token_windows
from ..progress import Counter


def calibration_windows(model: onnx.ModelProto, *, corpus: str = "wikipedia", split: str = "calib",
                        windows: int = 16, window: int = 256, tokenizer: str | None = None,
                        model_path: str = "the model") -> np.ndarray:
    """int64 [windows, window] token ids for calibrating a causal LM."""
    from ..tokenizer import tokenizer_for

    info = md.get_info(model)
    if info.get("task") != "causal-lm" or "decoder" not in info:
        raise UsageError(f"--calib {corpus}: calibration from text needs a causal LM; '{model_path}' is "
                         f"'{info.get('task')}' (use --calib none for a data-free fit)")
    if windows < 1 or window < 2:
        raise UsageError(f"--calib-windows must be >= 1 and --calib-window >= 2 (got {windows}, {window})")
    tok = tokenizer_for(info, tokenizer, model_path)
    ids = token_windows(tok, load_corpus(corpus, split), window=window, n_tokens=windows * window)
    if len(ids) < windows:
        raise UsageError(f"--calib-windows {windows}: the {corpus}/{split} text holds only {len(ids)} windows of {window}")
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
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for n in names:
        if n not in have:
            probe.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del probe
    hs: dict[str, np.ndarray] = {}
    progress = Counter("calibration", len(windows))
    for w in windows:
        outs = sess.run(names, _decoder_feeds(model, w[None]))
        for n, x in zip(names, outs):
            x2 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            h = (x2.T @ x2).astype(np.float64)
            if n in hs:
                hs[n] += h
            else:
                hs[n] = h
        progress.update()
    return hs
