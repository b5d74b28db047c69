"""Compression recipes: a YAML file -> :class:`CompressConfig` (the same keys as the CLI flags).

Schema (every key optional; the values shown are the defaults)::

    shiftadd:
      bits: 3              # 1..4, planes per weight            (--shiftadd-bits)
      group: 128           # columns per scale, multiple of 32  (--group)
      scale_mode: pow2x2   # pow2 | pow2x2 | uniform            (--scale-mode)
      #                      uniform: a q-bit grid per group (float16 scale and min), its planes'
      #                      scales a shift apart (UniformMatMul): q + 32/G bits per weight
      act_order: true      # GPTQ activation ordering           (--act-order / --no-act-order)
      damp: 0.01           # GPTQ damping λ (H += λ·mean(diag H)·I)
      iters: 6             # alternating-refinement rounds per group
      lm_head: true        # quantize the LM head too           (--shiftadd-lm-head / --no-...)
      embedding_bits: 4    # token-embedding table of its own, uniform grid of 2^q levels (QGather); 0: fp32
      embedding_group: 32  # columns per scale and min of that table (q + 32/G bits per weight)
      tied_embedding: false  # a tied table instead read from the LM head's planes (BcqGather /
      #                        UniformGather): one copy,
      #                        smallest, but the head's bits then quantize the embedding too
      layer_bits: {}       # {initializer name or glob: bits}, first match wins
      layer_group: {}      # {initializer name or glob: group}, first match wins
      layer_damp: {}       # {initializer name or glob: damp}, first match wins (a tied LM head, named
      #                      lm_head, fitted with more damping keeps its rows closer to the weights:
      #                      H + λ·mean(diag H)·I weighs weight error, which the embedding reads)
      skip: []             # globs of layer names left in fp32
      workers: 0           # processes quantizing layers side by side (0: --threads, else one per core)
      distill_steps: 0     # fine-tune the scales vs the fp32 model, kept powers of two (0: off)  (--distill-steps)
      distill_minutes: null  # time bound                                (--distill-minutes)
      distill_loss: kl     # kl | dad (entropy-re-weighted KL)           (--distill-loss)
      distill_source: null # HF folder / .gguf (default: the export source)  (--distill-source)
      distill_lr: 0.0006
      distill_windows: 0   # calibration windows of distill_window tokens (0: one per step, <= 1024 and what the text holds), cycled
      distill_window: 512  # tokens per training window
      distill_seed: 0
      distill_norms: false # also tune the RMSNorm gains                  (--distill-norms)
      distill_planes: false  # also train the bit planes (latent weights, nearest code: QAT)  (--distill-planes)
      distill_plane_lr: 0.0003  # learning rate of the latent weights     (--distill-plane-lr)
    calib:
      corpus: wikipedia    # wikipedia | lee | none (none: data-free, plain BCQ)   (--calib)
      split: calib
      windows: 16          # calibration windows                 (--calib-windows)
      window: 256          # tokens per window                   (--calib-window)
      tokenizer: null      # HF folder or .gguf (default: the one recorded at export)
      sequential: 1        # stages: H of a stage's layers with the earlier stages quantized (1: off)
    threads: null          # threads for ONNX Runtime and torch
    prune:                 # structured pruning, before shift-add (schema: shiftc/passes/prune/prune.py)
      ratio: 0.25          # fraction of in-scope parameters (or FLOPs) removed  (--prune)
      criterion: activation  # activation | magnitude | lorapr            (--prune-criterion)
      scope: [mlp, heads, channels]                                       (--prune-scope)
      budget: params       # params | flops                                (--prune-budget)
      recover_steps: null  # LoRA fine-tune steps (recovery; lorapr budget) (--recover-steps)
      nm: null             # N:M sparsity after pruning, e.g. "2:4"        (--nm)
    A recipe with a prune section and no shiftadd section only prunes.
    binarize:              # the binarize pass instead of shift-add (shiftc/passes/binarize.py)
      mode: fdb            # fdb (2 {0,1} planes, float16 scales + offset) | 1bit  (--binarize)
      group: 128           # columns per scale, multiple of 32            (--group)
      act_order: false     # GPTQ activation ordering                      (--act-order)
      damp: 0.01
      iters: 8             # alternating rounds (codes / least-squares scales) per group
      lm_head: true        # (--shiftadd-lm-head / --no-...)
      skip: []             # globs of layer names left in fp32
      distill_*: ...       # as in shiftadd; here scales and offsets are fine-tuned (float16)
    A binarize section excludes a shiftadd section.
    mixed_precision:       # per-layer shift-add bits under a budget (shiftc/passes/mixed_precision)
      bits_budget: null    # average stored bits per weight, scales included; null: off  (--bits-budget)
      size_budget_mb: null # instead: MB (10^6 bytes) of every initializer of the output (quantized layers,
      #                      embedding table, norms, rotary frequencies, fp32 leftovers)  (--size-budget-mb)
      candidates: [2, 3, 4]  # widths to choose from                   (--mp-candidates)
      sensitivity: calib   # calib (output error via H = XᵀX) | hawq (Hessian traces, PyTorch)  (--sensitivity)
      tie: false           # layers sharing an input (q/k/v; gate/up) get one width  (--mp-tie)
      latency_budget_ms: null  # decode ms per token the plan may take: fixed cost + scale · Σ kernel times,
      #                          fitted on compiled uniform plans; host only  (--latency-budget-ms, --target)
      latency_margin: 0.01     # the plan is predicted at <= budget x (1 - margin): room for the latency
      #                          model's error (-1.4%..+2.9% on SmolLM2-135M)  (--latency-margin)
      latency_verify: 2        # closed loop: the plan compiled and measured beside the calibration plans;
      #                          over budget x (1 - margin): model refitted, plan made again; at most this
      #                          many compiled plans (0: trust the prediction)  (--latency-verify)
      measure_latency: false   # compile the output and record its measured decode time in the report
      cache: null          # folder keeping per-layer quantized results between runs  (--mp-cache)
      report: true         # OUT.report.json + OUT.report.html beside the output
      eval_tokens: 0       # perplexity before/after in the report        (--report-eval-tokens)
    (all keys: shiftc/passes/mixed_precision/config.py). At most one of bits_budget / size_budget_mb;
    with either set, layer_bits must be empty. Both work with every scale_mode; latency_budget_ms
    needs a BCQ scale_mode (pow2 / pow2x2).

Layer names are weight initializer names (decoder graphs: ``model.layers.3.mlp.down_proj.weight.T``)
or ``lm_head`` for a tied head. Unknown keys and bad values raise :class:`UsageError` naming the
file and key. Flags given on the command line override the recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ..errors import BadInputError, UsageError
from .prune.prune import PruneConfig
from .prune.prune import validate as validate_prune
from .mixed_precision.config import MixedPrecisionConfig, validate_mixed_precision
from . import uniform
from .shiftadd import ShiftAddConfig
from .binarize import BinarizeConfig
from .binarize import validate as validate_binarize
from .distill import validate_fields as validate_distill

SCALE_MODES = ("pow2", "pow2x2", "uniform")
CALIB_CORPORA = ("wikipedia", "lee", "none")


@dataclass
class CalibConfig:
    corpus: str = "wikipedia"
    split: str = "calib"
    windows: int = 16
    window: int = 256
    tokenizer: str | None = None
    sequential: int = 1  # stages of sequential calibration (1: every H from the fp32 model)


@dataclass
class CompressConfig:
    shiftadd: ShiftAddConfig = field(default_factory=ShiftAddConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    threads: int | None = None
    prune: PruneConfig | None = None  # None: no pruning; shiftadd None: no shift-add
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)  # bits_budget None: off
    binarize: BinarizeConfig | None = None  # None: off; set: the binarize pass instead of shift-add


def validate(cfg: CompressConfig, where: str = "") -> CompressConfig:
    """Check values; the message names the flag (and the recipe file when given)."""
    s, c = cfg.shiftadd, cfg.calib
    pre = f"{where}: " if where else ""

    def bad(flag, msg):
        raise UsageError(f"{pre}{flag} {msg}")

    if cfg.prune is not None:
        validate_prune(cfg.prune, pre)
    validate_mixed_precision(cfg.mixed_precision, bad)
    if s is None and cfg.mixed_precision.enabled:
        bad(cfg.mixed_precision.budget_flag().split()[0],
            "allocates shift-add bits: it needs the shift-add pass (a shiftadd section or flag)")
    if cfg.binarize is not None:
        if s is not None:
            bad("--binarize", "replaces the shift-add pass: drop --shiftadd-bits/--scale-mode (or the shiftadd section)")
        validate_binarize(cfg.binarize, bad)
        if c.corpus not in CALIB_CORPORA:
            bad("--calib", f"must be one of {', '.join(CALIB_CORPORA)}, got {c.corpus!r}")
    if s is None:
        return cfg

    for name, b in [("", s.bits)] + [(f" (layer_bits '{k}')", v) for k, v in s.layer_bits.items()]:
        if not isinstance(b, int) or not 1 <= b <= 4:
            bad("--shiftadd-bits" + name, f"must be 1..4, got {b!r}")
    for name, g in [("", s.group)] + [(f" (layer_group '{k}')", v) for k, v in s.layer_group.items()]:
        if not isinstance(g, int) or g < 32 or g % 32:
            bad("--group" + name, f"must be a positive multiple of 32, got {g!r}")
    for k, d in s.layer_damp.items():
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 10:
            bad(f"layer_damp '{k}'", f"must be in [0, 10), got {d!r}")
    if s.embedding_bits not in (0, *uniform.BITS):
        bad("embedding_bits", f"must be 0 (fp32 table) or one of {uniform.BITS}, got {s.embedding_bits!r}")
    if not isinstance(s.embedding_group, int) or s.embedding_group < 1:
        bad("embedding_group", f"must be a positive integer, got {s.embedding_group!r}")
    if s.scale_mode not in SCALE_MODES:
        bad("--scale-mode", f"must be one of {', '.join(SCALE_MODES)}, got {s.scale_mode!r}")
    if not 0 <= float(s.damp) < 10:
        bad("damp", f"must be in [0, 10), got {s.damp!r}")
    if not isinstance(s.iters, int) or s.iters < 0:
        bad("iters", f"must be an integer >= 0, got {s.iters!r}")
    if not isinstance(s.workers, int) or s.workers < 0:
        bad("workers", f"must be an integer >= 0, got {s.workers!r}")
    validate_distill(s, bad)
    if s.scale_mode == "uniform" and s.distill_enabled():
        bad("--distill-steps", "tunes BCQ / FDB scales; scale_mode uniform has no distillation yet (set it to 0)")
    if s.scale_mode == "uniform" and cfg.mixed_precision.latency_budget_ms is not None:
        bad("--latency-budget-ms", "times the BCQ LUT kernels (BcqMatMul); with scale_mode uniform plan by size alone "
                                   "(--bits-budget or --size-budget-mb)")
    if c.corpus not in CALIB_CORPORA:
        bad("--calib", f"must be one of {', '.join(CALIB_CORPORA)}, got {c.corpus!r}")
    for flag, v in (("--calib-windows", c.windows), ("--calib-window", c.window), ("calib.sequential", c.sequential)):
        if not isinstance(v, int) or v < 1:
            bad(flag, f"must be an integer >= 1, got {v!r}")
    return cfg


def _section(obj, data: dict, path: str, section: str):
    if not isinstance(data, dict):
        raise UsageError(f"{path}: '{section}' must be a mapping")
    known = {f.name for f in fields(obj)}
    for k, v in data.items():
        if k not in known:
            raise UsageError(f"{path}: unknown key '{section}.{k}' (known: {', '.join(sorted(known))})")
        setattr(obj, k, v)


def load_recipe(path: str | os.PathLike) -> CompressConfig:
    """Read a recipe file (schema in the module docstring)."""
    import yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise BadInputError(f"--recipe '{path}': no such file") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--recipe '{path}': not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--recipe '{path}': the top level must be a mapping")
    cfg = CompressConfig()
    for k, v in data.items():
        if k == "shiftadd":
            _section(cfg.shiftadd, v, path, k)
        elif k == "calib":
            _section(cfg.calib, v, path, k)
        elif k == "threads":
            cfg.threads = v
        elif k == "mixed_precision":
            _section(cfg.mixed_precision, v, path, k)
        elif k == "binarize":
            cfg.binarize = BinarizeConfig()
            _section(cfg.binarize, v, path, k)
            cfg.binarize.skip = list(cfg.binarize.skip or [])
            if "shiftadd" not in data:
                cfg.shiftadd = None
        elif k == "prune":
            cfg.prune = PruneConfig()
            _section(cfg.prune, v, path, k)
            if "shiftadd" not in data:
                cfg.shiftadd = None
        else:
            raise UsageError(f"{path}: unknown key '{k}' (known: shiftadd, binarize, calib, threads, prune, mixed_precision)")
    if cfg.shiftadd is not None:
        cfg.shiftadd.layer_bits = dict(cfg.shiftadd.layer_bits or {})
        cfg.shiftadd.layer_group = dict(cfg.shiftadd.layer_group or {})
        cfg.shiftadd.layer_damp = dict(cfg.shiftadd.layer_damp or {})
        cfg.shiftadd.skip = list(cfg.shiftadd.skip or [])
    return validate(cfg, f"--recipe '{path}'")
