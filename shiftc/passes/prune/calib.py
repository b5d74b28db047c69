"""Input-activation norms for the activation-aware criteria, collected with ONNX Runtime.

For every tensor X that feeds a layer with a constant weight, ``‖X_c‖₂ = sqrt(Σ X_c²)`` per input
channel c (the last axis for MatMul/Gemm inputs, axis 1 for Conv inputs), summed over all
calibration samples and positions. Causal LMs run on windows of the ``calib`` text split (the
same windows as the shift-add pass, :mod:`shiftc.passes.calibration`); image classifiers on
scikit-image's photos. Accumulated sample by sample: memory holds one sample's activations.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ...errors import UsageError
from ...frontend import metadata as md
from ...progress import Counter


CLASSIFIER_CALIB_IMAGES = 512  # Fashion-MNIST training images for a grey 28 x 28 classifier's activation norms


def calibration_feeds(model: onnx.ModelProto, *, corpus: str = "wikipedia", windows: int = 16, window: int = 256,
                      tokenizer: str | None = None, model_path: str = "the model", data=None) -> list[dict]:
    """One feed dict per calibration sample, for a causal LM (text) or an image classifier (photos)."""
    info = md.get_info(model)
    if info.get("task") == "causal-lm" and "decoder" in info:
        from ..calibration import _decoder_feeds, calibration_windows

        ids = calibration_windows(model, corpus=corpus, windows=windows, window=window, tokenizer=tokenizer,
                                  model_path=model_path, data=data)
        return [_decoder_feeds(model, w[None]) for w in ids]
    if info.get("task") == "image-classification":
        from ...frontend.data import load_images

        inits = {t.name for t in model.graph.initializer}
        (inp,) = [i for i in model.graph.input if i.name not in inits]
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        from ...frontend.data import FASHION_MNIST_SHAPE, fashion_mnist_inputs

        if len(dims) == 4 and tuple(dims[1:]) == FASHION_MNIST_SHAPE:  # grey 28 x 28: Fashion-MNIST's training images

            images, _ = fashion_mnist_inputs("train", limit=CLASSIFIER_CALIB_IMAGES)
            rows = dims[0] if dims[0] > 0 else 32
            return [{inp.name: images[i:i + rows]} for i in range(0, len(images) - rows + 1, rows)]
        if len(dims) == 4 and dims[1] not in (0, 3):
            raise UsageError(f"--prune-criterion activation: '{model_path}' takes {dims[1]}-channel images of "
                             f"{dims[2:]}; calibration images exist for RGB models (photos) and grey 28 x 28 ones "
                             "(Fashion-MNIST); use --prune-criterion magnitude")
        size = dims[-1] if len(dims) == 4 and dims[-1] > 0 else 224
        images, _ = load_images(size)
        return [{inp.name: images[i:i + 1]} for i in range(len(images))]
    raise UsageError(f"--prune-criterion activation: '{model_path}' is a '{info.get('task')}' model; calibration "
                     "data exists for causal LMs (text) and image classifiers (photos); use --prune-criterion magnitude")


def collect_norms(model: onnx.ModelProto, tensors: dict[str, int], feeds: list[dict], *,
                  threads: int | None = None, means: dict | None = None) -> dict[str, np.ndarray]:
    """{tensor: ‖X_c‖₂ per channel c of axis ``tensors[name]``} over all ``feeds`` (float64).

    ``means``, if given, is filled with the mean of X_c per channel (for bias compensation)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    names = list(tensors)
    for n in names:
        if n not in have:
            probe.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del probe
    sq: dict[str, np.ndarray] = {}
    sm: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    progress = Counter("activation norms", len(feeds))
    for f in feeds:
        for n, x in zip(names, sess.run(names, f)):
            x = np.moveaxis(np.asarray(x, np.float64), tensors[n], -1)
            s = np.square(x).reshape(-1, x.shape[-1]).sum(axis=0)
            sq[n] = sq[n] + s if n in sq else s
            if means is not None:
                x2 = x.reshape(-1, x.shape[-1])
                sm[n] = sm[n] + x2.sum(axis=0) if n in sm else x2.sum(axis=0)
                count[n] = count.get(n, 0) + x2.shape[0]
        progress.update()
    if means is not None:
        means.update({n: v / count[n] for n, v in sm.items()})
    return {n: np.sqrt(v) for n, v in sq.items()}
