"""The example pass of docs/architecture.md ("How to add a pass"): round-to-nearest on a uniform
grid, written as UniformMatMul, in 30 lines on LayerPass. Its test checks ONNX Runtime's output
of the rewritten model (the op's function body) against numpy on the reconstructed weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from shiftc.passes import ops, uniform
from shiftc.passes.shiftadd import (LayerPass, PassResult, ShiftAddConfig, finish_rewrite, replacement_nodes,
                                    summarize)

TOL_ORT = 1e-4  # ONNX Runtime (float32 function body) vs numpy (float64) on the same Ŵ


class RtnPass(LayerPass):
    """Every constant-weight MatMul/Gemm rounded to nearest on a q-bit grid per group (no calibration)."""

    name = "rtn"
    config_class = ShiftAddConfig  # bits, group, lm_head, skip

    def quantize(self, t, w, h):
        return uniform.quantize_grid_gptq(w, None, self.config.bits, self.config.group)

    def rewrite(self, out, targets, skipped, inits, by_id, hessians, results):
        op, layers, new_inits, replacements = ops.UNIFORM_MATMUL, {}, [], {}
        for t in targets:
            w = self.weight(inits, t)
            r = results.get(t.name) or self.quantize(t, w, None)
            names = [t.name + x for x in op.initializers]
            new_inits += [numpy_helper.from_array(a, n) for a, n in zip((r.packed_planes(), r.scales, r.mins), names)]
            replacements[by_id[t.node]] = replacement_nodes(out.graph.node[by_id[t.node]], t, op.name, "rtn", names,
                                                            bits=r.bits, group_size=r.group, in_features=w.shape[1])
            layers[t.name] = {"shape": list(w.shape), "bits": r.bits, "group": r.group,
                              "bits_per_weight": uniform.bits_per_weight(r.bits, r.group)}
        summary = summarize(self.name, op.name, layers, group=self.config.group)
        finish_rewrite(out, replacements, new_inits, op.name, summary)
        return PassResult(out, True, {**summary, "skipped": skipped})


@pytest.mark.parametrize("bits", [2, 4])
def test_example_pass_runs_in_onnx_runtime(tmp_path, bits):
    import onnxruntime as ort

    import shiftc

    src = tmp_path / "mlp.onnx"
    shiftc.export("tests.factories:mlp", src)
    result = RtnPass(ShiftAddConfig(bits=bits, group=32))(onnx.load(src))
    assert result.modified and len(result.report["layers"]) == 3
    assert {n.op_type for n in result.model.graph.node if n.domain == ops.DOMAIN} == {"UniformMatMul"}
    assert result.report["bits_per_weight"] == pytest.approx(bits + 1)  # q + 32/G
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    name = result.model.graph.input[0].name
    got = ort.InferenceSession(result.model.SerializeToString())
    want = ort.InferenceSession(ops.dequantized_copy(result.model).SerializeToString())
    np.testing.assert_allclose(got.run(None, {name: x})[0], want.run(None, {name: x})[0], rtol=TOL_ORT, atol=TOL_ORT)
