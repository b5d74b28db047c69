"""The README's results table, rendered from benchmarks/results/vs_llamacpp.json.

    .venv/bin/python benchmarks/readme_table.py [--results benchmarks/results/vs_llamacpp.json]

prints the Markdown table; tests/test_readme.py checks that the README holds exactly these rows,
so that a rerun of bench_vs_llamacpp.py and the README cannot disagree.
"""

from __future__ import annotations

import argparse
import json
import os

from common import RESULTS

COLUMNS = [("decode C=128,T=1", "decode C=128"), ("decode C=1024,T=1", "C=1024"),
           ("decode C=128,T=2", "C=128, 2 thr."), ("decode C=1024,T=2", "C=1024, 2 thr."),
           ("prefill P=512,T=1", "prefill 512")]
# shown under another name (the demo's recipe is named in the README)
LABELS = {"shiftc uniform-4bit": "shiftc `uniform-4bit` (the demo's)", "shiftc uniform-3bit": "shiftc `uniform-3bit`",
          "shiftc uniform-3bit-small": "shiftc `uniform-3bit-small`", "ORT GenAI int4": "ONNX Runtime GenAI int4"}
SKIP = {"shiftc onnx fp32"}  # the reference graph, scored to check the F32 GGUF against it


def rows(result: dict) -> list[str]:
    out = ["| library | MB | perplexity | " + " | ".join(c for _, c in COLUMNS) + " |",
           "|" + "---|" * (3 + len(COLUMNS))]
    for name, lib in result["libraries"].items():
        if name in SKIP:
            continue
        speed = result["speed"].get(name, {})
        cells = [f"{speed[k]['tokens_per_s']:.1f}" if k in speed else "" for k, _ in COLUMNS]
        ppl = result["perplexity"][name]["perplexity"]
        out.append(f"| {LABELS.get(name, name)} | {lib['bytes'] / 1e6:.1f} | {ppl:.2f} | " + " | ".join(cells) + " |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(RESULTS, "vs_llamacpp.json"))
    args = ap.parse_args(argv)
    with open(args.results) as f:
        print("\n".join(rows(json.load(f))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
