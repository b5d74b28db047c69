"""The README's results table is the rendering of the committed benchmark summary."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_table_is_the_benchmark_summary():
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_table.py")], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(table) > 3
    missing = [row for row in table if row not in readme]
    assert not missing, f"README.md rows differ from benchmarks/results/vs_llamacpp.json: {missing}"


def test_results_stay_small():
    """Committed results are summaries (benchmarks/common.py); full runs go under out/."""
    total = sum(p.stat().st_size for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_file())
    assert total <= 200_000, f"benchmarks/results/ holds {total} bytes (limit 200 KB)"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
