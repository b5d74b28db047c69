"""``PrunePass``: structured pruning of an ONNX model (returns a new model; the input is not edited).

    groups   = dependency analysis (:mod:`.groups`): coupled channels, heads, KV groups
    scores   = importance per unit (:mod:`.criteria`), activation norms from calibration
    plan     = units to remove per group, meeting the budget (below)
    model'   = surgery (:mod:`.surgery`) + metadata (KV heads of the decoder spec, ``shiftc.prune``)

Budget: ``ratio`` of the parameters (or FLOPs, ``budget="flops"``) of the layer weights that
belong to prunable groups in scope. Decoders lose the same number of KV groups (with their query
heads) in every layer — the runtimes keep one ``num_kv_heads`` for all layers — namely
``round(ratio · KVH)``; the rest of the budget comes from the other groups at one common ratio r'
(found by bisection on the exact count after removal), each group dropping its lowest-scored
units. Kept widths of groups with ≥ 4·align units are rounded to a multiple of align: by default
128 for MatMul groups (``mlp``, ``heads``; 32 or 8 for small ones) and 8 for Conv channels, and
groups may then differ by one multiple so that the total stays closest to the budget. Why: the
backend packs a constant weight into contiguous [N/32, K, 32] panels only when 32 divides N, and
its decode GEMV streams four panels per task only when 128 divides N. SmolLM2 at 25%, compiled
decode vs unpruned (1 thread): MLP width 1192 (unpacked) 0.83x, 1184 (one panel per task) 1.08x,
1152 (27% removed) 1.22x.

Scopes: ``mlp`` (channels between two MatMuls: SwiGLU / FFN hidden units), ``heads`` (KV groups
with their query heads, or attention heads), ``channels`` (Conv channels).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from ... import options as opts
from ...errors import UsageError
from ...options import option
from ...frontend import metadata as md
from .criteria import CRITERIA, compensate_bias, unit_scores
from .groups import GraphInfo, Group, analyze
from .surgery import apply

SCOPES = ("mlp", "heads", "channels")
# default kept-width multiples per group kind (PruneConfig.align=None), the widest one the group
# has >= 4 of: MatMul groups 128 (the decode GEMV's tile of four 32-wide packed panels), else 32
# (one packed panel, NR on AVX-512), else 8; Conv channels 8 (one AVX2 vector)
ALIGN = {"mlp": (128, 32, 8), "heads": (128, 32, 8), "channels": (8,)}
BUDGETS = ("params", "flops")


@dataclass
class PruneConfig:
    ratio: float = option(0.25, flag="--prune", parse=opts.fraction, metavar="RATIO",
                          help="structured pruning: fraction of the prunable parameters removed (channels, KV groups)")
    criterion: str = option("activation", flag="--prune-criterion", choices=CRITERIA,
                            help="unit importance: |W|·‖x‖ from calibration (default), |W|², or LoRAPrune scores")
    scope: list = option(flag="--prune-scope", metavar="mlp,heads,channels", default_factory=lambda: list(SCOPES),
                         help="what may be pruned (default all three)")
    budget: str = option("params", flag="--prune-budget", choices=BUDGETS, help="what RATIO counts (default {default})")
    align: int | None = None  # kept widths rounded to a multiple of this (large groups only); None:
    #                            32 for MatMul groups (mlp, heads), 8 for Conv channels (ALIGN)
    skip: list = field(default_factory=list)  # globs of weight names whose groups are left alone
    nm: str | None = option(None, flag="--nm", metavar="N:M", help="N:M semi-structured sparsity after pruning (2:4, 4:8)")
    compensate: bool = True  # fold removed inputs' calibration mean into the consumer's bias (Conv/Gemm)
    # LoRA fine-tune on the torch model of the export source (lora.py): the LoRAPrune criterion's
    # budget, or recovery after magnitude/activation pruning; steps and/or minutes, first reached ends it
    recover_steps: int | None = option(None, flag="--recover-steps", parse=int, metavar="S",
                                       help="with --prune: recovery training, S steps (LLMs: LoRA fine-tune of the export "
                                            "source's torch model, pruned units masked, also the budget of "
                                            "--prune-criterion lorapr; image classifiers: the pruned graph on "
                                            "Fashion-MNIST, distilled from the unpruned one)")
    recover_minutes: float | None = option(None, flag="--recover-minutes", parse=float, metavar="M",
                                           help="with --prune: LoRA fine-tune time bound")
    recover_init: str = option("finetune", flag="--recover-init", choices=("finetune", "scratch"),
                               help="image classifiers: recovery from the kept weights (default) or the pruned "
                                    "architecture trained from scratch")
    lora_rank: int = 8
    lora_lr: float = 3e-4
    lora_window: int = 128  # tokens per training window (calibration split)
    source: str | None = None  # GGUF / HF folder of the torch model (default: recorded in the metadata)


def validate(cfg: PruneConfig, pre: str = "") -> None:
    if not isinstance(cfg.ratio, (int, float)) or not 0 <= cfg.ratio < 1:
        raise UsageError(f"{pre}--prune must be a fraction in [0, 1), got {cfg.ratio!r}")
    if cfg.criterion not in CRITERIA:
        raise UsageError(f"{pre}--prune-criterion must be one of {', '.join(CRITERIA)}, got {cfg.criterion!r}")
    if isinstance(cfg.scope, str):
        cfg.scope = [x.strip() for x in cfg.scope.split(",") if x.strip()]
    bad = [s for s in cfg.scope if s not in SCOPES]
    if bad or not cfg.scope:
        raise UsageError(f"{pre}--prune-scope: unknown scope {bad or cfg.scope!r} (choose from {', '.join(SCOPES)})")
    if cfg.budget not in BUDGETS:
        raise UsageError(f"{pre}--prune-budget must be one of {', '.join(BUDGETS)}, got {cfg.budget!r}")
    if cfg.nm is not None:
        from .nm import parse_pattern

        parse_pattern(cfg.nm)
    for flag, v in (("--recover-steps", cfg.recover_steps), ("--recover-minutes", cfg.recover_minutes)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                              or (flag == "--recover-steps" and not isinstance(v, int))):
            raise UsageError(f"{pre}{flag} must be a positive {'integer' if 'steps' in flag else 'number'}, got {v!r}")
    if (cfg.recover_steps is not None or cfg.recover_minutes is not None) and not cfg.ratio and not cfg.nm:
        raise UsageError(f"{pre}--recover-steps/--recover-minutes fine-tune a pruned model: give --prune RATIO "
                         "(or, for an image classifier, --nm N:M) too")
    if not isinstance(cfg.lora_rank, int) or cfg.lora_rank < 1:
        raise UsageError(f"{pre}prune lora_rank must be an integer >= 1, got {cfg.lora_rank!r}")
    if cfg.align is not None and (not isinstance(cfg.align, int) or cfg.align < 1):
        raise UsageError(f"{pre}prune align must be an integer >= 1, got {cfg.align!r}")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: dict


def _layer_costs(info: GraphInfo, budget: str) -> dict[str, float]:
    """Cost of one weight element per layer: 1 (params) or multiply-adds per input token/image."""
    costs = {}
    for node, w, _ in info.compute_weights():
        f = 1.0
        if budget == "flops":
            out = info.shapes.get(node.output[0]) or []
            spatial = out[2:] if node.op_type == "Conv" else out[:-1]
            f = float(np.prod([d for d in spatial if isinstance(d, int) and d > 0] or [1]))
        costs[w] = f
    return costs


class PrunePass:
    def __init__(self, config: PruneConfig | None = None):
        self.config = config or PruneConfig()
        validate(self.config)

    def analyze(self, model: onnx.ModelProto) -> tuple[GraphInfo, list[Group]]:
        info = GraphInfo(model)
        return info, analyze(model, info)

    def calibration_tensors(self, info: GraphInfo) -> dict[str, int]:
        """Activation tensors whose channel norms the activation criterion needs: {name: axis}."""
        from .criteria import layer_inputs

        return {x: ax for _, _, x, ax in layer_inputs(info).values()}

    def _status(self, groups: list[Group]) -> dict[int, tuple[str, str | None]]:
        """{group index: (candidate | refused | out of scope | skipped | kept, reason)}."""
        cfg = self.config
        status = {}
        for i, g in enumerate(groups):
            if g.refusal:
                status[i] = ("refused", g.refusal)
            elif g.kind not in cfg.scope:
                status[i] = ("out of scope", f"{g.kind} not in --prune-scope {','.join(cfg.scope)}")
            elif any(fnmatch.fnmatch(w, pat) for w in g.layers for pat in cfg.skip):
                status[i] = ("skipped", "a layer matches prune skip")
            elif g.units < 2:
                status[i] = ("kept", "a single unit")
            else:
                status[i] = ("candidate", None)
        # the runtimes keep one KV head count for all layers: KV groups go everywhere or nowhere
        kv = [i for i, g in enumerate(groups) if g.kind == "heads" and g.io]
        held = [i for i in kv if status[i][0] != "candidate"]
        if held and len(held) < len(kv):
            for i in kv:
                if status[i][0] == "candidate":
                    status[i] = ("kept", f"KV groups are removed in every layer or none; the group of "
                                         f"'{groups[held[0]].root}' is {status[held[0]][0]}")
        return status

    def counts(self, info: GraphInfo, groups: list[Group]) -> dict[str, tuple[str, int, int]]:
        """{group root: (kind, units, units to remove)} for the groups the budget prunes (no scores
        needed: units of a group cost the same). LoRA fine-tuning masks these counts (:mod:`.lora`)."""
        status = self._status(groups)
        cand = [i for i, (s, _) in status.items() if s == "candidate"]
        n = self._plan(info, groups, cand)
        return {groups[i].root: (groups[i].kind, groups[i].units, n[i]) for i in cand}

    def _select(self, info, groups, norms, scores, removed):
        """(status, candidate indices, units to remove per candidate, unit order per candidate)."""
        cfg = self.config
        status = self._status(groups)
        cand = [i for i, (s, _) in status.items() if s == "candidate"]
        n_remove = self._plan(info, groups, cand)
        if removed is not None:
            order = {}
            for i in cand:
                r = np.asarray(sorted(removed.get(groups[i].root, [])), np.int64)
                if len(r) != n_remove[i]:
                    raise RuntimeError(f"plan for '{groups[i].root}' removes {len(r)} units, the budget {n_remove[i]}")
                order[i] = np.concatenate([r, np.setdiff1d(np.arange(groups[i].units), r)])
        else:
            order = {i: np.argsort(unit_scores(groups[i], info, cfg.criterion, norms=norms, scores=scores),
                                   kind="stable") for i in cand}
        return status, cand, n_remove, order

    def choose(self, model: onnx.ModelProto, info: GraphInfo, groups: list[Group], *, norms: dict | None = None,
               scores: dict | None = None) -> dict[str, list[int]]:
        """{group root: units to remove} by the criterion and budget, without the surgery."""
        if self.config.criterion == "activation" and norms is None:
            raise UsageError("--prune-criterion activation needs calibration data (activation norms)")
        _, cand, n_remove, order = self._select(info, groups, norms, scores, None)
        return {groups[i].root: sorted(int(u) for u in order[i][:n_remove[i]]) for i in cand if n_remove[i]}

    def __call__(self, model: onnx.ModelProto, *, info: GraphInfo | None = None, groups: list[Group] | None = None,
                 norms: dict | None = None, scores: dict | None = None, means: dict | None = None,
                 removed: dict | None = None) -> PruneResult:
        """``removed`` ({group root: units}) replaces the criterion's choice: re-applies a plan made
        on the same model before its weights were fine-tuned (recovery, :mod:`.lora`)."""
        cfg = self.config
        if info is None or groups is None:
            info, groups = self.analyze(model)
        if removed is None and cfg.criterion == "activation" and norms is None:
            raise UsageError("--prune-criterion activation needs calibration data (activation norms)")
        if removed is None and cfg.criterion == "lorapr" and scores is None:
            raise UsageError("--prune-criterion lorapr needs LoRAPrune scores per weight (a LoRA fine-tune of the "
                             "PyTorch model the ONNX was exported from: shiftc.passes.prune.lora, or shiftc "
                             "compress --prune-criterion lorapr --recover-steps S)")
        status, cand, n_remove, order = self._select(info, groups, norms, scores, removed)
        plan = [(groups[i], np.sort(order[i][:n_remove[i]])) for i in cand]
        if means and cfg.compensate:
            model = compensate_bias(model, info, plan, means)
        pruned = apply(model, info, plan)
        before, after = self._cost(info, groups, cand, {i: 0 for i in cand}), self._cost(info, groups, cand, n_remove)
        self._update_metadata(pruned, model)
        report_groups = []
        for i, g in enumerate(groups):
            s, why = status[i]
            layers = g.layers if len(g.layers) <= 8 else g.layers[:8] + [f"... {len(g.layers) - 8} more"]
            entry = {"root": g.root, "kind": g.kind, "layers": layers, "units": g.units,
                     "unit_size": int(len(g.dims[(g.root, next(a for t, a in g.dims if t == g.root))].idx) // g.units)}
            if s == "candidate":
                removed = [int(u) for u in np.sort(order[i][:n_remove[i]])]
                entry.update(status="pruned" if removed else "kept", kept=g.units - len(removed), removed_units=removed)
            else:
                entry.update(status=s, reason=why, kept=g.units)
            report_groups.append(entry)
        dec = md.get_info(pruned).get("decoder")
        report = {"criterion": cfg.criterion, "ratio": cfg.ratio, "budget": cfg.budget, "scope": list(cfg.scope),
                  f"in_scope_{cfg.budget}": before,
                  f"removed_{cfg.budget}": before - after,
                  "removed_fraction": round((before - after) / before, 4) if before else 0.0,
                  "groups": report_groups}
        if dec:
            report["num_kv_heads"] = dec["num_kv_heads"]
        self._record(pruned, report)
        return PruneResult(pruned, report)

    # -- budget --------------------------------------------------------------------------------
    def _cost(self, info, groups, cand, n_remove) -> float:
        costs = _layer_costs(info, self.config.budget)
        cut: dict[tuple[str, int], int] = {}
        for i in cand:
            g = groups[i]
            k = n_remove[i]
            if not k:
                continue
            for d in g.weights:
                if d.tensor in costs:
                    per_unit = np.bincount(d.unit, minlength=g.units)
                    # cost of the k cheapest-to-count units is the same for every unit choice when
                    # units are uniform (they are: channels, KV groups); use the mean
                    cut[(d.tensor, d.axis)] = cut.get((d.tensor, d.axis), 0) + int(round(per_unit.mean() * k))
        seen = {d.tensor for i in cand for d in groups[i].weights if d.tensor in costs}
        total = 0.0
        for w in seen:
            shape = list(info.shapes[w])
            for ax in range(len(shape)):
                shape[ax] -= cut.get((w, ax), 0)
            total += float(np.prod(shape)) * costs[w]
        return total

    def _plan(self, info, groups, cand) -> dict[int, int]:
        cfg = self.config

        def n_for(g: Group, r: float) -> int:
            if cfg.align:
                align = cfg.align
            else:  # the widest default multiple the group is large enough for (>= 4 of them)
                align = next((a for a in ALIGN.get(g.kind, (8,)) if g.units >= 4 * a), 1)
            keep = g.units - int(round(r * g.units))
            if g.units >= 4 * align:
                keep = int(round(keep / align)) * align
            return int(min(max(g.units - max(keep, 1), 0), g.units - 1))

        heads = [i for i in cand if groups[i].kind == "heads" and groups[i].io]  # KV-cache groups
        rest = [i for i in cand if i not in heads]
        n = {i: 0 for i in cand}
        if heads:
            kv = {groups[i].units for i in heads}
            if len(kv) == 1:
                k = int(round(cfg.ratio * kv.pop()))
                k = min(k, groups[heads[0]].units - 1)
                for i in heads:
                    n[i] = k
        base = self._cost(info, groups, cand, {i: 0 for i in cand})
        target = base * (1 - cfg.ratio)
        if not rest or self._cost(info, groups, cand, n) <= target:
            return n
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            trial = {**n, **{i: n_for(groups[i], mid) for i in rest}}
            if self._cost(info, groups, cand, trial) > target:
                lo = mid
            else:
                hi = mid
        plans = [{**n, **{i: n_for(groups[i], r) for i in rest}} for r in (lo, hi)]
        # coarse (aligned) widths: groups take the larger removal one by one, in graph order, while
        # that brings the total closer to the target (SmolLM2 at 25%: MLP widths 1280 and 1152)
        mixed = dict(plans[0])
        for i in rest:
            if plans[1][i] == mixed[i]:
                continue
            trial = {**mixed, i: plans[1][i]}
            if abs(self._cost(info, groups, cand, trial) - target) >= abs(self._cost(info, groups, cand, mixed) - target):
                break
            mixed = trial
        plans.append(mixed)
        # the closest of the plans to the target (coarse units can overshoot)
        return min(plans, key=lambda p: abs(self._cost(info, groups, cand, p) - target))

    # -- metadata ------------------------------------------------------------------------------
    @staticmethod
    def _update_metadata(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
        meta = md.get_info(original)
        dec = meta.get("decoder")
        if not dec:
            return
        kv = {vi.type.tensor_type.shape.dim[1].dim_value for vi in pruned.graph.input
              if vi.name.startswith("past_key_values.")}
        if len(kv) != 1:
            raise RuntimeError(f"pruned decoder has different KV head counts per layer: {sorted(kv)}")
        md.set_info(pruned, task=meta["task"], decoder=dict(dec, num_kv_heads=kv.pop()))

    @staticmethod
    def _record(pruned: onnx.ModelProto, report: dict) -> None:
        summary = {k: v for k, v in report.items() if k != "groups"}
        summary["layers"] = {g["root"]: [g["kept"], g["units"]] for g in report["groups"] if g["status"] == "pruned"}
        props = {p.key: p.value for p in pruned.metadata_props}
        props["shiftc.prune"] = json.dumps(summary)
        del pruned.metadata_props[:]
        for k, v in props.items():
            pruned.metadata_props.add(key=k, value=v)


def summary(report: dict) -> str:
    """Printed form of a prune report: totals, then kept/total units per group (layer)."""
    lines = []
    if "groups" in report:
        b = report["budget"]
        lines.append(f"pruned {report['removed_fraction']:.1%} of the in-scope {b} "
                     f"({report[f'removed_{b}']:.3g} of {report[f'in_scope_{b}']:.3g}; {report['criterion']})"
                     + (f"; KV heads per layer: {report['num_kv_heads']}" if "num_kv_heads" in report else ""))
        for g in report["groups"]:
            what = {"heads": "KV groups" if g["unit_size"] > 1 else "heads", "mlp": "channels",
                    "channels": "channels"}[g["kind"]]
            unit = f" of {g['unit_size']}" if g["unit_size"] > 1 else ""
            tail = f"  ({g['reason']})" if g.get("reason") else ""
            lines.append(f"  {g['root']:<48} {g['kind']:<8} kept {g['kept']:>5}/{g['units']:<5} {what}{unit}"
                         f"  {g['status']}{tail}")
    if "nm" in report:
        nm = report["nm"]
        lines.append(f"N:M {nm['pattern']} ({nm['criterion']}) on {len(nm['layers'])} layers, "
                     f"{len(nm['skipped'])} skipped; sparse kernel: {nm['sparse_kernel']}")
    return "\n".join(lines)
