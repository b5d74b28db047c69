"""The compression report beside the output: ``OUT.report.json`` and ``OUT.report.html``.

The HTML page is one self-contained file (plots are PNGs drawn with matplotlib, embedded as
data URIs): a summary (sizes before/after, bits per weight, budget, perplexity before/after when
measured), per-layer sensitivity and chosen bits, the Pareto curve of the budget sweep (total
predicted sensitivity against average bits per weight, with the chosen plan, uniform widths and
ShiftAddLLM's sort-and-threshold plan), the rank agreement of the two sensitivity measures when
both exist, and a per-layer table. The JSON holds the same data.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

BIT_COLORS = {1: "#d62728", 2: "#ff7f0e", 3: "#2ca02c", 4: "#1f77b4"}


def report_paths(output: str) -> tuple[str, str]:
    base = output[:-5] if output.endswith(".onnx") else output
    return base + ".report.json", base + ".report.html"


def _short(name: str) -> str:
    s = name.replace("model.layers.", "L").replace(".weight.T", "").replace(".self_attn.", ".").replace(".mlp.", ".")
    return s


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _block_ticks(names: list[str]):
    """x ticks at the first layer of each transformer block (L0, L1, ...) and at other layers."""
    ticks, labels, seen = [], [], set()
    for i, n in enumerate(names):
        s = _short(n)
        blk = s.split(".")[0] if s.startswith("L") else s
        if blk not in seen:
            seen.add(blk)
            ticks.append(i)
            labels.append(blk)
    if len(ticks) > 40:  # keep labels readable: every k-th block
        k = -(-len(ticks) // 40)
        ticks, labels = ticks[::k] + ticks[-1:], labels[::k] + labels[-1:]
    return ticks, labels


def plot_layers(plan: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = plan["table"]
    names = table.names()
    x = np.arange(len(names))
    sens = table.matrix(plan["kind"])
    chosen = np.array([plan["layer_bits"][n] for n in names])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for j, b in enumerate(table.bits):
        ax1.semilogy(x, np.maximum(sens[:, j], 1e-30), ".-", lw=0.8, ms=3.5, color=BIT_COLORS.get(b), label=f"{b}-bit")
    ax1.set_ylabel(f"sensitivity ({plan['kind']}), log scale", fontsize=11)
    ax1.set_title(f"Per-layer sensitivity at each candidate width and the chosen widths "
                  f"(budget {_budget_text(plan)} -> {plan['avg_bits']:.3f} bits/weight)", fontsize=12)
    ax1.grid(True, which="major", alpha=0.3)
    ax1.legend(title="quantized at", fontsize=10, ncol=len(table.bits))
    ax2.bar(x, chosen, width=1.0, color=[BIT_COLORS.get(int(b), "gray") for b in chosen], edgecolor="none")
    ax2.set_ylabel("chosen bits", fontsize=11)
    ax2.set_yticks(table.bits)
    ax2.set_ylim(0, max(table.bits) + 0.5)
    ticks, labels = _block_ticks(names)
    ax2.set_xticks(ticks)
    ax2.set_xticklabels(labels, rotation=90, fontsize=8)
    ax2.set_xlabel("layer (graph order; ticks at the first layer of each block)", fontsize=11)
    ax2.set_xlim(-1, len(names))
    fig.tight_layout()
    return _png(fig)


def plot_pareto(plan: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = plan["table"]
    sens = table.matrix(plan["kind"])
    bpw = table.bits_per_weight()
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    front = plan["pareto"]
    ax.semilogy([p["avg_bits"] for p in front], [p["objective"] for p in front], "o-", color="#1f77b4", ms=4,
                label="optimal plan at each budget (MILP)")
    for j, b in enumerate(table.bits):
        ax.semilogy([bpw[j]], [sens[:, j].sum()], "s", color=BIT_COLORS.get(b), ms=8, label=f"uniform {b}-bit")
    ax.semilogy([plan["avg_bits"]], [plan["objective"]], "*", color="#d62728", ms=16, label="chosen plan")
    if "shiftaddllm_plan" in plan:  # drawn on top, hollow: it often lies next to the chosen plan
        s = plan["shiftaddllm_plan"]
        ax.semilogy([s["avg_bits"]], [s["objective"]], "^", mfc="none", mec="black", mew=1.5, ms=12,
                    label="ShiftAddLLM sort-and-threshold")
    if plan.get("bits_budget") is not None:
        ax.axvline(plan["bits_budget"], color="gray", ls="--", lw=1)
    ys = [p["objective"] for p in front] + [float(sens[:, j].sum()) for j in range(len(table.bits))]
    if ys and min(ys) > 0 and max(ys) / min(ys) < 20:  # a narrow range reads better on a linear axis
        ax.set_yscale("linear")
    ax.set_xlabel("average bits per weight (scales included)", fontsize=11)
    ax.set_ylabel(f"total predicted sensitivity ({plan['kind']})", fontsize=11)
    ax.set_title("Pareto frontier of the budget sweep", fontsize=12)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_rank(plan: dict) -> str | None:
    """Rank scatter of each pair of measured sensitivities, at the lowest width."""
    if not plan.get("rank_agreement"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    table = plan["table"]
    b = table.bits[0]
    pairs = list(plan["rank_agreement"])
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 5.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        x, y = pair.split(" vs ")
        rx, ry = rankdata(table.matrix(x)[:, 0]), rankdata(table.matrix(y)[:, 0])
        tau = plan["rank_agreement"][pair][f"{b}-bit"]["tau"]
        ax.scatter(rx, ry, s=12, alpha=0.7)
        ax.set_xlabel(f"layer rank by {x} ({b}-bit)", fontsize=11)
        ax.set_ylabel(f"layer rank by {y} ({b}-bit)", fontsize=11)
        ax.set_title(f"{x} vs {y}: Kendall tau = {tau:.3f}", fontsize=12)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _budget_text(plan: dict) -> str:
    if plan.get("size_budget_mb") is not None:
        return f"{plan['size_budget_mb']:g} MB"
    return f"{plan['bits_budget']:g} bits/weight"


def _fmt_mb(b) -> str:
    if b is None:
        return "—"
    return f"{b / 1e6:.1f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB"


def build(result: dict, plan: dict | None, perplexity: dict | None = None) -> dict:
    """The report's JSON from the compress result and the plan."""
    from .plan import to_json

    layers = result.get("layers", {})
    n = sum(int(np.prod(e["shape"])) for e in layers.values())
    rep = {"source": result.get("source"), "output": result.get("path"),
           "size_bytes": {"before": result.get("source_size_bytes"), "after": result.get("size_bytes")},
           "quantized_weights": n, "quantized_bytes": {"fp32": 4 * n, "stored": result.get("bits_per_weight", 0) * n / 8},
           "bits_per_weight": result.get("bits_per_weight"),
           "layers": {k: {kk: e.get(kk) for kk in ("shape", "bits", "bits_per_weight", "rel_weight_error", "rel_output_error")}
                      for k, e in layers.items()},
           "perplexity": perplexity, "seconds": result.get("seconds")}
    if plan is not None:
        rep["mixed_precision"] = to_json(plan)
    return rep


def write(output: str, result: dict, plan: dict | None, perplexity: dict | None = None) -> dict:
    """Write OUT.report.json and OUT.report.html; returns their paths."""
    jpath, hpath = report_paths(output)
    rep = build(result, plan, perplexity)
    with open(jpath, "w") as f:
        json.dump(rep, f, indent=1)
    figs = []
    if plan is not None:
        figs.append(("Per-layer sensitivity and chosen bits", plot_layers(plan)))
        figs.append(("Pareto curve", plot_pareto(plan)))
        r = plot_rank(plan)
        if r:
            figs.append(("Rank agreement of the sensitivity measures", r))
    with open(hpath, "w", encoding="utf-8") as f:
        f.write(_html(rep, plan, figs))
    return {"json": jpath, "html": hpath}


def _html(rep: dict, plan: dict | None, figs) -> str:
    e = html.escape
    sz = rep["size_bytes"]
    rows = [("source", e(str(rep["source"]))), ("output", e(str(rep["output"]))),
            ("file size before → after", f"{_fmt_mb(sz['before'])} → {_fmt_mb(sz['after'])}"),
            ("quantized weights", f"{rep['quantized_weights']:,} ({_fmt_mb(rep['quantized_bytes']['fp32'])} fp32 → "
                                  f"{_fmt_mb(rep['quantized_bytes']['stored'])} stored)"),
            ("bits per weight (scales included)", f"{rep['bits_per_weight']:.4f}" if rep["bits_per_weight"] else "—")]
    if plan is not None:
        counts = {b: sum(1 for v in plan["layer_bits"].values() if v == b) for b in plan["candidates"]}
        rows += [("budget", _budget_text(plan)), ("sensitivity", e(plan["kind"])),
                 ("layers per width", ", ".join(f"{b}-bit: {c}" for b, c in counts.items())),
                 ("tied layers sharing an input", "yes" if plan["tie"] else "no")]
        sz = plan.get("size")
        if sz:
            real = sz.get("realised_bytes")
            verdict = "" if real is None or sz.get("budget_bytes") is None else \
                f": {'within' if real <= sz['budget_bytes'] else 'over'} the budget"
            rows.append(("weights, all initializers", f"{sz['planned_bytes']:,} bytes planned = {sz['fixed_bytes']:,} "
                                                      f"fixed + {sz['quantized_bytes']:,} quantized layers; "
                         + ("not written" if real is None else f"{real:,} written") + verdict))
        lt = plan.get("latency")
        if lt and lt.get("budget_ms") is not None:
            rows.append(("decode latency budget", f"{lt['budget_ms']:g} ms/token"))
            rows.append(("decode latency predicted", f"{lt['predicted_ms']:.3f} ms/token = {lt.get('other_ms', 0):.3f} ms "
                                                     f"fixed ({e(str(lt.get('other_from', '')))}) + "
                                                     f"{lt.get('kernel_ms', lt['predicted_ms']):.3f} ms in the quantized "
                                                     f"layers' kernels (kernel times alone x {lt.get('kernel_scale', 1.0):.2f})"))
        for i, it in enumerate((lt or {}).get("verify", {}).get("iterations", []), 1):
            cal = ", ".join(f"{e(k)} {v:.3f}" for k, v in it["calibration_ms"].items())
            rows.append((f"closed loop, plan {i}", f"{it['avg_bits']:.3f} bits/weight: measured {it['measured_ms']:.3f} "
                         f"ms/token against {it['planned_ms']:.3f} planned (predicted {it['predicted_ms']:.3f}; "
                         f"beside {cal}): {'accepted' if it['accepted'] else 'over'}"
                         + (f"; {e(it['stop'])}" if it.get("stop") else "")))
        if lt:
            m = lt.get("measured_ms")
            verdict = "" if m is None or lt.get("budget_ms") is None else \
                f": {'meets' if m <= float(lt['budget_ms']) else 'misses'} the budget"
            rows.append(("decode latency measured", "not measured (recipe: measure_latency: true)" if m is None else
                         f"{m:.3f} ms/token (compiled for the host, {lt.get('threads', 1)} thread(s), median of "
                         f"{lt.get('measured_rounds', '?')} steps){verdict}"))
        for pair, ag in (plan.get("rank_agreement") or {}).items():
            rows.append((f"Kendall τ {e(pair)}", ", ".join(f"{k}: {v['tau']:.3f}" for k, v in ag.items())))
    ppl = rep.get("perplexity")
    if ppl:
        rows.append(("perplexity before → after", f"{ppl['before']:.3f} → {ppl['after']:.3f} "
                                                  f"({ppl['tokens']} held-out tokens, window {ppl['window']})"))
    else:
        rows.append(("perplexity", "not measured (--report-eval-tokens N to measure)"))
    summary = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    fig_html = "\n".join(f"<h2>{e(t)}</h2><img alt='{e(t)}' src='{src}'>" for t, src in figs)
    layer_rows = []
    table = plan["table"] if plan is not None else None
    stats = {ly.name: ly for ly in table.layers} if table else {}
    cand = table.bits if table else []
    for name, ly in rep["layers"].items():
        st = stats.get(name)
        sens = "".join(f"<td>{st.sensitivity(plan['kind'], b):.4g}</td>" for b in cand) if st else ""
        roe = ly.get("rel_output_error")
        layer_rows.append(f"<tr><td>{e(name)}</td><td>{'×'.join(map(str, ly['shape']))}</td><td>{ly['bits']}</td>"
                          f"{sens}<td>{'' if roe is None else f'{roe:.4f}'}</td></tr>")
    head = "".join(f"<th>sens. {b}-bit</th>" for b in cand)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shiftc compression report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1300px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>shiftc compression report</h1>
<table>{summary}</table>
{fig_html}
<h2>Layers</h2>
<table><tr><th>layer</th><th>shape N×K</th><th>bits</th>{head}<th>rel. output error</th></tr>
{''.join(layer_rows)}
</table>
</body></html>
"""
