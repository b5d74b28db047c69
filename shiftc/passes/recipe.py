"""Compression settings: :class:`CompressConfig`, read from a YAML recipe, flags and API keywords.

A recipe's sections and keys are the dataclass fields of :data:`SECTIONS` (``shiftadd``:
:class:`~shiftc.passes.shiftadd.ShiftAddConfig`, ``binarize``, ``prune``, ``mixed_precision``,
``calib``) plus ``threads``. A field declared with :func:`shiftc.options.option` is also a
``shiftc compress`` flag and a keyword of ``shiftc.compress`` (one declaration: key, flag, help,
parser); any other key is reachable as ``--set section.key=value`` / ``**{"section.key": value}``.
``python -m shiftc.passes.recipe`` prints every key with its default and flag (:func:`schema`).

Rules of combination: a recipe with a ``prune`` section and no ``shiftadd`` section only prunes
(so do pruning flags without a recipe and without shift-add flags); a ``binarize`` section (or
``--binarize``) replaces the shift-add pass, and the flags that only mean something to shift-add
are refused with it; at most one of ``mixed_precision.bits_budget`` / ``size_budget_mb``, and with
either set ``layer_bits`` must be empty; ``latency_budget_ms`` needs a BCQ scale_mode (pow2 /
pow2x2). Layer names are weight initializer names (decoder graphs:
``model.layers.3.mlp.down_proj.weight.T``) or ``lm_head`` for a tied head; ``layer_*`` tables map
a name or glob to a value, first match wins. Unknown keys and bad values raise
:class:`UsageError` naming the file and key. Flags given on the command line override the recipe."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from .. import options as opts
from ..errors import BadInputError, UsageError
from ..options import field_default, field_options, option
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
    corpus: str = option("wikipedia", flag="--calib", choices=CALIB_CORPORA,
                         help="calibration text (default {default}; none: data-free)")
    data: str | None = option(None, flag="--calib-data", metavar="PATH",
                              help="your own calibration text instead of --calib: plain text (documents "
                                   "separated by blank lines), .jsonl (a 'text' field per line) or .parquet (a "
                                   "'text' column); from Python also a list of strings")
    split: str | None = None  # calib | eval (Wikipedia's); with data: calib | eval | all (default all)
    windows: int = option(16, flag="--calib-windows", parse=opts.positive, help="calibration windows (default {default})")
    window: int = option(256, flag="--calib-window", parse=opts.positive,
                         help="tokens per calibration window (default {default})")
    tokenizer: str | None = option(None, flag="--tokenizer",
                                   help="HF folder or .gguf (default: the one recorded at export)")
    sequential: int = 1  # stages of sequential calibration (1: every H from the fp32 model)


@dataclass
class CompressConfig:
    """Every compress setting: the recipe's sections are these fields, the flags and API keywords
    are the fields declared with :func:`shiftc.options.option` (:data:`SECTIONS`)."""

    shiftadd: ShiftAddConfig | None = field(default_factory=ShiftAddConfig)  # None: no shift-add
    calib: CalibConfig = field(default_factory=CalibConfig)
    threads: int | None = option(None, flag="--threads", parse=opts.positive, help="threads for ONNX Runtime and torch")
    prune: PruneConfig | None = None  # None: no pruning
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)  # bits_budget None: off
    binarize: BinarizeConfig | None = None  # None: off; set: the binarize pass instead of shift-add


# the sections of CompressConfig, in the order the CLI lists their flags
SECTIONS = {"shiftadd": ShiftAddConfig, "binarize": BinarizeConfig, "prune": PruneConfig,
            "mixed_precision": MixedPrecisionConfig, "calib": CalibConfig}


def compress_options():
    """(section or None for a top-level field, field, Option) for every compress option."""
    for name, cls in SECTIONS.items():
        for f, o in field_options(cls):
            yield name, f, o
    for f, o in field_options(CompressConfig):
        yield None, f, o


def apply_overrides(cfg: CompressConfig, overrides: dict, *, from_recipe: bool = False) -> CompressConfig:
    """Set options on ``cfg`` (in place; returned). ``overrides`` maps API keywords (``bits=3``,
    ``calib_windows=8``: the flags without dashes, see :func:`compress_options`) or recipe keys
    (``"shiftadd.damp": 0.02``) to values; None means not given. A keyword shared by the shift-add
    and binarize sections (``group``, ``act_order``, ``lm_head``, ``skip``, ``distill_*``) goes to
    the pass in use; giving an option switches its section on (``prune=0.3`` prunes; pruning options
    alone, without a recipe, prune only)."""
    table: dict[str, dict] = {}
    for section, f, o in compress_options():
        table.setdefault(o.kw, {})[section] = (f.name, o)
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in given:
        if "." not in key and key not in table:
            raise UsageError(f"unknown compress option '{key}' (known: {', '.join(sorted(table))}; or a recipe key "
                             f"such as shiftadd.damp)")

    def enables(section):  # keywords given that switch ``section`` on
        return [k for k in given if k in table and (section in table[k] or any(
            o.requires == section for _, o in table[k].values())) and all(o.enables for _, o in table[k].values())]

    def flag(k):
        return next(iter(table[k].values()))[1].flag or k

    if enables("prune"):
        cfg.prune = cfg.prune or PruneConfig(ratio=0.0)
        if not from_recipe and not enables("shiftadd"):
            cfg.shiftadd = None  # prune only
    if "binarize" in given or cfg.binarize is not None:  # the binarize pass instead of shift-add
        only = [flag(k) for k in enables("shiftadd") if "binarize" not in table[k]]
        if only:
            raise UsageError(f"--binarize replaces the shift-add pass; {', '.join(only)} cannot be used with it")
        cfg.binarize, cfg.shiftadd = cfg.binarize or BinarizeConfig(), None
    elif cfg.shiftadd is None and enables("shiftadd"):
        cfg.shiftadd = ShiftAddConfig()
    elif cfg.shiftadd is None and any(k.startswith("distill_") for k in given):
        raise UsageError("--distill-steps/--distill-minutes fine-tune the scales of a compressed model: "
                         "add --shiftadd-bits N or --binarize fdb|1bit")
    for key, value in given.items():
        if "." in key:
            _set_key(cfg, key, value)
            continue
        sections = table[key]
        section = next((s for s in ("binarize", "shiftadd") if s in sections and getattr(cfg, s) is not None),
                       next(iter(sections)))
        name = sections[section][0]
        obj = cfg if section is None else getattr(cfg, section)
        setattr(obj, name, list(value) if isinstance(value, tuple) else value)
    return cfg


def _set_key(cfg: CompressConfig, key: str, value) -> None:
    """``section.field`` (a recipe key) = value, creating the section."""
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise UsageError(f"'{key}': unknown recipe section '{section}' (known: {', '.join(SECTIONS)})")
    if getattr(cfg, section) is None:
        setattr(cfg, section, SECTIONS[section]())
    _section(getattr(cfg, section), {name: value}, f"'{key}'", section)


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
    if c.data is not None and c.corpus == "none":
        bad("--calib-data", "gives calibration text, --calib none asks for none: drop one of them")
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


def schema() -> str:
    """Every recipe key with its default, as a YAML recipe (the sections off by default commented
    out); a comment names the key's flag and help."""
    import yaml

    def value(v):
        return yaml.safe_dump(v, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...")

    flags = {(sec, f.name): o for sec, f, o in compress_options()}
    lines = []
    for sec, cls in SECTIONS.items():
        off = getattr(CompressConfig(), sec) is None
        lines.append(f"{'# ' if off else ''}{sec}:{'  # off by default' if off else ''}")
        own = cls.__dict__.get("__annotations__", {})
        for f in sorted(fields(cls), key=lambda f: f.name not in own):
            o = flags.get((sec, f.name))
            note = f"  # {o.flag or o.kw}: {o.help.format(default=field_default(f))}" if o else ""
            lines.append(f"{'# ' if off else ''}  {f.name}: {value(field_default(f))}{note}")
    lines.append(f"threads: {value(CompressConfig().threads)}  # --threads")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(schema(), end="")
