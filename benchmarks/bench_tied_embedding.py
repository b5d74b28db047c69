"""The embedding table of a shift-add decoder: fp32, a table of its own (QGather), or the tied head's planes (BcqGather).

SmolLM2-135M ties its LM head to its embedding. Before this work the shift-add pass packed the
head and left the embedding lookup reading the fp32 table (113 MB of the 3-bit library's 184 MB).
This benchmark compresses the model once with ``tied_embedding`` (the head's planes read by
BcqGather), builds the other variants from the same planes — the lookup on the fp32 table, and
on tables of their own on a uniform grid (QGather, ``embedding_bits``/``embedding_group``) — and
reports for each the perplexity on the same held-out windows (ONNX Runtime through the
de-quantized copy, which equals the function bodies) and the size of the compiled library.

    .venv/bin/python benchmarks/bench_tied_embedding.py [--tokens 32768] [--bits 3] [--tables 4g32,8g64]
        [--workdir out/bench-tied] [--out benchmarks/results/tied_embedding.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import onnx
from onnx import helper

from common import write_results


def untied_variant(compressed: onnx.ModelProto, fp32: onnx.ModelProto, bits: int = 0, group: int = 32) -> onnx.ModelProto:
    """``compressed`` with each BcqGather replaced by a Gather on the fp32 table it was made from
    (``bits`` > 0: by a QGather on that table quantized by the shift-add pass's embedding step)."""
    meta = json.loads({p.key: p.value for p in compressed.metadata_props}["shiftc.compression"])
    if not meta.get("tied_embedding"):
        raise SystemExit("the compressed model has no tied BcqGather")
    table = next(n.input[0] for n in fp32.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    out = onnx.ModelProto()
    out.CopyFrom(compressed)
    nodes = []
    for n in out.graph.node:
        if n.op_type == "BcqGather":
            n = helper.make_node("Gather", [table, n.input[0]], list(n.output), name=n.name + "_fp32", axis=0)
        nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(t for t in fp32.graph.initializer if t.name == table)
    if bits:
        from shiftc.passes import ops
        from shiftc.passes.shiftadd import embedding_tables

        replacements, new_inits = {}, []
        inits = {t.name: t for t in out.graph.initializer}
        embedding_tables(out.graph, inits, replacements, new_inits, bits, group)
        nodes = [replacements.get(i, [n])[0] for i, n in enumerate(out.graph.node)]
        del out.graph.node[:]
        out.graph.node.extend(nodes)
        keep = [t for t in out.graph.initializer if t.name != table] + new_inits
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
        ops.add_functions(out, ["QGather"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out/bench-tied")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tables", type=lambda v: [tuple(int(x) for x in t.split("g")) for t in v.split(",")],
                   default=[(4, 32), (8, 64)], help="own-table variants as QgG, e.g. 4g32,8g64")
    p.add_argument("--out", default="benchmarks/results/tied_embedding.json")
    args = p.parse_args(argv)

    from shiftc import api
    from shiftc.frontend.data import smollm2_gguf

    os.makedirs(args.workdir, exist_ok=True)
    fp32 = os.path.join(args.workdir, "smollm2-135m.onnx")
    tied = os.path.join(args.workdir, f"sa{args.bits}-tied.onnx")
    untied = os.path.join(args.workdir, f"sa{args.bits}-fp32-embedding.onnx")
    if not os.path.exists(fp32):
        api.export(str(smollm2_gguf()), fp32, max_positions=2048)
    t0 = time.perf_counter()
    if not os.path.exists(tied):
        from shiftc.passes.recipe import CompressConfig
        from shiftc.passes.shiftadd import ShiftAddConfig
        from shiftc.passes.compress import compress as run_compress
        from shiftc.passes.recipe import validate

        cfg = CompressConfig()
        cfg.shiftadd = ShiftAddConfig(bits=args.bits, tied_embedding=True)
        cfg.threads = args.threads
        run_compress(fp32, tied, validate(cfg))
    compress_s = time.perf_counter() - t0
    variants = [("tied: the head's planes (BcqGather)", tied), ("fp32 table", untied)]
    onnx.save(untied_variant(onnx.load(tied), onnx.load(fp32)), untied)
    for q, g in args.tables:
        path = os.path.join(args.workdir, f"sa{args.bits}-q{q}g{g}-embedding.onnx")
        onnx.save(untied_variant(onnx.load(tied), onnx.load(fp32), q, g), path)
        variants.append((f"own table q{q} G{g} (QGather)", path))
    rows = {}
    for name, path in variants:
        lib = path[:-5] + ".so"
        api.compile(path, lib, target="host")
        ev = api.evaluate(path, tokens=args.tokens, window=args.window, threads=args.threads)
        rows[name] = {"onnx": path, "library_bytes": os.path.getsize(lib), "onnx_bytes": os.path.getsize(path),
                      "perplexity": ev["perplexity"], "tokens_scored": ev["tokens_scored"]}
    ref = rows["fp32 table"]
    for r in rows.values():
        r["size_vs_fp32_table"] = r["library_bytes"] / ref["library_bytes"]
        r["perplexity_change"] = r["perplexity"] / ref["perplexity"] - 1
    result = {"bits": args.bits, "tokens": args.tokens, "window": args.window, "compress_s": compress_s, "rows": rows}
    print(f"SmolLM2-135M shift-add {args.bits}-bit, {ref['tokens_scored']} held-out tokens; embedding table:")
    for name, r in rows.items():
        print(f"  {name:<38} library {r['library_bytes'] / 1e6:7.1f} MB (x{r['size_vs_fp32_table']:.3f})   "
              f"perplexity {r['perplexity']:.3f} ({r['perplexity_change'] * 100:+.2f}%)")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
