"""The shift-add pass: constant-weight MatMul / Gemm -> ``ai.shiftc::BcqMatMul`` (graph surgery only).

Contract on the graph
---------------------
Targets (each refusal is recorded in ``skipped`` with its reason, naming the node):
  * ``MatMul(x, W)`` with W a 2-D float initializer [K, N] (shiftc's decoder graphs store
    ``<prefix>.weight.T``): the layer's weight is Wᵀ [N, K];
  * ``MatMul(x, Transpose(E, perm=[1, 0]))`` with E an initializer [N, K] — the tied LM head of
    decoder graphs (``MatMul(h, Transpose(embedding))``): the layer's weight is E;
  * ``Gemm(x, B, C)`` with alpha = beta = 1, transA = 0, B an initializer, C absent or an
    initializer: weight B (transB = 1) or Bᵀ; C becomes a standard ``Add`` after the op.
A node whose output is a graph output (the LM head) is quantized only with ``lm_head=True``.
Layer names are the weight initializer's name; the tied head is named ``lm_head``. Per-layer
bits come from ``layer_bits`` ({name or glob: bits}, first match wins, else ``bits``); layers
matching a ``skip`` glob are left alone.

Each target becomes ``BcqMatMul(x, <name>.bcq_planes, <name>.bcq_exps)`` writing the node's
output; nodes and initializers left without consumers are removed (the embedding stays when the
Gather still reads it). The op's function body (shiftc/passes/ops/) is added to
``model.functions`` with the ``ai.shiftc`` opset import, and ``metadata_props`` gets
``shiftc.compression``: JSON with the pass, op, scale mode and per-layer bits, group, shape
and bits per weight (scales included). The math (BCQ fit, GPTQ compensation, error metrics) is
in shiftc/passes/bcq.py; H per input tensor comes from shiftc/passes/calibration.py.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import options as opts
from ..options import option
from ..progress import Counter
from . import bcq, ops, uniform
from .graph import attrs, node_id, remove_dead
from .distill import DistillFields

OP = ops.BCQ_MATMUL.name
GATHER_OP = ops.BCQ_GATHER.name
UNIFORM_OP = ops.UNIFORM_MATMUL.name  # scale_mode "uniform": planes of a q-bit grid, scales a shift apart
UNIFORM_GATHER_OP = ops.UNIFORM_GATHER.name
POOL_MIN_WEIGHTS = 1 << 22  # quantize in a process pool from this many weights on
EMBEDDING_MIN_WEIGHTS = 1 << 20  # a gathered table this large is an embedding (rope tables are far smaller)
METADATA_KEY = "shiftc.compression"


@dataclass
class ShiftAddConfig(DistillFields):  # + distill_* keys: distillation of the scales afterwards
    bits: int = option(3, flag="--shiftadd-bits", kw="bits", parse=opts.bits,
                       help="bit planes per weight, 1..4 (default {default})")
    group: int = option(128, flag="--group", parse=opts.group,
                        help="input columns per scale, a multiple of 32 (default {default})")
    # measured: benchmarks/results/shiftadd_accuracy.json; "uniform": UniformMatMul
    scale_mode: str = option("pow2x2", flag="--scale-mode", choices=("pow2", "pow2x2", "uniform"),
                             help="scale = 2^e or 2^e1 + 2^e2 (BCQ; default {default}), or uniform: a q-bit grid "
                                  "per group with a float16 scale and min, its planes a shift apart")
    act_order: bool = option(True, flag="--act-order",
                             help="GPTQ: quantize columns by decreasing activation energy (shift-add default: on)")
    damp: float = 0.01
    iters: int = 6
    lm_head: bool = option(True, flag="--shiftadd-lm-head", kw="lm_head", help="quantize the LM head too (default on)")
    embedding_bits: int = 4  # token embedding: a table of its own on a uniform grid (QGather); 0: fp32
    embedding_group: int = 32
    tied_embedding: bool = False  # instead, a tied table's Gather reads the head's planes (BcqGather)
    layer_bits: dict[str, int] = option(kw="layer_bits", default_factory=dict,
                                        help="{{name or glob: bits}}, first match wins")
    layer_group: dict[str, int] = field(default_factory=dict)  # {name or glob: group}, first match wins
    layer_damp: dict[str, float] = field(default_factory=dict)  # {name or glob: damp}, first match wins
    skip: list[str] = option(kw="skip", default_factory=list, help="globs of layer names left in fp32")
    workers: int = 0  # processes quantizing layers side by side (0: one per core, 1: in this process)

    def bits_for(self, name: str) -> int:
        return _first_match(self.layer_bits, name, self.bits)

    def group_for(self, name: str) -> int:
        return _first_match(self.layer_group, name, self.group)

    def damp_for(self, name: str) -> float:
        return float(_first_match(self.layer_damp, name, self.damp, float))


def _first_match(table: dict, name: str, default, kind=int):
    for pattern, v in table.items():
        if fnmatch.fnmatchcase(name, pattern):
            return kind(v)
    return default


@dataclass
class Target:
    name: str  # layer name: the weight initializer's name, or "lm_head" for a tied head
    node: str  # name (or output) of the node replaced
    x: str  # the activation input
    weight: str  # initializer holding the weight
    transposed: bool  # the initializer holds Wᵀ [K, N]
    bias: str | None = None  # Gemm's C
    is_head: bool = False


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    report: dict


class LayerPass:
    """What every weight pass offers the compress pipeline (shiftc/passes/compress.py):
    ``match(model)`` the layers it rewrites, ``quantize(target, W, H)`` one layer's fit, and
    ``__call__(model, hessians, results=)`` the rewritten copy (a :class:`PassResult`). Matching
    and the copy are shared (constant-weight MatMul/Gemm and the tied LM head, filtered by the
    config's ``lm_head`` and ``skip``); a pass implements ``quantize`` and ``rewrite``."""

    name = ""
    config_class: type = type(None)

    def __init__(self, config=None):
        self.config = config or self.config_class()

    def quantize(self, t: "Target", w: np.ndarray, h: np.ndarray | None):
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto, hessians: dict[str, np.ndarray] | None = None,
                 results: dict | None = None) -> "PassResult":
        """The rewritten copy of ``model`` (the input is not changed). ``results`` ({layer name:
        result}) are used as given instead of fitting those layers (sequential calibration and
        the mixed-precision cache quantize before the pass)."""
        targets, skipped = self.match(model)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        if not targets:
            return PassResult(out, False, {"layers": {}, "skipped": skipped})
        g = out.graph
        return self.rewrite(out, targets, skipped, {t.name: t for t in g.initializer},
                            {node_id(n): i for i, n in enumerate(g.node)}, hessians, results or {})

    def rewrite(self, out: onnx.ModelProto, targets: list, skipped: list, inits: dict, by_id: dict, hessians,
                results: dict) -> "PassResult":
        """Replace ``targets`` in ``out`` (in place) by the pass's op; ``inits`` and ``by_id`` index
        ``out``'s initializers and nodes."""
        raise NotImplementedError

    # -- matching -----------------------------------------------------------------------------
    def match(self, model: onnx.ModelProto) -> tuple[list[Target], list[tuple[str, str]]]:
        """(targets, skipped [(node, reason)]) in graph order."""
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        producers = {o: n for n in g.node for o in n.output}
        graph_outs = {o.name for o in g.output}
        cfg = self.config
        targets, skipped = [], []

        def weight_ok(name):
            t = inits.get(name)
            return t is not None and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT

        for node in g.node:
            nid = node_id(node)
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
                continue
            is_head = node.output[0] in graph_outs
            t = None
            if node.op_type == "MatMul":
                w = node.input[1]
                if weight_ok(w):
                    t = Target(w, nid, node.input[0], w, True, is_head=is_head)
                elif w in producers and producers[w].op_type == "Transpose" and weight_ok(producers[w].input[0]) \
                        and list(attrs(producers[w]).get("perm", [1, 0])) == [1, 0]:
                    e = producers[w].input[0]
                    t = Target("lm_head" if is_head else e, nid, node.input[0], e, False, is_head=is_head)
                else:
                    skipped.append((nid, f"MatMul '{nid}': input '{w}' is not a constant 2-D float32 weight"))
                    continue
            else:
                a = attrs(node)
                if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
                    skipped.append((nid, f"Gemm '{nid}': alpha/beta != 1 or transA set"))
                    continue
                b = node.input[1]
                c = node.input[2] if len(node.input) > 2 and node.input[2] else None
                if not weight_ok(b) or (c is not None and c not in inits):
                    skipped.append((nid, f"Gemm '{nid}': B or C is not a constant initializer"))
                    continue
                t = Target(b, nid, node.input[0], b, not a.get("transB", 0), bias=c, is_head=is_head)
            if t.is_head and not cfg.lm_head:
                skipped.append((nid, f"'{t.name}' is the LM head and lm_head is off"))
            elif any(fnmatch.fnmatchcase(t.name, p) for p in cfg.skip):
                skipped.append((nid, f"'{t.name}' matches a skip pattern"))
            else:
                targets.append(t)
        return targets, skipped

    # -- quantization -------------------------------------------------------------------------
    @staticmethod
    def weight(inits: dict[str, onnx.TensorProto], t: Target) -> np.ndarray:
        """The layer's weight W [N, K] (float32)."""
        w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
        return w.T if t.transposed else w



class ShiftAddPass(LayerPass):
    """Replace constant-weight MatMul/Gemm by BcqMatMul. Returns a new model; the input is not changed."""

    name = "shiftadd"
    config_class = ShiftAddConfig

    def quantize(self, t: Target, w: np.ndarray, h: np.ndarray | None) -> bcq.BcqResult | uniform.UniformResult:
        """The fit of one target's weight W [N, K] with H = XᵀX of its input (None: data-free)."""
        cfg = self.config
        return fit_layer(w, h, cfg.bits_for(t.name), cfg.group_for(t.name), scale_mode=cfg.scale_mode,
                         damp=cfg.damp_for(t.name), act_order=cfg.act_order, iters=cfg.iters)

    def quantize_all(self, targets: list[Target], inits: dict[str, onnx.TensorProto],
                     hessians: dict[str, np.ndarray] | None, results: dict | None = None) -> dict[str, bcq.BcqResult]:
        """{layer name: BcqResult} for every target (those in ``results`` are kept as given)."""
        return self._fit_all(targets, inits, hessians, results)[0]

    def _fit_all(self, targets: list[Target], inits: dict[str, onnx.TensorProto],
                 hessians: dict[str, np.ndarray] | None, results: dict | None = None) -> tuple[dict, dict]:
        """(results as :meth:`quantize_all`, {layer name: error metrics} of the layers a pool
        worker fitted, computed there beside the fit).

        Layers are independent, so with ``workers`` > 1 they are quantized by a pool of processes
        (spawned: torch's thread pools do not survive fork), largest first, with at most two jobs
        per worker in flight so only those layers' W and H are copied at a time. The results are
        the same as in one process: each layer's fit is deterministic."""
        import os

        out = dict(results or {})
        metrics: dict[str, dict] = {}
        todo = [t for t in targets if t.name not in out]
        progress = Counter("shift-add", len(targets))
        for _ in range(len(targets) - len(todo)):
            progress.update()
        workers = min(self.config.workers or os.cpu_count() or 1, len(todo))
        if sum(int(np.prod(inits[t.weight].dims)) for t in todo) < POOL_MIN_WEIGHTS:
            workers = 1  # starting processes (each imports torch) costs more than it saves

        def job(t):
            return self.weight(inits, t), None if hessians is None else hessians.get(t.x)

        if workers <= 1:
            for t in todo:
                out[t.name] = self.quantize(t, *job(t))
                progress.update(extra=t.name)
            return out, metrics
        import concurrent.futures as cf
        import multiprocessing

        cfg = self.config
        todo.sort(key=lambda t: -int(np.prod(inits[t.weight].dims)))
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_worker_init) as ex:
            pending, it = {}, iter(todo)
            while True:
                while len(pending) < 2 * workers:
                    t = next(it, None)
                    if t is None:
                        break
                    w, h = job(t)
                    pending[ex.submit(_quantize_job, w, h, cfg.bits_for(t.name), cfg.group_for(t.name),
                                      scale_mode=cfg.scale_mode, damp=cfg.damp_for(t.name), act_order=cfg.act_order,
                                      iters=cfg.iters)] = t.name
                if not pending:
                    break
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    name = pending.pop(f)
                    out[name], metrics[name] = f.result()
                    progress.update(extra=name)
        return out, metrics

    # -- rewriting ------------------------------------------------------------------------------
    def rewrite(self, out, targets, skipped, inits, by_id, hessians, results) -> PassResult:
        cfg = self.config
        g = out.graph
        layers, new_inits = {}, []
        results, metrics = self._fit_all(targets, inits, hessians, results)
        replacements: dict[int, list[onnx.NodeProto]] = {}
        op = UNIFORM_OP if cfg.scale_mode == "uniform" else OP
        for t in targets:
            w = self.weight(inits, t)  # [N, K]
            h = None if hessians is None else hessians.get(t.x)
            r = results[t.name]
            bits = r.bits
            prefix = t.name[: -len(".weight.T")] if t.name.endswith(".weight.T") else t.name
            node = g.node[by_id[t.node]]
            if isinstance(r, uniform.UniformResult):
                names = [prefix + x for x in ops.UNIFORM_MATMUL.initializers]
                arrays, extra = [r.packed_planes(), r.scales, r.mins], {}
            else:
                names = [prefix + x for x in ops.BCQ_MATMUL.initializers]
                arrays, extra = [r.packed_planes(), r.exps], {"coding": ops.BCQ_MATMUL.coding}
            if (op == UNIFORM_OP) != isinstance(r, uniform.UniformResult):
                raise ValueError(f"layer '{t.name}': a {type(r).__name__} given for scale_mode {cfg.scale_mode!r}")
            new_inits += [numpy_helper.from_array(a, nm) for a, nm in zip(arrays, names)]
            replacements[by_id[t.node]] = replacement_nodes(node, t, op, "uq" if op == UNIFORM_OP else "bcq", names,
                                                            bits=bits, group_size=r.group, in_features=w.shape[1],
                                                            **extra)
            errors = metrics.get(t.name) or _error_metrics(w, r.dequantize(), h)
            layers[t.name] = {"shape": list(w.shape), "bits": bits, "group": r.group, "scale_mode": r.scale_mode,
                              "bits_per_weight": bcq.bits_per_weight(bits, r.group, r.scale_mode), **errors}
        gather_op = UNIFORM_GATHER_OP if op == UNIFORM_OP else GATHER_OP
        tied = self._tied_gathers(g, targets, by_id, replacements, gather_op) if cfg.tied_embedding else {}
        tables = embedding_tables(g, inits, replacements, new_inits, cfg.embedding_bits, cfg.embedding_group)
        summary = summarize("shiftadd", op, layers, scale_mode=cfg.scale_mode, group=cfg.group)
        if tied:
            summary["tied_embedding"] = tied
        if tables:
            summary["embedding"] = tables
        finish_rewrite(out, replacements, new_inits, op, summary)
        ops.add_functions(out, ([gather_op] if tied else []) + ([ops.Q_GATHER.name] if tables else []))
        return PassResult(out, True, {**summary, "layers": layers, "skipped": skipped})

    @staticmethod
    def _tied_gathers(g: onnx.GraphProto, targets: list[Target], by_id: dict[str, int],
                      replacements: dict[int, list[onnx.NodeProto]], gather_op: str = GATHER_OP) -> dict[str, str]:
        """Replace each ``Gather(E, ids, axis=0)`` of a table E that a quantized head reads as
        ``Transpose(E)`` by ``<gather_op>(ids, <the head's weight initializers>)`` (BcqGather or
        UniformGather) — the table's rows are the head's rows, so the model keeps one (packed) copy.
        Returns {gather node: layer name}."""
        heads = {t.weight: t for t in targets if not t.transposed}
        done = {}
        for i, n in enumerate(g.node):
            if n.domain not in ("", "ai.onnx") or n.op_type != "Gather" or n.input[0] not in heads:
                continue
            if int(attrs(n).get("axis", 0)) != 0:
                continue
            head = replacements[by_id[heads[n.input[0]].node]][0]  # the head's BcqMatMul / UniformMatMul
            a = attrs(head)
            replacements[i] = [helper.make_node(gather_op, [n.input[1], *head.input[1:]], list(n.output),
                                                name=f"{node_id(n)}_tied", domain=ops.DOMAIN,
                                                **{k: v.decode() if isinstance(v, bytes) else v for k, v in a.items()})]
            done[node_id(n)] = heads[n.input[0]].name
        return done


def _error_metrics(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray | None) -> dict:
    m = {"rel_weight_error": bcq.relative_weight_error(w, w_hat)}
    if h is not None:
        m["rel_output_error"] = bcq.relative_output_error(w, w_hat, h)
    return m


def fit_layer(w: np.ndarray, h: np.ndarray | None, bits: int, group: int, *, scale_mode: str, damp: float,
              act_order: bool, iters: int) -> bcq.BcqResult | uniform.UniformResult:
    """One layer's fit: BCQ with power-of-two scales (``scale_mode`` pow2 / pow2x2) or a uniform
    grid as planes (``"uniform"``), inside GPTQ compensation with H (None: data-free)."""
    if scale_mode == "uniform":
        return uniform.quantize_grid_gptq(w, h, bits, group, damp=damp, act_order=act_order)
    return bcq.quantize_gptq(w, h, bits, group, scale_mode=scale_mode, damp=damp, act_order=act_order, iters=iters)


def _quantize_job(w: np.ndarray, h: np.ndarray | None, bits: int, group: int, **kw):
    """A pool worker's job: the fit and its error metrics (float64 GEMMs that would otherwise run
    one after another in the main process once the pool is done)."""
    r = fit_layer(w, h, bits, group, **kw)
    return r, _error_metrics(w, r.dequantize(), h)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core


# -- rewriting helpers shared with the binarize pass ------------------------------------------------


def embedding_tables(g: onnx.GraphProto, inits: dict, replacements: dict[int, list[onnx.NodeProto]],
                     new_inits: list, bits: int, group: int) -> dict[str, dict]:
    """Each ``Gather(E, ids, axis=0)`` of a large float table (at least EMBEDDING_MIN_WEIGHTS:
    token embeddings, not rope tables) with graph-input indices becomes ``QGather(ids, codes,
    scales, mins)`` on E rounded to a uniform grid of 2^``bits`` levels per ``group`` columns
    (shiftc/passes/uniform.py) — the table's own copy, so a tied head keeps its format. Adds to
    ``replacements`` and ``new_inits``; ``bits`` 0 does nothing. Returns {table: report entry}."""
    if not bits:
        return {}
    graph_inputs = {i.name for i in g.input}
    done: dict[str, dict] = {}
    for i, n in enumerate(g.node):
        if i in replacements or n.domain not in ("", "ai.onnx") or n.op_type != "Gather":
            continue
        t = inits.get(n.input[0])
        if t is None or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT or \
                int(np.prod(t.dims)) < EMBEDDING_MIN_WEIGHTS or n.input[1] not in graph_inputs or \
                int(attrs(n).get("axis", 0)) != 0:
            continue
        name = n.input[0]
        if name not in done:
            w = numpy_helper.to_array(t).astype(np.float32)
            codes, scales, mins = uniform.quantize(w, bits, group)
            w_hat = uniform.dequantize(codes, scales, mins, bits, group, w.shape[1])
            new_inits += [numpy_helper.from_array(a, name + x)
                          for a, x in zip((codes, scales, mins), ops.Q_GATHER.initializers)]
            done[name] = {"shape": list(w.shape), "bits": bits, "group": group,
                          "bits_per_weight": uniform.bits_per_weight(bits, group),
                          "rel_weight_error": bcq.relative_weight_error(w, w_hat), "op": f"{ops.DOMAIN}::{ops.Q_GATHER.name}"}
        replacements[i] = [helper.make_node(
            ops.Q_GATHER.name, [n.input[1], *(name + x for x in ops.Q_GATHER.initializers)], list(n.output),
            name=f"{node_id(n)}_q", domain=ops.DOMAIN, bits=bits, group_size=group, in_features=int(t.dims[1]))]
    return done


def replacement_nodes(old: onnx.NodeProto, t: Target, op: str, tag: str, weights: list[str], **attrs) -> list[onnx.NodeProto]:
    """The ``ai.shiftc`` ``op`` node computing ``old``'s output from ``t.x`` and the ``weights``
    initializers, plus the standard Add of a Gemm's bias."""
    y = old.output[0]
    mm_out = f"{y}_nobias" if t.bias else y
    nodes = [helper.make_node(op, [t.x, *weights], [mm_out], name=f"{node_id(old)}_{tag}", domain=ops.DOMAIN, **attrs)]
    if t.bias:
        nodes.append(helper.make_node("Add", [mm_out, t.bias], [y], name=f"{node_id(old)}_bias"))
    return nodes


def finish_rewrite(out: onnx.ModelProto, replacements: dict[int, list[onnx.NodeProto]], new_inits: list,
                   op: str, summary: dict) -> None:
    """Splice ``replacements`` ({node index: new nodes}) into ``out``, add ``new_inits``, drop what
    nothing reads any more, add ``op``'s function body and record ``summary`` as metadata."""
    g = out.graph
    new_nodes = []
    for i, n in enumerate(g.node):
        new_nodes.extend(replacements.get(i, [n]))
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    remove_dead(g)
    ops.add_functions(out, [op])
    props = {p.key: p.value for p in out.metadata_props}
    props[METADATA_KEY] = json.dumps(summary)
    del out.metadata_props[:]
    for k, v in props.items():
        out.metadata_props.add(key=k, value=v)


def summarize(pass_name: str, op: str, layers: dict, **extra) -> dict:
    """The ``shiftc.compression`` metadata: pass, op, ``extra`` settings, the weighted bits per weight."""
    n = sum(int(np.prod(e["shape"])) for e in layers.values())
    bpw = sum(e["bits_per_weight"] * int(np.prod(e["shape"])) for e in layers.values()) / max(n, 1)
    return {"pass": pass_name, "op": f"{ops.DOMAIN}::{op}", **extra, "bits_per_weight": bpw, "quantized_weights": n,
            "layers": {k: {key: e[key] for key in ("shape", "bits", "group", "bits_per_weight")} for k, e in layers.items()}}
