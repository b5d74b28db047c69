"""Options declared once, on the dataclass field they set.

A compress option is a field of one of the config dataclasses (``passes/recipe.py:CompressConfig``
and its sections) built with :func:`option`. Its metadata makes the recipe key (the field name),
the Python API keyword (``kw``), the CLI flag and its help, and the parser of a flag's text, so
that adding an option touches that one field::

    damp: float = option(0.01, flag="--damp", parse=number_in(0, 10), help="GPTQ damping")

The parsers here raise :class:`argparse.ArgumentTypeError` (argparse turns it into a usage error
naming the flag); they are shared by every command of the CLI. This module imports nothing of
shiftc, so any layer may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING
from typing import Any, Callable, Iterator

META = "shiftc"


@dataclasses.dataclass(frozen=True)
class Option:
    """What :func:`option` records on a field."""

    kw: str  # Python API keyword (and the CLI's dest)
    flag: str | None  # CLI flag; None: recipe and API only
    help: str = ""
    parse: Callable[[str], Any] | None = None  # flag text -> value (argparse ``type``)
    choices: tuple | None = None
    metavar: str | None = None
    requires: str | None = None  # a section the option needs on (e.g. a budget needs shiftadd)
    enables: bool = True  # giving it switches its section on (False: distillation, which refines a pass)


def option(default: Any = MISSING, *, flag: str | None = None, kw: str | None = None, help: str = "",
           parse: Callable[[str], Any] | None = None, choices=None, metavar: str | None = None,
           requires: str | None = None, enables: bool = True, default_factory: Any = MISSING):
    """A dataclass field that is also a compress option (see the module docstring). ``kw`` defaults
    to the flag without dashes (``--calib-windows`` -> ``calib_windows``)."""
    if kw is None:
        if flag is None:
            raise ValueError("option() needs a flag or a kw")
        kw = flag.lstrip("-").replace("-", "_")
    meta = Option(kw=kw, flag=flag, help=help, parse=parse, choices=tuple(choices) if choices else None,
                  metavar=metavar, requires=requires, enables=enables)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={META: meta})


def field_options(cls) -> Iterator[tuple[dataclasses.Field, Option]]:
    """(field, Option) for each field of dataclass ``cls`` declared with :func:`option`: the class's
    own fields first, then those it inherits."""
    own = cls.__dict__.get("__annotations__", {})
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        if META in f.metadata:
            yield f, f.metadata[META]


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_arguments(parser: argparse.ArgumentParser, entries) -> None:
    """Add one flag per distinct Option with a flag; ``entries`` are (field, Option) pairs in the
    order the flags should be listed (a flag shared by two sections is added once, the first
    entry's help). Defaults stay None so that the caller can tell a flag given from one left out;
    a help text may name ``{default}``."""
    seen = set()
    for f, o in entries:
        if o.flag is None or o.flag in seen:
            continue
        seen.add(o.flag)
        default = field_default(f)
        text = o.help.format(default=default)
        if isinstance(default, bool):
            parser.add_argument(o.flag, dest=o.kw, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(o.flag, dest=o.kw, type=o.parse, choices=o.choices, metavar=o.metavar, help=text)


# -- parsers of flag text -----------------------------------------------------------------------


def int_at_least(lo: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not an integer") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo} (got {n})")
        return n
    return parse


positive = int_at_least(1)
nonnegative = int_at_least(0)


def _number(value: str, what: str = "a number") -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not {what}") from None


def bits(value: str) -> int:
    n = positive(value) if value.lstrip("-").isdigit() else None
    if n is None or not 1 <= n <= 4:
        raise argparse.ArgumentTypeError(f"must be 1..4 (got {value})")
    return n


def fraction(value: str) -> float:
    f = _number(value)
    if not 0 <= f < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) (got {value})")
    return f


def bits_budget(value: str) -> float:
    f = _number(value, "a number of bits per weight")
    if not 1 <= f <= 8:
        raise argparse.ArgumentTypeError(f"must be in [1, 8] bits per weight (got {value})")
    return f


def megabytes(value: str) -> float:
    f = _number(value, "a number of megabytes")
    if not f > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 megabytes (got {value})")
    return f


def bit_list(value: str) -> list[int]:
    try:
        widths = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma-separated list of bit widths") from None
    if not widths or any(not 1 <= b <= 4 for b in widths) or len(set(widths)) != len(widths):
        raise argparse.ArgumentTypeError(f"must be distinct bit widths in 1..4 (got {value})")
    return widths


def group(value: str) -> int:
    n = positive(value)
    if n % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32 (got {n})")
    return n
