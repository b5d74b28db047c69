"""Bit allocation: per-layer bit widths that minimise total sensitivity under size and latency budgets.

Integer program (:func:`allocate`), one binary x_{g,b} per layer group g and candidate width b:

    minimise    Σ_g Σ_b S_{g,b} x_{g,b}                     (S: sensitivity, sensitivity.py)
    subject to  Σ_b x_{g,b} = 1                      ∀ g    (one width per group)
                Σ_g Σ_b n_g·β_{g,b} x_{g,b} ≤ B · Σ_g n_g     (size: average bits per weight ≤ B)
           or   Σ_g Σ_b m_{g,b} x_{g,b} ≤ M − m_fixed          (size: bytes of the whole output ≤ M)
                Σ_g Σ_b t_{g,b} x_{g,b} ≤ L − t_other          (latency, optional)

with n_g the weights of the group, β_{g,b} = bcq.bits_per_weight(b, the layer's group, scale mode)
(scales counted), m_{g,b} the exact bytes the layers store at width b (size.py: planes padded to 32
columns, scales as stored), m_fixed the bytes no width changes, t_{g,b} measured kernel times
(latency.py). A group is one layer, or — with ``tie`` — all
layers reading the same input tensor (q/k/v; gate/up), which then share one width. Solved exactly
by scipy.optimize.milp (HiGHS); a multiple-choice knapsack of a few hundred binaries takes well
under a second.

Baselines at the same size, for comparison:
  * :func:`sort_and_threshold` — ShiftAddLLM: sort layers by their score, give the lowest-scored
    fraction (by weight count; the paper: 80%) 2 bits and the rest 3 bits;
    :func:`threshold_for_budget` picks the fraction that meets a size budget instead;
  * :func:`random_allocation` — random widths that meet the same budget.
"""

from __future__ import annotations

import numpy as np

from ...errors import UsageError


def groups_by_input(xs: list[str], tie: bool) -> list[list[int]]:
    """Layer indices grouped: by shared input tensor when ``tie``, else one layer per group."""
    if not tie:
        return [[i] for i in range(len(xs))]
    order: dict[str, list[int]] = {}
    for i, x in enumerate(xs):
        order.setdefault(x, []).append(i)
    return list(order.values())


def average_bits(bits_of_layer: np.ndarray, sizes: np.ndarray, bpw_of_width: dict) -> float:
    """Average stored bits per weight (scales included) over all quantized weights;
    ``bpw_of_width`` {width: bits per weight, one number or one per layer}."""
    b = np.array([float(np.asarray(bpw_of_width[int(x)], np.float64).reshape(-1)[i if np.ndim(bpw_of_width[int(x)]) else 0])
                  for i, x in enumerate(bits_of_layer)])
    return float(np.sum(b * sizes) / np.sum(sizes))


def bpw_by_width(widths: list[int], bpw: np.ndarray) -> dict:
    """{width: bits per weight} from ``bpw`` [W] (one number each) or [L, W] (one per layer)."""
    bpw = np.asarray(bpw, np.float64)
    return {int(b): (float(bpw[j]) if bpw.ndim == 1 else bpw[:, j]) for j, b in enumerate(widths)}


def allocate(sens: np.ndarray, sizes: np.ndarray, widths: list[int], bpw: np.ndarray, bits_budget: float | None, *,
             groups: list[list[int]] | None = None, times: np.ndarray | None = None,
             latency_budget: float | None = None, layer_bytes: np.ndarray | None = None,
             bytes_budget: int | None = None, fixed_bytes: int = 0, budget_flag: str | None = None,
             time_limit: float = 60.0) -> dict:
    """Solve the integer program above. ``sens`` [L, W], ``sizes`` [L], ``bpw`` [W] or [L, W] (bits
    per weight of each width, or of each layer at each width), ``times`` [L, W] (same unit as
    ``latency_budget``, already net of the time outside the quantized layers).

    The size constraint is ``bits_budget`` (average bits per weight), or — ``bits_budget`` None —
    ``bytes_budget``: ``fixed_bytes`` + Σ ``layer_bytes`` [L, W] (int) of the chosen widths ≤
    ``bytes_budget``, held exactly (the solver's tolerance is checked on the integer sum).
    Returns {"bits": int [L], "objective", "avg_bits", "bytes" (with layer_bytes), "latency" (when
    times)}; raises UsageError naming ``budget_flag`` when no plan meets the budgets."""
    sens = np.asarray(sens, np.float64)
    L, W = sens.shape
    if (bits_budget is None) == (bytes_budget is None):
        raise ValueError("allocate: give exactly one of bits_budget and bytes_budget")
    if bytes_budget is not None and layer_bytes is None:
        raise ValueError("allocate: bytes_budget needs layer_bytes [L, W]")
    groups = groups or [[i] for i in range(L)]
    G = len(groups)
    sizes = np.asarray(sizes, np.float64)
    bpw = np.asarray(bpw, np.float64)
    bpw_l = np.broadcast_to(bpw, (L, W)) if bpw.ndim == 1 else bpw  # [L, W]
    bits_g = np.array([(sizes[g, None] * bpw_l[g]).sum(0) for g in groups])  # [G, W] stored bits
    bytes_g = None if layer_bytes is None else \
        np.array([np.asarray(layer_bytes, np.int64)[g].sum(0) for g in groups])  # [G, W]
    s_g = np.array([sens[g].sum(0) for g in groups])  # [G, W]
    # Scale the objective: HiGHS works with absolute tolerances
    scale = np.max(np.abs(s_g)) or 1.0
    c = (s_g / scale).ravel()
    rows, lo, hi = [], [], []
    one_hot = np.zeros((G, G * W))
    for g in range(G):
        one_hot[g, g * W:(g + 1) * W] = 1
    rows.append(one_hot), lo.append(np.ones(G)), hi.append(np.ones(G))
    total = sizes.sum()
    what = budget_flag or (f"--bits-budget {bits_budget}" if bits_budget is not None else
                           f"--size-budget-mb {bytes_budget / 1e6:g}")
    if latency_budget is not None:
        what += f" with --latency-budget-ms {latency_budget:g}"
    if bits_budget is not None:
        rows.append((bits_g.ravel() / total)[None]), lo.append([-np.inf]), hi.append([bits_budget + 1e-9])
    else:
        room = int(bytes_budget) - int(fixed_bytes)  # bytes the quantized layers may take
        smallest = int(bytes_g.min(1).sum())
        if room < smallest:
            raise UsageError(f"{what}: no per-layer plan fits: {fixed_bytes / 1e6:.3f} MB are fixed (embedding table, "
                             f"norms, rope tables, layers left fp32) and the quantized layers need at least "
                             f"{smallest / 1e6:.3f} MB more at the smallest candidate width")
        size_row = bytes_g.ravel().astype(np.float64) / room  # scaled: HiGHS works with absolute tolerances
        rows.append(size_row[None]), lo.append([-np.inf]), hi.append([1.0])
    if latency_budget is not None:
        if times is None:
            raise UsageError("--latency-budget-ms needs kernel timings per layer and bit width")
        t_g = np.array([np.asarray(times)[g].sum(0) for g in groups])
        rows.append(t_g.ravel()[None]), lo.append([-np.inf]), hi.append([latency_budget])
    def infeasible(res):
        if bits_budget is not None:
            min_bits = float(bits_g.min(1).sum() / total)
            raise UsageError(f"{what}: no per-layer plan meets the budget (the smallest candidate width "
                             f"already needs {min_bits:.3f} bits per weight; solver: {res.message})")
        raise UsageError(f"{what}: no per-layer plan meets the budget (solver: {res.message})")

    choice = _solve(c, rows, lo, hi, (G, W), time_limit, infeasible,
                    None if bytes_budget is None else (bytes_g, room))
    bits = np.zeros(L, np.int64)
    for g, members in enumerate(groups):
        bits[members] = widths[choice[g]]
    out = {"bits": bits, "objective": float(np.sum(s_g[np.arange(G), choice])),
           "avg_bits": float(bits_g[np.arange(G), choice].sum() / total)}
    if bytes_g is not None:
        out["bytes"] = int(fixed_bytes) + int(bytes_g[np.arange(G), choice].sum())
    if times is not None:
        t = np.asarray(times)
        out["latency"] = float(sum(t[i, widths.index(int(bits[i]))] for i in range(L)))
    return out


def _solve(c, rows, lo, hi, shape, time_limit: float, infeasible, exact_bytes=None) -> np.ndarray:
    """The chosen width index per group. ``exact_bytes`` (bytes [G, W], room): the byte budget is
    held on the integer sum, not within the solver's tolerance (its row, rows[1], is tightened and
    the program solved again while the sum is over)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    G, W = shape
    while True:
        cons = LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi))
        res = milp(c, constraints=cons, integrality=np.ones(G * W), bounds=Bounds(0, 1),
                   options={"time_limit": time_limit, "mip_rel_gap": 1e-6})
        if res.x is None:
            infeasible(res)
        choice = np.round(res.x).reshape(G, W).argmax(1)
        if exact_bytes is None:
            return choice
        bytes_g, room = exact_bytes
        over = int(bytes_g[np.arange(G), choice].sum()) - room
        if over <= 0:
            return choice
        hi[1] = [hi[1][0] - (over + 1) / room]  # within the solver's feasibility tolerance but over: tighten


def pareto(sens: np.ndarray, sizes: np.ndarray, widths: list[int], bpw: np.ndarray, budgets, **kw) -> list[dict]:
    """Budget sweep: the optimal plan's total sensitivity at each average-bits budget (infeasible
    budgets are left out)."""
    out = []
    for b in budgets:
        try:
            r = allocate(sens, sizes, widths, bpw, float(b), **kw)
        except UsageError:
            continue
        out.append({"budget": float(b), "avg_bits": r["avg_bits"], "objective": r["objective"],
                    **({"latency": r["latency"]} if "latency" in r else {})})
    return out


def sort_and_threshold(scores: np.ndarray, sizes: np.ndarray, fractions: dict[int, float]) -> np.ndarray:
    """ShiftAddLLM's allocation: layers sorted by score (ascending); walking up the sorted list,
    the first ``fractions[w0]`` of the weights get the smallest width, the next ``fractions[w1]``
    the next one, ... (the paper: {2: 0.8, 3: 0.2}). Fractions are of the weight count (its code
    counts each 4×-larger MLP layer four times in the list); a layer straddling a boundary takes
    the width at its upper end, as in the reference code."""
    widths = sorted(fractions)
    cum = np.cumsum([fractions[w] for w in widths])
    if not np.isclose(cum[-1], 1.0):
        raise ValueError(f"fractions must sum to 1, got {cum[-1]}")
    order = np.argsort(np.asarray(scores), kind="stable")
    sizes = np.asarray(sizes, np.float64)
    total = sizes.sum()
    bits = np.zeros(len(order), np.int64)
    upto = 0.0
    for i in order:
        upto += sizes[i]
        k = int(np.searchsorted(cum, upto / total - 1e-12))
        bits[i] = widths[min(k, len(widths) - 1)]
    return bits


def threshold_for_budget(scores: np.ndarray, sizes: np.ndarray, low: int, high: int, bpw_of_width: dict[int, float],
                         bits_budget: float) -> np.ndarray:
    """Sort-and-threshold with the threshold set by the size budget: the highest-scored layers
    get ``high`` bits while the average stays within ``bits_budget``."""
    order = np.argsort(np.asarray(scores), kind="stable")[::-1]
    sizes = np.asarray(sizes, np.float64)
    bits = np.full(len(order), low, np.int64)
    for i in order:
        bits[i] = high
        if average_bits(bits, sizes, bpw_of_width) > bits_budget + 1e-9:
            bits[i] = low
            break
    return bits


def random_allocation(sizes: np.ndarray, widths: list[int], bpw_of_width: dict[int, float], bits_budget: float,
                      seed: int, *, tolerance: float = 0.02, tries: int = 20000) -> np.ndarray:
    """Random widths with the average in [budget − tolerance, budget]: start from a uniformly
    random plan, then raise or lower random layers one width step until the average fits."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, np.float64)
    widths = sorted(widths)
    idx = rng.integers(0, len(widths), len(sizes))
    for _ in range(tries):
        avg = average_bits(np.array(widths)[idx], sizes, bpw_of_width)
        if bits_budget - tolerance <= avg <= bits_budget:
            return np.array(widths)[idx]
        i = int(rng.integers(len(sizes)))
        if avg > bits_budget and idx[i] > 0:
            idx[i] -= 1
        elif avg < bits_budget - tolerance and idx[i] < len(widths) - 1:
            idx[i] += 1
    raise ValueError(f"no random plan within {tolerance} below {bits_budget} bits per weight after {tries} steps")
