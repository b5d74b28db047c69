"""What the benchmark scripts share: where they work, and how they keep their results.

* Scratch files (exported models, libraries, caches) go under ``out/bench/<name>`` of the checkout
  (:func:`work_dir`), never the system temp folder, so a rerun finds them and ``make clean`` removes them.
* A run's result is written twice by :func:`write_results`: in full under ``out/bench/raw/`` and, as
  a summary, to the path the script was given (``benchmarks/results/<name>.json`` by default). The
  summary keeps every scalar and short list; long series (loss histories, per-step timings) become
  their count, min, median and max, large per-layer tables their value counts (or their size and
  first entry), and earlier runs kept in a result (``previous_*`` keys) stay in the raw file, so that the
  committed results stay small (all of benchmarks/results/ under 200 KB; tests/test_layering.py).
  README and docs tables are read from these summaries.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
WORK = os.path.join(ROOT, "out", "bench")
MAX_LIST = 16  # longer lists of numbers are summarised
MAX_TABLE = 48  # larger mappings of scalars become their value counts, larger lists of records their count


def work_dir(name: str) -> str:
    """``out/bench/<name>`` (created)."""
    path = os.path.join(WORK, name)
    os.makedirs(path, exist_ok=True)
    return path


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def compact(obj):
    """The summary form of a result (see the module docstring)."""
    if isinstance(obj, dict):
        if len(obj) > MAX_TABLE and all(_scalar(v) for v in obj.values()):
            return {"entries": len(obj), "value_counts": {str(k): n for k, n in Counter(map(str, obj.values())).most_common()}}
        if len(obj) > MAX_TABLE:
            key = next(iter(obj))
            return {"entries": len(obj), "first_key": key, "first": compact(obj[key])}
        return {k: compact(v) for k, v in obj.items() if not k.startswith("previous") and not k.endswith("_previous")}
    if isinstance(obj, list):
        numbers = [v for v in obj if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(obj) > MAX_LIST and len(numbers) == len(obj):
            return {"n": len(obj), "min": min(numbers), "median": statistics.median(numbers), "max": max(numbers),
                    "first": numbers[0], "last": numbers[-1]}
        if len(obj) > MAX_TABLE:
            return {"n": len(obj), "first": compact(obj[0]), "last": compact(obj[-1])}
        return [compact(v) for v in obj]
    return obj


def raw_path(path: str) -> str:
    """Where :func:`write_results` keeps the full result whose summary goes to ``path``."""
    return os.path.join(WORK, "raw", os.path.basename(path))


def read_results(path: str) -> dict:
    """The full result :func:`write_results` wrote for ``path`` (earlier runs a script keeps, whole
    tables), else ``path`` itself (a summary, or a file written before this module existed)."""
    raw = raw_path(path)
    with open(raw if os.path.exists(raw) else path) as f:
        return json.load(f)


def write_results(path: str, result: dict, *, indent: int = 1) -> str:
    """The full result to ``out/bench/raw/<file name>``, its summary to ``path`` (both atomically).
    Returns the raw file's path."""
    raw = raw_path(path)
    _write_json(raw, result, indent)
    _write_json(path, compact(result), indent)
    return raw


def _write_json(path: str, obj, indent: int) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":  # summarise results written before this module existed, in place
    import sys

    for p in sys.argv[1:]:
        with open(p) as f:
            _write_json(p, compact(json.load(f)), 1)
