"""Relax lowerings of the ``ai.shiftc`` ops (see shiftc/passes/ops.py for their schemas).

BcqMatMul — current lowering: the packed bit planes and scale exponents are constants, so the
weight ``Ŵ = Σ α_i ⊙ s(B_i)`` is reconstructed once at compile time (with the op table's numpy
reference functions) and the op becomes a float32 matmul, scheduled like any other (packed
weight panels, register-blocked kernels). The compiled model is exact with respect to the ONNX
reference, but neither smaller nor faster than fp32: the LUT kernels that run on the packed
bits are the next step of the shift-add work.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError
from .importer import SHIFTC_DOMAIN, register_converter


def _constant(expr, node, what: str) -> np.ndarray:
    value = getattr(expr, "value", None) or getattr(expr, "data", None)
    if value is None or not hasattr(value, "numpy"):
        raise UnsupportedError(f"node '{node.name}' ({node.op_type}): input '{what}' must be a constant initializer")
    return value.numpy()


@register_converter(SHIFTC_DOMAIN, "BcqMatMul")
def _bcq_matmul(bb, inputs, attrs, node):
    from tvm import relax

    from ..passes.bcq import exps_to_alpha, reconstruct, unpack_planes

    x = inputs[0]
    planes = _constant(inputs[1], node, "planes")
    exps = _constant(inputs[2], node, "exps")
    coding = attrs.get("coding", "pm1")
    coding = coding.decode() if isinstance(coding, bytes) else coding
    bits, group, k = int(attrs["bits"]), int(attrs["group_size"]), int(attrs["in_features"])
    if planes.shape[0] != bits:
        raise UnsupportedError(f"node '{node.name}': bits={bits} but planes has {planes.shape[0]} planes")
    w = reconstruct(unpack_planes(planes, k), exps_to_alpha(exps), group, coding).astype(np.float32)  # [N, K]
    return relax.op.matmul(x, relax.const(np.ascontiguousarray(w.T), "float32"))
