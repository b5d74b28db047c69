"""Which per-token re-weighting of the distillation KL helps perplexity? A tuning run on the calib split.

Deviation-aware distillation (DB-LLM §3.3) re-weights each token's KL(teacher || student) by an
uncertainty measure so that ambiguous tokens get more emphasis; the paper's exact equation was not
available, so shiftc's ``dad`` is one reading (weight H(p, q) = H(p) + KL, shiftc/passes/distill.py).
This bench trains the same FDB 2-bit SmolLM2-135M (bench_fdb.py's model) with each weighting for
the same short budget and seed and compares the student's next-token NLL (and KL) on held-out
windows of the *calib* split (never the evaluation split):

    kl            plain KL (weight 1)
    dad           H(p_t, q_t) = H(p_t) + KL_t           (shiftc's dad)
    dad-teacher   H(p_t)                                 (teacher entropy: ambiguity of the sample)
    dad-product   H(p_t) · H(q_t)                        (teacher and student uncertainty)
    dad-sqrt      H(p_t, q_t)^½                          (shiftc's dad, tempered)
    dad-curriculum (H(p_t)/mean H)^(2·progress − 1)       (confident tokens first, ambiguous ones last)

Each weight is used without gradient and normalised to mean 1 per batch. One process per variant,
run one after the other (1 thread), then the rows are merged into one JSON:

    for v in kl dad dad-teacher dad-product dad-sqrt dad-curriculum; do OMP_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/bench_dad_weights.py --variant $v --model out/bench/fdb/smol_fdb_g128.onnx --steps 60 \\
        --lr 6e-4 --window 256 --windows 64 --dev-windows 8 --seed 0 --out out/bench/dadtune/$v.json; done
    .venv/bin/python benchmarks/bench_dad_weights.py --merge out/bench/dadtune/{kl,dad,dad-teacher,dad-product,dad-sqrt,dad-curriculum}.json \\
        --out benchmarks/results/dad_weights.json

Result (dad_weights.json, 60 steps, seed 0): plain KL has the lowest dev NLL (4.682); the tempered
dad-sqrt comes closest (4.685), dad 4.694, and the curriculum is far behind (5.023). A reason to
expect this: if the teacher's distribution stood for the data's, the student's expected NLL per
token would be H(p_t) + KL_t, so the *unweighted* mean KL is exactly the part of the perplexity
the student controls; a re-weighting can only win through the optimisation path, not the target.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import write_results


def _teacher_entropy(pt, lpt, lps, kl, progress):
    return -(pt * lpt).sum(-1)


def _product(pt, lpt, lps, kl, progress):
    return -(pt * lpt).sum(-1) * -(lps.exp() * lps).sum(-1)


def _sqrt_cross_entropy(pt, lpt, lps, kl, progress):
    return (-(pt * lps).sum(-1)).sqrt()


def _curriculum(pt, lpt, lps, kl, progress):
    h = _teacher_entropy(pt, lpt, lps, kl, progress)
    return (h / h.mean().clamp_min(1e-12)).clamp_min(1e-3) ** (2.0 * progress - 1.0)


VARIANTS = {"dad-teacher": _teacher_entropy, "dad-product": _product, "dad-sqrt": _sqrt_cross_entropy,
            "dad-curriculum": _curriculum}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="dad", choices=["kl", "dad", *VARIANTS])
    p.add_argument("--merge", nargs="+", metavar="JSON")
    p.add_argument("--out", default="benchmarks/results/dad_weights.json")
    a, rest = p.parse_known_args(argv)
    if a.merge:
        rows = []
        for path in a.merge:
            r = json.load(open(path))
            for row in r["rows"][1:]:
                rows.append({"variant": r.get("variant", row.get("loss")),
                             **{k: row.get(k) for k in ("steps", "seconds", "lr", "seed", "window", "windows", "dev_windows",
                                                        "dev_kl_before", "dev_kl_after", "dev_nll_before", "dev_nll_after",
                                                        "kl_first5", "kl_last5")}})
        out = {"model": r["model"], "split": "wikipedia/calib (dev windows after the training windows)",
               "rows": rows, "commands": [json.load(open(path))["command"] for path in a.merge]}
        write_results(a.out, out)
        print(f"{'variant':14} {'dev NLL':>9} {'dev KL':>8}")
        for row in sorted(rows, key=lambda r: r["dev_nll_after"]):
            print(f"{row['variant']:14} {row['dev_nll_after']:9.4f} {row['dev_kl_after']:8.4f}")
        return 0
    from shiftc.passes import distill as D

    import bench_fdb_distill

    D.TOKEN_WEIGHTS.update(VARIANTS)
    loss = a.variant
    out = a.out
    rc = bench_fdb_distill.main([*rest, "--losses", loss, "--no-eval", "--out", out])
    r = json.load(open(out))
    r["variant"] = a.variant
    r["command"] = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dad_weights.py " + " ".join(argv or sys.argv[1:])
    with open(out, "w") as f:
        json.dump(r, f, indent=2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
