"""Mixed-precision allocation: sensitivity measures, HAWQ traces, the integer program, baselines."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shiftc.errors import UsageError
from shiftc.passes import bcq
from shiftc.passes.mixed_precision import allocate as A
from shiftc.passes.mixed_precision import hawq, sensitivity
from shiftc.passes.mixed_precision.cache import LayerCache
from shiftc.passes.shiftadd import ShiftAddConfig, ShiftAddPass


def _brute(sens, sizes, widths, bpw, budget, groups):
    best = None
    for combo in itertools.product(range(len(widths)), repeat=len(groups)):
        bits = np.zeros(len(sizes), int)
        for g, c in zip(groups, combo):
            bits[g] = c
        if np.sum(sizes * bpw[bits]) / sizes.sum() > budget + 1e-9:
            continue
        obj = sens[np.arange(len(sizes)), bits].sum()
        best = obj if best is None or obj < best else best
    return best


@pytest.mark.parametrize("tie", [False, True])
def test_allocation_is_optimal(tie):
    rng = np.random.default_rng(1)
    widths = [1, 2, 3, 4]
    bpw = np.array([bcq.bits_per_weight(b, 128) for b in widths])
    sizes = rng.integers(1, 20, 7) * 1000
    base = rng.lognormal(0, 2, 7)
    sens = base[:, None] * 4.0 ** -np.arange(4)[None, :]  # error shrinks ~4x per extra bit
    xs = ["a", "a", "a", "b", "c", "c", "d"]
    groups = A.groups_by_input(xs, tie)
    r = A.allocate(sens, sizes, widths, bpw, 2.5, groups=groups)
    assert r["avg_bits"] <= 2.5 + 1e-9
    assert r["objective"] == pytest.approx(_brute(sens, sizes, widths, bpw, 2.5, groups), rel=1e-9)
    if tie:
        assert len(set(r["bits"][:3])) == 1 and r["bits"][4] == r["bits"][5]
    front = A.pareto(sens, sizes, widths, bpw, [1.0, 2.0, 3.0, 4.5])
    objs = [p["objective"] for p in front]
    assert objs == sorted(objs, reverse=True)  # more bits, less error
    assert front[0]["budget"] == 2.0  # 1.0 is infeasible (1-bit already costs 1.0625)


def test_allocation_latency_budget_and_errors():
    widths = [2, 3]
    bpw = np.array([bcq.bits_per_weight(b, 128) for b in widths])
    sizes = np.array([100, 100, 100])
    sens = np.array([[10.0, 1.0], [5.0, 1.0], [2.0, 1.0]])
    times = np.array([[1.0, 3.0], [1.0, 1.5], [1.0, 1.1]])
    free = A.allocate(sens, sizes, widths, bpw, 4.0)
    assert list(free["bits"]) == [3, 3, 3]
    r = A.allocate(sens, sizes, widths, bpw, 4.0, times=times, latency_budget=4.0)
    assert r["latency"] <= 4.0 and list(r["bits"]) == [2, 3, 3]
    with pytest.raises(UsageError, match="--latency-budget-ms"):
        A.allocate(sens, sizes, widths, bpw, 4.0, times=times, latency_budget=2.0)
    with pytest.raises(UsageError, match="--bits-budget 1.5"):
        A.allocate(sens, sizes, widths, bpw, 1.5)


def _synthetic_table(shapes, sens):
    from shiftc.passes.mixed_precision.sensitivity import LayerStats, SensitivityTable

    layers = []
    for i, (shape, s) in enumerate(zip(shapes, sens)):
        st = LayerStats(f"l{i}", f"x{i}", shape)
        st.out_err = {2: float(s[0]), 3: float(s[1])}
        st.w_err = dict(st.out_err)
        layers.append(st)
    return SensitivityTable(layers, [2, 3], 128, "pow2")


def test_latency_budget_includes_fixed_cost():
    """plan_from_table: predicted = fixed cost + Σ kernel times <= budget; the fixed cost changes the
    plan (the same budget without it would allow more 3-bit layers); a budget under the fastest
    plan's prediction is refused naming the flag."""
    from shiftc.passes.mixed_precision import MixedPrecisionConfig
    from shiftc.passes.mixed_precision.plan import plan_from_table

    shapes = [(256, 256)] * 4 + [(1024, 256)]
    sens = np.array([[8.0, 1.0], [4.0, 1.0], [2.0, 1.0], [1.5, 1.0], [30.0, 2.0]])
    times = np.array([[0.1, 0.15]] * 4 + [[1.0, 1.5]])  # ms; the big layer dominates
    table = _synthetic_table(shapes, sens)
    mp = MixedPrecisionConfig(bits_budget=3.5, candidates=[2, 3], latency_budget_ms=11.95, other_ms=10.0,
                              latency_margin=0.0)
    plan = plan_from_table(table, mp, times=times, time_table={})
    lt = plan["latency"]
    bits = np.array([plan["layer_bits"][f"l{i}"] for i in range(5)])
    kernel = float(times[np.arange(5), bits - 2].sum())
    assert lt["other_ms"] == 10.0 and lt["other_from"] == "given"
    assert lt["predicted_ms"] == pytest.approx(10.0 + kernel) and lt["predicted_ms"] <= 11.95 + 1e-9
    assert list(bits) == [3, 2, 2, 2, 3]  # 1.95 ms of kernels: the big layer and the most sensitive small one at 3 bits
    # without the fixed cost the same budget bounds nothing: every layer at 3 bits
    free = plan_from_table(table, MixedPrecisionConfig(bits_budget=3.5, candidates=[2, 3], latency_budget_ms=11.95,
                                                       other_ms=0.0), times=times, time_table={})
    assert set(free["layer_bits"].values()) == {3}
    # measured fixed cost (latency.measure_fixed_cost's result) when other_ms is not given
    auto = plan_from_table(table, MixedPrecisionConfig(bits_budget=3.5, candidates=[2, 3], latency_budget_ms=11.95,
                                                       latency_margin=0.0),
                           times=times, time_table={}, fixed={"other_ms": 10.0, "measured_ms": 11.4, "kernel_ms": 1.4})
    assert auto["layer_bits"] == plan["layer_bits"] and auto["latency"]["other_from"] == "measured"
    with pytest.raises(UsageError, match=r"--latency-budget-ms 11.3 less the 1% --latency-margin \(11.19 ms\): the fastest plan"):
        plan_from_table(table, MixedPrecisionConfig(bits_budget=3.5, candidates=[2, 3], latency_budget_ms=11.3,
                                                    other_ms=10.0), times=times, time_table={})
    with pytest.raises(UsageError, match=r"--latency-budget-ms 9 less the 1% --latency-margin \(8.91 ms\): not more than"):
        plan_from_table(table, MixedPrecisionConfig(bits_budget=3.5, candidates=[2, 3], latency_budget_ms=9.0,
                                                    other_ms=10.0), times=times, time_table={})


def test_closed_loop_replans_when_the_compiled_plan_measures_over_budget():
    """latency.close_loop: the plan made from the calibration is compiled and measured beside the
    calibration plans; a machine that has become slower (fixed cost 10.0 -> 10.3 ms) puts it over
    the budget, the latency model refitted on those measurements gives a faster plan, which
    measures within the budget and is accepted. One iteration only: the first plan, not accepted.
    Much slower: even the fastest plan is now predicted over, an error naming the flag."""
    from shiftc.passes.mixed_precision import MixedPrecisionConfig
    from shiftc.passes.mixed_precision.latency import close_loop
    from shiftc.passes.mixed_precision.plan import plan_from_table

    shapes = [(256, 256)] * 4 + [(1024, 256)]
    sens = np.array([[8.0, 1.0], [4.0, 1.0], [2.0, 1.0], [1.5, 1.0], [30.0, 2.0]])
    times = np.array([[0.1, 0.15]] * 4 + [[1.0, 1.5]])
    table = _synthetic_table(shapes, sens)
    mp = MixedPrecisionConfig(bits_budget=3.5, candidates=[2, 3], latency_budget_ms=11.95, latency_margin=0.0)
    calib = {"uniform-2": ("u2.so", 1.4), "uniform-3": ("u3.so", 2.1)}
    fixed = {"other_ms": 10.0, "scale": 1.0}  # what the calibration measured: 11.4 and 12.1 ms

    def replan(f):
        return plan_from_table(table, mp, times=times, time_table={}, fixed=f)

    def kernel_sum(layer_bits):
        return float(sum(times[i, b - 2] for i, b in enumerate(layer_bits.values())))

    def machine(other):  # decode ms now = other + Σ kernel ms; a library's kernel sum from its name
        kern = {"u2.so": 1.4, "u3.so": 2.1}

        def time_libs(libs):
            return {n: other + (kern[p] if p in kern else kernel_sum(built[p])) for n, p in libs.items()}
        return time_libs

    built = {}

    def build(layer_bits):
        path = f"plan{len(built)}.so"
        built[path] = dict(layer_bits)
        return path

    first = replan(fixed)
    assert list(first["layer_bits"].values()) == [3, 2, 2, 2, 3] and first["latency"]["predicted_ms"] == pytest.approx(11.95)
    out = close_loop(first, replan, build, machine(10.3), kernel_sum, calib, iterations=3)
    v = out["latency"]["verify"]
    assert v["accepted"] and len(v["iterations"]) == 2 and len(built) == 2
    assert v["iterations"][0]["measured_ms"] == pytest.approx(12.25) and not v["iterations"][0]["accepted"]
    assert v["iterations"][0]["calibration_ms"] == pytest.approx({"uniform-2": 11.7, "uniform-3": 12.4})
    assert list(out["layer_bits"].values()) == [3, 3, 3, 3, 2]  # the big layer back to 2 bits: 1.6 ms of kernels
    assert out["latency"]["fixed_cost"]["other_ms"] == pytest.approx(10.3) and out["latency"]["kernel_scale"] == pytest.approx(1.0)
    assert v["iterations"][1]["measured_ms"] == pytest.approx(11.9) and v["iterations"][1]["accepted"]
    built.clear()
    once = close_loop(replan(fixed), replan, build, machine(10.3), kernel_sum, calib, iterations=1)
    assert not once["latency"]["verify"]["accepted"] and list(once["layer_bits"].values()) == [3, 2, 2, 2, 3]
    built.clear()  # a machine 1 ms slower: the fastest plan (11.0 + 1.4) is now over 11.95
    with pytest.raises(UsageError, match=r"--latency-budget-ms 11.95.*fastest plan.*refitted on the compiled plans"):
        close_loop(replan(fixed), replan, build, machine(11.0), kernel_sum, calib, iterations=2)
    built.clear()  # the refitted model gives the plan already measured: stop there, not accepted
    same = close_loop(replan(fixed), lambda f: replan(fixed), build, machine(10.3), kernel_sum, calib, iterations=3)
    assert not same["latency"]["verify"]["accepted"] and len(built) == 1
    assert "already measured" in same["latency"]["verify"]["iterations"][-1]["stop"]
    with pytest.raises(UsageError, match="--latency-verify"):
        close_loop(first, replan, build, machine(10.0), kernel_sum, calib, iterations=0)


def test_latency_margin_shrinks_the_planned_budget():
    """latency_margin m: the MILP gets budget·(1 − m) − other; the plan's prediction stays under it;
    a margin that pushes the budget under the fastest plan is refused naming both flags."""
    from shiftc.errors import UsageError as UE
    from shiftc.passes.mixed_precision import MixedPrecisionConfig
    from shiftc.passes.mixed_precision import allocate as A
    from shiftc.passes.mixed_precision.config import validate_mixed_precision
    from shiftc.passes.mixed_precision.plan import plan_from_table

    shapes = [(256, 256)] * 4 + [(1024, 256)]
    sens = np.array([[8.0, 1.0], [4.0, 1.0], [2.0, 1.0], [1.5, 1.0], [30.0, 2.0]])
    times = np.array([[0.1, 0.15]] * 4 + [[1.0, 1.5]])
    table = _synthetic_table(shapes, sens)

    def plan(margin, budget=11.95):
        mp = MixedPrecisionConfig(bits_budget=3.5, candidates=[2, 3], latency_budget_ms=budget, other_ms=10.0,
                                  latency_margin=margin)
        return plan_from_table(table, mp, times=times, time_table={})

    assert MixedPrecisionConfig().latency_margin == 0.01
    p0, p1 = plan(0.0), plan(0.03)
    assert p1["latency"]["margin"] == 0.03 and p1["latency"]["planned_ms"] == pytest.approx(11.95 * 0.97)
    assert p0["latency"]["planned_ms"] == pytest.approx(11.95)
    assert p1["latency"]["predicted_ms"] <= 11.95 * 0.97 + 1e-9 < p0["latency"]["predicted_ms"]
    # the MILP saw exactly budget·(1 − m) − other
    bits = A.allocate(table.matrix("calib"), table.sizes(), [2, 3], table.bits_per_weight(), 3.5, times=times,
                      latency_budget=11.95 * 0.97 - 10.0)["bits"]
    assert [p1["layer_bits"][f"l{i}"] for i in range(5)] == list(bits)
    with pytest.raises(UE, match="--latency-budget-ms 11.5 less the 2% --latency-margin"):
        plan(0.02, budget=11.5)  # 11.27 ms planned < 11.4 ms fastest plan
    assert plan(0.0, budget=11.5)["latency"]["predicted_ms"] <= 11.5

    def bad(flag, msg):
        raise UE(f"{flag}: {msg}")

    for v in (-0.1, 0.5, "x", True):
        with pytest.raises(UE, match="--latency-margin"):
            validate_mixed_precision(MixedPrecisionConfig(latency_margin=v), bad)


def test_fit_fixed_cost_and_times_from_table():
    from shiftc.passes.mixed_precision import latency

    f = latency.fit_fixed_cost([4.0, 6.0], [44.0, 46.2])
    assert f["scale"] == 1.0 and f["other_ms"] == pytest.approx(40.1) and f["residual_ms"] == pytest.approx([-0.1, 0.1])
    g = latency.fit_fixed_cost([4.0, 6.0], [44.0, 46.2], fit_scale=True)
    assert g["scale"] == pytest.approx(1.1) and g["other_ms"] == pytest.approx(39.6)
    with pytest.raises(UsageError):
        latency.fit_fixed_cost([4.0], [44.0], fit_scale=True)
    noisy = latency.fit_fixed_cost([4.0, 4.1], [44.0, 43.0], fit_scale=True)  # more bits, faster: noise
    assert noisy["scale"] == 1.0 and noisy["scale_fallback"] and noisy["other_ms"] == pytest.approx(39.45)
    t = latency.times_from_table([(8, 4), (4, 8), (8, 4)], [2, 3], {"8x4": {"2": 1.0, "3": 2.0}, "4x8": {"2": 0.5, "3": 0.7}})
    assert t.tolist() == [[1.0, 2.0], [0.5, 0.7], [1.0, 2.0]]
    with pytest.raises(UsageError, match="9x9"):
        latency.times_from_table([(9, 9)], [2], {})


def test_sort_and_threshold_and_random():
    sizes = np.array([4, 1, 1, 1, 1, 4, 4, 4]) * 100
    scores = np.arange(8.0)[::-1]  # layer 0 has the highest score
    bits = A.sort_and_threshold(scores, sizes, {2: 0.8, 3: 0.2})
    frac3 = sizes[bits == 3].sum() / sizes.sum()
    assert 0.15 <= frac3 <= 0.3 and bits[0] == 3 and bits[-1] == 2
    bpw_of = {b: bcq.bits_per_weight(b, 128) for b in (2, 3, 4)}
    t = A.threshold_for_budget(scores, sizes, 2, 3, bpw_of, 2.5)
    assert A.average_bits(t, sizes, bpw_of) <= 2.5 and bits[0] == 3
    for seed in range(3):
        r = A.random_allocation(sizes, [2, 3, 4], bpw_of, 2.6, seed, tolerance=0.2)
        assert 2.4 <= A.average_bits(r, sizes, bpw_of) <= 2.6


def _linear_model(rng, shapes):
    """x -> MatMul(W0ᵀ) -> MatMul(W1ᵀ) ...: layer names w0, w1, ...; also returns the weights [N, K]."""
    nodes, inits, ws = [], [], []
    cur = "x"
    for i, (n, k) in enumerate(shapes):
        w = rng.standard_normal((n, k)).astype(np.float32)
        ws.append(w)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        cur = f"y{i}"
    g = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", shapes[0][1]])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["T", shapes[-1][0]])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), ws


def test_calib_sensitivity_is_output_error(tmp_path):
    rng = np.random.default_rng(0)
    model, ws = _linear_model(rng, [(64, 96), (32, 64)])
    cfg = ShiftAddConfig(group=32, scale_mode="pow2", lm_head=True)
    targets, _ = ShiftAddPass(cfg).match(model)
    xs = {"x": rng.standard_normal((200, 96)), "y0": rng.standard_normal((200, 64))}
    hs = {k: v.T @ v for k, v in xs.items()}
    cache = LayerCache(tmp_path / "cache")
    table = sensitivity.measure(model, targets, hs, cfg, [1, 2, 3], cache)
    for ly, w, x in zip(table.layers, ws, xs.values()):
        r = bcq.quantize_gptq(w, hs[ly.x], 2, 32, scale_mode=cfg.scale_mode, damp=cfg.damp, act_order=cfg.act_order,
                              iters=cfg.iters)
        d = w.astype(np.float64) - r.dequantize()
        assert ly.out_err[2] == pytest.approx(np.sum((x @ d.T) ** 2), rel=1e-6)
        assert ly.w_err[2] == pytest.approx(np.sum(d ** 2), rel=1e-6)
        assert ly.out_err[1] > ly.out_err[2] > ly.out_err[3] > 0
        u = np.linalg.cholesky(np.linalg.inv(hs[ly.x] + 0.01 * np.mean(np.diag(hs[ly.x])) * np.eye(len(hs[ly.x])))).T
        wh = w / np.diag(u)[None, :]
        assert ly.shiftaddllm == pytest.approx(np.linalg.norm(wh) * wh.std(ddof=1) ** 2, rel=1e-6)
    assert len(list((tmp_path / "cache").iterdir())) == 6
    again = sensitivity.measure(model, targets, hs, cfg, [1, 2, 3], cache)  # from the cache: same numbers
    assert again.to_json()["layers"] == table.to_json()["layers"]
    back = sensitivity.SensitivityTable.from_json(table.to_json())
    np.testing.assert_array_equal(back.matrix("calib"), table.matrix("calib"))
    for ly in table.layers:
        ly.hessian_trace = 2.0 * ly.n
    ag = sensitivity.rank_agreement(table)
    assert set(ag) == {"1-bit", "2-bit", "3-bit", "all"} and -1 <= ag["all"]["tau"] <= 1


class _ToyLM:
    """A two-layer causal-LM-like torch module with the HF call interface the estimator uses."""

    def __new__(cls):
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.emb = torch.nn.Embedding(11, 6)
                self.up = torch.nn.Linear(6, 5, bias=False)
                self.lm_head = torch.nn.Linear(5, 11, bias=False)

            def get_output_embeddings(self):
                return self.lm_head

            def get_input_embeddings(self):
                return self.emb

            def forward(self, input_ids, labels):
                logits = self.lm_head(torch.tanh(self.up(self.emb(input_ids))))
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])

                class Out:
                    pass

                o = Out()
                o.loss = loss
                return o

        return M()


def test_hutchinson_traces_match_exact_hessian():
    import torch

    m = _ToyLM()
    ids = np.random.default_rng(0).integers(0, 11, (1, 9))
    r = hawq.hessian_traces(m, ["up.weight", "lm_head"], ids, max_probes=400, min_probes=400, tol=1e-9)
    ids_t = torch.as_tensor(ids)
    for name, mod in (("up.weight", m.up), ("lm_head", m.lm_head)):
        w0 = mod.weight.detach().clone()

        def f(w):
            saved = mod.weight
            del mod.weight
            mod.weight = w
            out = m(input_ids=ids_t, labels=ids_t).loss
            mod.weight = saved
            return out

        h = torch.autograd.functional.hessian(f, w0)
        exact = float(torch.diagonal(h.reshape(w0.numel(), w0.numel())).sum())
        assert r["traces"][name] == pytest.approx(exact, abs=4 * r["sem"][name] + 1e-6)
    with pytest.raises(UsageError, match="layer 'nope.weight.T'"):
        hawq.hessian_traces(m, ["nope.weight.T"], ids, max_probes=2, min_probes=2)


@pytest.fixture(scope="module")
def tiny_decoder(tiny_llama_dir, tmp_path_factory):
    import shiftc

    path = str(tmp_path_factory.mktemp("tiny_mp") / "tiny.onnx")
    shiftc.export(tiny_llama_dir, path)
    return path


def test_cli_bits_budget_plan_and_report(tiny_decoder, tmp_path, capsys):
    import json

    from shiftc.cli import main

    out = str(tmp_path / "mp.onnx")
    # in-process and data-free (--calib none) to keep this test fast; the H-based measures are checked above
    code = main(["compress", tiny_decoder, "-o", out, "--bits-budget", "2.6", "--mp-candidates", "2,3", "--group", "32",
                 "--scale-mode", "pow2", "--calib", "none", "--threads", "1", "--mp-cache", str(tmp_path / "cache"), "--no-shiftadd-lm-head",
                 "--json"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    mp = rep["mixed_precision"]
    bits = {k: e["bits"] for k, e in rep["layers"].items()}
    assert set(bits.values()) == {2, 3} and mp["avg_bits"] <= 2.6
    assert rep["bits_per_weight"] == pytest.approx(mp["avg_bits"])  # the pass wrote the plan
    meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["shiftc.compression"])
    assert {k: e["bits"] for k, e in meta["layers"].items()} == bits
    page = open(mp["report"]["html"]).read()
    assert page.count("data:image/png;base64,") == 2 and "Pareto" in page
    saved = json.load(open(mp["report"]["json"]))
    assert saved["mixed_precision"]["layer_bits"] == bits and len(saved["mixed_precision"]["pareto"]) > 5
    assert len(list((tmp_path / "cache").iterdir())) == 2 * len(bits)  # each layer quantized once per width


@pytest.mark.parametrize("flags,flag,code", [
    (["--bits-budget", "0.5"], "--bits-budget", 2), (["--mp-candidates", "2,5"], "--mp-candidates", 2),
    (["--bits-budget", "2.5", "--latency-budget-ms", "1", "--target", "aarch64"], "--target aarch64", 4),
    (["--bits-budget", "2.5", "--latency-budget-ms", "1", "--latency-verify", "-1"], "--latency-verify", 2)])
def test_cli_bad_mixed_precision_flags(tiny_decoder, tmp_path, capsys, flags, flag, code):
    from shiftc.cli import main

    argv = ["compress", tiny_decoder, "-o", str(tmp_path / "x.onnx"), "--calib", "none", "--group", "32", *flags]
    try:
        got = main(argv)
    except SystemExit as e:  # argparse rejects the value
        got = e.code
    assert got == code and flag in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_latency_budget_with_lut_kernels(tiny_decoder, tmp_path):
    from shiftc.passes.mixed_precision import latency

    if not latency.kernel_available():
        pytest.skip("shiftc._native.bcq_matmul_lut16 not built")
    import shiftc.api

    common = dict(group=32, scale_mode="pow2", calib="none", candidates=[1, 2], mp_cache=str(tmp_path / "cache"), report=False, threads=1,
                  lm_head=False)
    free = shiftc.api.compress(tiny_decoder, str(tmp_path / "a.onnx"), bits_budget=2.2, **common)
    per = free["mixed_precision"]
    assert per["latency"] is None
    # the fixed cost measured from the compiled uniform 1-bit model, and the output's decode time measured
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mixed_precision:\n  measure_latency: true\n  latency_measure_rounds: 3\n")
    r = shiftc.api.compress(tiny_decoder, str(tmp_path / "b.onnx"), bits_budget=2.2, latency_budget_ms=1e3,
                            recipe=str(recipe), **{**common, "report": True})
    lt = r["mixed_precision"]["latency"]
    assert lt["predicted_ms"] <= 1e3 and set(lt["per_shape_ms"]) == {"128x64", "64x64", "32x64", "64x128"}
    assert lt["other_from"] == "measured" and min(lt["fixed_cost"]["measured_ms"].values()) > 0
    assert set(lt["fixed_cost"]["measured_ms"]) == {"uniform-1", "uniform-2"} and lt["kernel_scale"] > 0
    assert lt["predicted_ms"] == pytest.approx(lt["other_ms"] + lt["kernel_ms"])
    assert lt["measured_ms"] > 0 and lt["meets_budget"] is True
    # the closed loop (latency_verify, default 2): the plan compiled and measured beside the uniform plans
    v = lt["verify"]
    assert v["accepted"] is True and len(v["iterations"]) == 1
    it = v["iterations"][0]
    assert set(it["calibration_ms"]) == {"uniform-1", "uniform-2"} and 0 < it["measured_ms"] <= it["planned_ms"]
    page = open(r["mixed_precision"]["report"]["html"]).read()
    assert "closed loop, plan 1" in page and "accepted" in page


def test_output_kl_is_zero_for_exact_weights(tiny_decoder):
    from shiftc.frontend.onnx_io import load_model
    from shiftc.passes.mixed_precision.e2e import output_kl
    from shiftc.passes.mixed_precision.sensitivity import _weights

    model = load_model(tiny_decoder)
    targets, _ = ShiftAddPass(ShiftAddConfig(group=32)).match(model)
    ws = _weights(model, targets)
    ids = np.random.default_rng(0).integers(0, 49152, (1, 16))
    seen = []
    kl, info = output_kl(model, targets, lambda n, b: ws[n] if b == 4 else 0.5 * ws[n], ids, [1, 4],
                         on_layer=lambda r: seen.append(len(r)))
    assert seen == list(range(1, len(targets) + 1)) and set(kl) == {t.name for t in targets}
    for name, d in kl.items():
        assert abs(d[4]) < 1e-9 and d[1] > 0, name  # exact weights: no change; halved weights: some
    again, _ = output_kl(model, targets, None, ids, [1, 4], done=kl)  # nothing left to run
    assert again == kl


def test_output_kl_values_are_cached(tiny_decoder, tmp_path):
    """The KL values the plan step stores under kl_cache_keys are found again by a second run (and
    output_kl then opens no session); other windows or quantizer settings give other keys."""
    from shiftc.frontend.onnx_io import load_model
    from shiftc.passes.mixed_precision.e2e import kl_cache_keys, output_kl
    from shiftc.passes.mixed_precision.sensitivity import _weights

    model = load_model(tiny_decoder)
    cfg = ShiftAddConfig(group=32, scale_mode="pow2")
    targets, _ = ShiftAddPass(cfg).match(model)
    ws = _weights(model, targets)
    ids = np.random.default_rng(0).integers(0, 49152, (1, 16))
    keys = kl_cache_keys(model, targets, ws, None, cfg, [2, 3], ids)
    assert len(set(keys.values())) == 2 * len(targets)
    cache = LayerCache(str(tmp_path / "c"))
    cache.put_values("kl", {k: 0.5 for k in list(keys.values())[:3]})
    cache.put_values("kl", {k: 0.25 for k in list(keys.values())[3:]})  # merged with the first
    stored = LayerCache(str(tmp_path / "c")).get_values("kl")
    assert stored == {k: (0.5 if i < 3 else 0.25) for i, k in enumerate(keys.values())}
    assert kl_cache_keys(model, targets, ws, None, cfg, [2, 3], ids) == keys
    assert not set(kl_cache_keys(model, targets, ws, None, cfg, [2, 3], ids + 1).values()) & set(keys.values())
    other = ShiftAddConfig(group=64, scale_mode="pow2")
    assert not set(kl_cache_keys(model, targets, ws, None, other, [2, 3], ids).values()) & set(keys.values())
    done = {n: {b: stored[keys[(n, b)]] for b in (2, 3)} for n in ws}
    kl, info = output_kl(model, targets, None, ids, [2, 3], done=done)
    assert kl == done and info["cached"]


# -- uniform grids and the size budget ------------------------------------------------------------


def test_uniform_plan_under_bits_budget(tiny_decoder, tmp_path):
    """scale_mode uniform: each layer measured with the uniform fit at its own group (layer_group),
    cached as planes + scales + mins, and the plan's bits per weight is what the pass stores."""
    import json

    import shiftc.api

    recipe = tmp_path / "r.yaml"
    recipe.write_text("shiftadd:\n  layer_group: {'*mlp.down_proj*': 64}\n")
    common = dict(recipe=str(recipe), group=32, scale_mode="uniform", calib="none", candidates=[2, 3],
                  mp_cache=str(tmp_path / "cache"), threads=1, lm_head=False)
    r = shiftc.api.compress(tiny_decoder, str(tmp_path / "u.onnx"), bits_budget=3.4, **common)
    mp = r["mixed_precision"]
    assert r["op"] == "ai.shiftc::UniformMatMul" and mp["scale_mode"] == "uniform"
    groups = {k: e["group"] for k, e in r["layers"].items()}
    assert {g for k, g in groups.items() if "down_proj" in k} == {64} and set(groups.values()) == {32, 64}
    assert {e["bits"] for e in r["layers"].values()} == {2, 3} and mp["avg_bits"] <= 3.4
    assert r["bits_per_weight"] == pytest.approx(mp["avg_bits"])  # per-layer groups counted as stored
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 2 * len(r["layers"])
    with np.load(cached[0]) as z:
        assert set(z.files) == {"planes", "scales", "mins"}
    table = json.load(open(mp["report"]["json"]))["mixed_precision"]["sensitivity_table"]
    assert {e["name"]: e["group"] for e in table["layers"]} == groups
    # a second run restores every UniformResult from the cache: the same model, bit for bit
    again = shiftc.api.compress(tiny_decoder, str(tmp_path / "v.onnx"), bits_budget=3.4, **{**common, "report": False})
    assert again["layers"] == r["layers"]
    a, b = (sorted((t.name, t.raw_data) for t in onnx.load(str(tmp_path / f)).graph.initializer) for f in ("u.onnx", "v.onnx"))
    assert a == b


@pytest.mark.parametrize("scale_mode,lm_head,tied,emb_bits", [("pow2x2", True, False, 4), ("uniform", True, True, 4),
                                                              ("pow2", False, False, 4), ("uniform", False, False, 0)])
def test_size_accounting_is_exact(tiny_decoder, scale_mode, lm_head, tied, emb_bits):
    """size.fixed_bytes + size.layer_bytes at every width = every initializer of the pass's output."""
    from shiftc.frontend.onnx_io import load_model
    from shiftc.passes import ops, uniform
    from shiftc.passes.mixed_precision.size import fixed_bytes, layer_bytes

    model = load_model(tiny_decoder)
    cfg = ShiftAddConfig(group=32, scale_mode=scale_mode, lm_head=lm_head, tied_embedding=tied, embedding_bits=emb_bits,
                         layer_group={"*o_proj*": 64}, workers=1)
    sa = ShiftAddPass(cfg)
    targets, _ = sa.match(model)
    inits = {t.name: t for t in model.graph.initializer}
    fixed = fixed_bytes(model, targets, cfg)
    for bits in (2, 3):
        results, planned = {}, fixed["bytes"]
        for t in targets:
            n, k = sa.weight(inits, t).shape
            g = cfg.group_for(t.name)
            codes = np.zeros((n, k), np.uint8)
            if scale_mode == "uniform":
                results[t.name] = uniform.UniformResult(codes, np.zeros((n, -(-k // g)), np.float16),
                                                        np.zeros((n, -(-k // g)), np.float16), bits, g)
            else:
                exps = np.full((bits, n, -(-k // g), bcq.SCALE_MODES[scale_mode]), bcq.NO_TERM, np.int8)
                results[t.name] = bcq.BcqResult(codes, exps, bits, g, scale_mode)
            planned += layer_bytes(n, k, bits, g, scale_mode)
        out = sa(model, results=results).model
        assert ops.bytes_by_kind(out)["total"] == planned, bits
    assert bool(fixed["tied"]) == (tied and lm_head) and bool(fixed["embedding"]) == (emb_bits > 0 and not fixed["tied"])


def _size_plan(model, targets, cfg, mb, cache):
    from shiftc.passes.mixed_precision import MixedPrecisionConfig
    from shiftc.passes.mixed_precision.plan import make_plan

    return make_plan(model, targets, None, cfg, MixedPrecisionConfig(size_budget_mb=mb, candidates=[2, 3], cache=cache))


def test_size_budget_plan_fits_and_tightens(tiny_decoder, tmp_path):
    """The planned bytes are the written model's bytes and within the budget; one byte less gives a
    different, smaller plan; a budget under the smallest output is refused naming the flag."""
    from dataclasses import replace

    from shiftc.frontend.onnx_io import load_model
    from shiftc.passes import ops

    model = load_model(tiny_decoder)
    cfg = ShiftAddConfig(group=32, scale_mode="pow2", lm_head=False, workers=1)
    targets, _ = ShiftAddPass(cfg).match(model)
    cache = str(tmp_path / "cache")
    free = _size_plan(model, targets, cfg, 1e3, cache)  # room for every layer at 3 bits
    assert set(free["layer_bits"].values()) == {3}
    top = free["size"]["planned_bytes"]
    bottom = free["size"]["fixed_bytes"] + int(free["table"].layer_bytes()[:, 0].sum())  # every layer at 2 bits
    budget = (bottom + (top - bottom) // 2) / 1e6
    plan = _size_plan(model, targets, cfg, budget, cache)
    sz = plan["size"]
    assert set(plan["layer_bits"].values()) == {2, 3} and sz["planned_bytes"] <= sz["budget_bytes"] == int(budget * 1e6)
    out = ShiftAddPass(replace(cfg, layer_bits=plan["layer_bits"]))(model, results=plan["results"]).model
    assert ops.bytes_by_kind(out)["total"] == sz["planned_bytes"]
    tighter = _size_plan(model, targets, cfg, (sz["planned_bytes"] - 1) / 1e6, cache)
    assert tighter["layer_bits"] != plan["layer_bits"] and tighter["size"]["planned_bytes"] < sz["planned_bytes"]
    with pytest.raises(UsageError, match=r"--size-budget-mb .*no per-layer plan fits"):
        _size_plan(model, targets, cfg, (bottom - 1) / 1e6, cache)


def test_size_budget_flags_and_recipe(tiny_decoder, tmp_path, capsys):
    from shiftc.cli import main
    from shiftc.passes.recipe import load_recipe

    r = tmp_path / "r.yaml"
    r.write_text("shiftadd:\n  scale_mode: uniform\nmixed_precision:\n  size_budget_mb: 12.5\n")
    cfg = load_recipe(r)
    assert cfg.mixed_precision.size_budget_mb == 12.5 and cfg.mixed_precision.enabled
    r.write_text("mixed_precision:\n  size_budget_mb: 12.5\n  bits_budget: 2.5\n")
    with pytest.raises(UsageError, match="--size-budget-mb and --bits-budget .* exactly one"):
        load_recipe(r)
    r.write_text("mixed_precision:\n  size_budget_mb: -1\n")
    with pytest.raises(UsageError, match="--size-budget-mb must be"):
        load_recipe(r)
    r.write_text("shiftadd:\n  scale_mode: uniform\nmixed_precision:\n  bits_budget: 2.5\n  latency_budget_ms: 10\n")
    with pytest.raises(UsageError, match="--latency-budget-ms times the BCQ LUT kernels"):
        load_recipe(r)
    argv = ["compress", tiny_decoder, "-o", str(tmp_path / "x.onnx"), "--calib", "none", "--group", "32",
            "--bits-budget", "2.5", "--size-budget-mb", "10"]
    assert main(argv) == 2 and "exactly one" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_size_budget_end_to_end_report(tiny_decoder, tmp_path):
    """api.compress(size_budget_mb=...): OUT.report.json states the budget, the planned and the
    realised bytes (ops.bytes_by_kind of the written model), realised <= budget."""
    import json

    import shiftc.api
    from shiftc.passes import ops

    common = dict(group=32, scale_mode="pow2", calib="none", threads=1, lm_head=False)
    sizes = {}
    for b in (2, 3):  # the model at 2 and at 3 bits throughout: a budget between them needs both
        path = str(tmp_path / f"u{b}.onnx")
        shiftc.api.compress(tiny_decoder, path, bits=b, **common)
        sizes[b] = ops.bytes_by_kind(onnx.load(path))["total"]
    budget = round((sizes[2] + sizes[3]) / 2e6, 2)
    r = shiftc.api.compress(tiny_decoder, str(tmp_path / "s.onnx"), size_budget_mb=budget, candidates=[2, 3], **common)
    sz = json.load(open(r["mixed_precision"]["report"]["json"]))["mixed_precision"]["size"]
    written = ops.bytes_by_kind(onnx.load(str(tmp_path / "s.onnx")))["total"]
    assert sz["budget_mb"] == budget and sz["realised_bytes"] == written == sz["planned_bytes"] <= budget * 1e6
    assert {e["bits"] for e in r["layers"].values()} == {2, 3} and sz["meets_budget"]
