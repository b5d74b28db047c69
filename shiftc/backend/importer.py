"""ONNX -> TVM Relax, with a registry of converters that passes extend with ``ai.shiftc`` ops.

Standard ONNX ops (domain "" / "ai.onnx", opsets 17-21) go through TVM's ONNX frontend, one
converter class per op. Ops of shiftc's own domain are converted by functions registered here with
:func:`register_converter`. Before any conversion starts, every node of the graph (subgraphs
included) is checked; all ops that cannot be lowered are reported at once, with node names.

A registered converter is called as ``fn(bb, inputs, attrs, node)`` where ``bb`` is the Relax
BlockBuilder, ``inputs`` the converted Relax expressions (``None`` for an omitted optional input),
``attrs`` the node's attributes as Python values, and ``node`` the ``onnx.NodeProto``. It returns a
Relax expression (a tuple for several outputs).
"""

from __future__ import annotations

import warnings
from typing import Callable

import onnx

from ..errors import BadInputError, UnsupportedError

from ..passes.ops import DOMAIN as SHIFTC_DOMAIN  # noqa: F401  (one definition of the op domain)
_STANDARD_DOMAINS = ("", "ai.onnx")
MIN_OPSET, MAX_OPSET = 17, 21

Converter = Callable[..., object]
_CONVERTERS: dict[tuple[str, str], Converter] = {}


def register_converter(domain: str, op_type: str):
    """Decorator: register the Relax converter for ``domain::op_type``.

    shiftc ops must not reuse a standard ONNX op name: TVM's importer dispatches on the op name.
    """

    def wrap(fn: Converter) -> Converter:
        if domain in _STANDARD_DOMAINS:
            raise ValueError("standard ONNX ops are converted by TVM's frontend; register shiftc ops only")
        if op_type in _tvm_convert_map():
            raise ValueError(f"op name '{op_type}' collides with a standard ONNX op")
        _CONVERTERS[(domain, op_type)] = fn
        return fn

    return wrap


def registered_ops() -> list[tuple[str, str]]:
    """(domain, op) of every converter registered (shiftc_ops and kv_cache register on import)."""
    return sorted(_CONVERTERS)


def _tvm_convert_map() -> dict:
    from tvm.relax.frontend.onnx import onnx_frontend

    return onnx_frontend._get_convert_map()


def _iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _STANDARD_DOMAINS:
            return imp.version
    return 1


def check_lowerable(model: onnx.ModelProto, source: str = "model") -> None:
    """Raise one UnsupportedError listing every node the backend cannot lower."""
    _load_builtin_converters()
    opset = model_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedError(
            f"{source}: ONNX opset {opset} is not supported (supported: {MIN_OPSET}-{MAX_OPSET}); "
            "re-export the model with an opset in that range"
        )
    tvm_map = _tvm_convert_map()
    bad: list[str] = []
    for node in _iter_nodes(model.graph):
        domain = node.domain
        if domain in _STANDARD_DOMAINS:
            ok = node.op_type in tvm_map or node.op_type in ("Constant", "If")
        else:
            ok = (domain, node.op_type) in _CONVERTERS
        if not ok:
            where = f"{domain}::" if domain not in _STANDARD_DOMAINS else ""
            bad.append(f"{where}{node.op_type} (node '{node.name or '<unnamed>'}')")
    if bad:
        listed = "\n  ".join(bad)
        raise UnsupportedError(
            f"{source}: {len(bad)} node(s) use ops the backend cannot lower:\n  {listed}"
        )


def _importer_class():
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    class ShiftcImporter(ONNXGraphImporter):
        """TVM's importer, with shiftc's converters consulted first."""

        _current_node: onnx.NodeProto | None = None

        def _parse_value_proto(self, value_proto):
            # Called on each node right before its conversion: remember the node, so the
            # converter sees its domain (TVM's own dispatch uses the op name only).
            if isinstance(value_proto, onnx.NodeProto):
                self._current_node = value_proto
            return super()._parse_value_proto(value_proto)

        def _check_for_unsupported_ops(self, graph):  # done by check_lowerable beforehand
            return

        def _convert_operator(self, op_name, inputs, attrs, opset):
            node = self._current_node
            if node is not None and node.op_type == op_name and (node.domain, op_name) in _CONVERTERS:
                fn = _CONVERTERS[(node.domain, node.op_type)]
                clean = {k: v for k, v in attrs.items() if k != "tvm_custom"}
                sym = fn(self.bb, list(inputs), clean, node)
                from tvm import relax

                return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym
            return super()._convert_operator(op_name, inputs, attrs, opset)

    return ShiftcImporter


def _load_builtin_converters() -> None:
    from . import kv_cache, shiftc_ops  # noqa: F401  (register the ai.shiftc lowerings)


def to_relax(model: onnx.ModelProto, source: str = "model"):
    """Convert a checked ONNX model into a Relax IRModule whose ``main`` takes the graph inputs
    in order (weights become constants)."""
    _load_builtin_converters()
    check_lowerable(model, source)
    if model.ir_version < 3:
        raise BadInputError(f"{source}: ONNX IR version {model.ir_version} is too old")
    from .shiftc_ops import sharing_packed_weights

    importer = _importer_class()(None, "float32", keep_params_in_input=False, sanitize=True)
    try:
        with warnings.catch_warnings(), sharing_packed_weights():
            warnings.simplefilter("ignore")  # TVM warns for every renamed (sanitized) input
            return importer.from_onnx(model.graph, model_opset(model))
    except (UnsupportedError, BadInputError):
        raise
    except Exception as exc:  # TVM raises many types; name the node it failed on where it says
        msg = str(exc).strip().splitlines()
        raise UnsupportedError(
            f"{source}: the TVM importer failed: {msg[-1] if msg else type(exc).__name__}"
        ) from exc
