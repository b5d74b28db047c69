"""Train an ONNX graph: its float initializers as torch parameters, its nodes as torch ops.

Recovery after structured pruning needs gradients through the *pruned* graph, which no torch
source describes (the surgery happened in ONNX). :class:`OnnxModule` executes the graph with torch
ops in topological order; the weight and bias initializers of Conv / Gemm / MatMul / Add /
Mul / BatchNormalization become ``nn.Parameter``\\ s (everything else — shapes, indices, axes — stays
a constant), so autograd trains them; :meth:`OnnxModule.write_back` puts the trained values into a
copy of the graph under the same names and shapes. Only what image classifiers are made of is
supported (:data:`OPS`); any other op is refused by name.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UnsupportedError
from .graph import attrs

# ops whose float initializer inputs are trained (input index -> trained)
TRAINED_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1), "Add": (0, 1), "Mul": (0, 1),
                  "BatchNormalization": (1, 2)}


def _conv(t, x, w, b, a):
    pads = a.get("pads", [0] * (2 * (w.dim() - 2)))
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        x = t.nn.functional.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
        pads = [0] * len(pads)
    conv = t.nn.functional.conv2d if w.dim() == 4 else t.nn.functional.conv1d
    return conv(x, w, b, stride=a.get("strides", 1), padding=pads[:half], dilation=a.get("dilations", 1),
                groups=a.get("group", 1))


def _gemm(t, a_, b_, c, a):
    a_ = a_.T if a.get("transA") else a_
    b_ = b_.T if a.get("transB") else b_
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y if c is None else y + a.get("beta", 1.0) * c


def _pool(t, x, a, kind):
    k = a["kernel_shape"]
    pads = a.get("pads", [0] * (2 * len(k)))
    f = t.nn.functional.max_pool2d if kind == "max" else t.nn.functional.avg_pool2d
    kw = {} if kind == "max" else {"count_include_pad": bool(a.get("count_include_pad", 0))}
    return f(x, k, a.get("strides", k), pads[:len(k)], ceil_mode=bool(a.get("ceil_mode", 0)), **kw)


OPS = {
    "Conv": lambda t, i, a: _conv(t, i[0], i[1], i[2] if len(i) > 2 else None, a),
    "Gemm": lambda t, i, a: _gemm(t, i[0], i[1], i[2] if len(i) > 2 else None, a),
    "MatMul": lambda t, i, a: i[0] @ i[1],
    "Add": lambda t, i, a: i[0] + i[1],
    "Sub": lambda t, i, a: i[0] - i[1],
    "Mul": lambda t, i, a: i[0] * i[1],
    "Div": lambda t, i, a: i[0] / i[1],
    "Relu": lambda t, i, a: t.relu(i[0]),
    "Sigmoid": lambda t, i, a: t.sigmoid(i[0]),
    "Tanh": lambda t, i, a: t.tanh(i[0]),
    "HardSigmoid": lambda t, i, a: t.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda t, i, a: t.nn.functional.hardswish(i[0]),
    "Clip": lambda t, i, a: t.clamp(i[0], *(float(v) if v is not None else None for v in
                                            (i[1] if len(i) > 1 else a.get("min"), i[2] if len(i) > 2 else a.get("max")))),
    "GlobalAveragePool": lambda t, i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "MaxPool": lambda t, i, a: _pool(t, i[0], a, "max"),
    "AveragePool": lambda t, i, a: _pool(t, i[0], a, "avg"),
    "Flatten": lambda t, i, a: i[0].flatten(a.get("axis", 1)) if a.get("axis", 1) else i[0].reshape(1, -1),
    "Reshape": lambda t, i, a: i[0].reshape([int(d) if d != 0 else i[0].shape[k] for k, d in enumerate(i[1].tolist())]),
    "Transpose": lambda t, i, a: i[0].permute(a.get("perm", list(reversed(range(i[0].dim()))))),
    "Concat": lambda t, i, a: t.cat(list(i), a["axis"]),
    "Identity": lambda t, i, a: i[0],
    "Softmax": lambda t, i, a: t.softmax(i[0], a.get("axis", -1)),
    "ReduceMean": lambda t, i, a: i[0].mean(dim=tuple(int(v) for v in (i[1].tolist() if len(i) > 1 else a["axes"])),
                                            keepdim=bool(a.get("keepdims", 1))),
    "BatchNormalization": lambda t, i, a: t.nn.functional.batch_norm(i[0], i[3], i[4], i[1], i[2], False, 0.0,
                                                                     a.get("epsilon", 1e-5)),
}


class OnnxModule:
    """A torch module running ``model`` (built lazily so that importing this file needs no torch)."""

    def __new__(cls, model: onnx.ModelProto):
        import torch

        class _Module(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model
                g = model.graph
                bad = sorted({n.op_type for n in g.node
                              if (n.op_type not in OPS and n.op_type != "Constant") or n.domain not in ("", "ai.onnx")})
                if bad:
                    raise UnsupportedError(f"training the graph: op(s) {', '.join(bad)} are not supported "
                                           f"(supported: {', '.join(sorted(OPS))})")
                trained = {n.input[k] for n in g.node for k in TRAINED_INPUTS.get(n.op_type, ()) if k < len(n.input)}
                self.names, self.params, self.consts = {}, torch.nn.ParameterList(), {}
                for init in g.initializer:
                    arr = numpy_helper.to_array(init)
                    if init.name in trained and arr.dtype == np.float32 and arr.size > 1:
                        self.names[init.name] = len(self.params)
                        self.params.append(torch.nn.Parameter(torch.from_numpy(arr.copy())))
                    else:
                        self.consts[init.name] = torch.from_numpy(np.array(arr))
                self.inputs = [i.name for i in g.input if i.name not in self.names and i.name not in self.consts]
                self.weight_fns = {}  # initializer name -> f(parameter) used in its place (masks, decay)
                self.outputs = [o.name for o in g.output]

            def forward(self, *xs):
                env = dict(self.consts)
                env.update({k: self.weight_fns[k](self.params[j]) if k in self.weight_fns else self.params[j]
                            for k, j in self.names.items()})
                env.update(zip(self.inputs, xs))
                for node in self.model.graph.node:
                    if node.op_type == "Constant":
                        env[node.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(node.attribute[0].t)))
                        continue
                    ins = [env[x] if x else None for x in node.input]
                    env[node.output[0]] = OPS[node.op_type](torch, ins, attrs(node))
                return env[self.outputs[0]] if len(self.outputs) == 1 else tuple(env[o] for o in self.outputs)

            def write_back(self) -> onnx.ModelProto:
                """A copy of the graph holding the trained parameters."""
                out = onnx.ModelProto()
                out.CopyFrom(self.model)
                for init in out.graph.initializer:
                    if init.name in self.names:
                        arr = self.params[self.names[init.name]].detach().numpy().astype(np.float32)
                        init.CopyFrom(numpy_helper.from_array(arr, init.name))
                return out

        return _Module(model)
