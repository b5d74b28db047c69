"""Settings of the mixed-precision allocation (recipe section ``mixed_precision``, CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass

from ... import options as opts
from ...options import option

SENSITIVITIES = ("calib", "hawq", "kl")


@dataclass
class MixedPrecisionConfig:
    bits_budget: float | None = option(None, flag="--bits-budget", parse=opts.bits_budget, metavar="BITS",
                                       requires="shiftadd",
                                       help="mixed precision: per-layer bits minimising sensitivity with this average "
                                            "of stored bits per weight (scales included), e.g. 2.5; writes "
                                            "OUT.report.json/.html")
    size_budget_mb: float | None = option(None, flag="--size-budget-mb", parse=opts.megabytes, metavar="MB",
                                          requires="shiftadd",
                                          help="mixed precision: per-layer bits minimising sensitivity with the "
                                               "output's weights (every initializer: quantized layers, embedding table, "
                                               "norms, fp32 leftovers) at most MB x 10^6 bytes; instead of --bits-budget")
    # exactly one of bits_budget / size_budget_mb
    candidates: list[int] = option(flag="--mp-candidates", kw="candidates", parse=opts.bit_list, metavar="2,3,4",
                                   default_factory=lambda: [2, 3, 4], help="bit widths to choose from (default 2,3,4)")
    sensitivity: str = option("calib", flag="--sensitivity", choices=SENSITIVITIES,
                              help="calib: layer output error on the calibration data (default); kl: the model's "
                                   "output KL with each layer alone quantized (ONNX Runtime); hawq: HAWQ-V2 Hessian "
                                   "traces (PyTorch)")
    tie: bool = option(False, flag="--mp-tie", kw="tie",
                       help="layers sharing an input (q/k/v; gate/up) get one width")
    latency_budget_ms: float | None = option(None, flag="--latency-budget-ms", parse=float, metavar="MS",
                                             help="also bound the quantized layers' kernel time, measured per shape "
                                                  "with the LUT kernels")
    # the budget bounds the modelled time of the quantized layers + other_ms
    latency_margin: float = option(0.01, flag="--latency-margin", parse=float, metavar="FRACTION",
                                   help="plan against --latency-budget-ms x (1 - FRACTION), room for the latency "
                                        "model's error (default {default})")
    # 0.01: on SmolLM2-135M (1 thread) the model's error on plans it was not fitted
    # on was -1.4%..+2.9%, mostly over-predicting, and one plan compiled twice timed
    # up to 1.5% apart (benchmarks/results/mixed_precision_latency.json)
    latency_verify: int = option(2, flag="--latency-verify", parse=opts.nonnegative, metavar="N",
                                 help="with --latency-budget-ms: compile the plan and measure it beside the calibration "
                                      "plans; while it measures over budget, refit the latency model on those timings "
                                      "and plan again, N compiled plans at most (default {default}; 0: trust the "
                                      "prediction)")
    # verification timings alternate decode ms of the plan with the calibration plans'
    latency_verify_rounds: int = 200  # decode steps per library in each verification timing (median)
    target: str = option("host", flag="--target", help="where --latency-budget-ms is measured (host only for now)")
    other_ms: float | None = None  # decode time outside the quantized layers' kernels (attention, norms, embedding,
    #                                runtime), added to the latency model; None: measured once on this machine from
    #                                the compiled uniform smallest-width plan (latency.measure_fixed_cost); 0: the
    #                                budget bounds the kernels alone
    measure_latency: bool = False  # compile the output for the host and put its measured decode time in the report
    latency_measure_rounds: int = 10  # decode steps timed for other_ms / measure_latency (median)
    latency_rows: int = 1  # rows of x the kernels are timed at (1: decode)
    latency_threads: int = 1
    cache: str | None = option(None, flag="--mp-cache", metavar="DIR",
                               help="keep per-layer quantized results here between runs")
    hawq_source: str | None = option(None, flag="--hawq-source",
                                     help="HF folder or .gguf of the PyTorch model for --sensitivity hawq (default: the "
                                          "source recorded at export)")
    hawq_probes: int = 32  # maximum Hutchinson probes
    hawq_tol: float = 0.02  # relative change of the total trace that stops the probes
    hawq_window: int = 128  # tokens per probe
    kl_windows: int = 2  # calibration windows for the output-KL sensitivity (ONNX Runtime)
    kl_window: int = 128
    report: bool = option(True, flag="--report", help="write OUT.report.json/.html with --bits-budget (default on)")
    # write OUT.report.json / OUT.report.html
    eval_tokens: int = option(0, flag="--report-eval-tokens", parse=opts.positive, metavar="N",
                              help="report perplexity before/after on N held-out tokens (ONNX Runtime)")
    # perplexity before/after on this many held-out tokens in the report (0: not measured)
    eval_window: int = 512

    @property
    def enabled(self) -> bool:
        """A budget is set: the planner chooses every layer's bits."""
        return self.bits_budget is not None or self.size_budget_mb is not None

    def budget_flag(self) -> str:
        """The flag of the budget in force, for messages."""
        if self.size_budget_mb is not None:
            return f"--size-budget-mb {float(self.size_budget_mb):g}"
        return f"--bits-budget {float(self.bits_budget):g}"


def validate_mixed_precision(m: MixedPrecisionConfig, bad) -> None:
    """``bad(flag, message)`` raises; called by recipe.validate."""
    if m.bits_budget is not None and m.size_budget_mb is not None:
        bad("--size-budget-mb", "and --bits-budget are two budgets for the same plan: give exactly one of them")
    if m.size_budget_mb is not None and (isinstance(m.size_budget_mb, bool)
                                         or not isinstance(m.size_budget_mb, (int, float)) or not m.size_budget_mb > 0):
        bad("--size-budget-mb", f"must be a number of megabytes (10^6 bytes) > 0, got {m.size_budget_mb!r}")
    if m.bits_budget is not None:
        try:
            v = float(m.bits_budget)
        except (TypeError, ValueError):
            v = float("nan")
        if not 1.0 <= v <= 8.0:
            bad("--bits-budget", f"must be a number of bits per weight in [1, 8], got {m.bits_budget!r}")
    c = m.candidates
    if not isinstance(c, (list, tuple)) or not c or any(not isinstance(b, int) or not 1 <= b <= 4 for b in c) \
            or len(set(c)) != len(c):
        bad("--mp-candidates", f"must be distinct bit widths in 1..4, got {c!r}")
    if m.sensitivity not in SENSITIVITIES:
        bad("--sensitivity", f"must be one of {', '.join(SENSITIVITIES)}, got {m.sensitivity!r}")
    if m.latency_budget_ms is not None:
        if not m.enabled:
            bad("--latency-budget-ms", "needs --bits-budget or --size-budget-mb as well")
        if not isinstance(m.latency_budget_ms, (int, float)) or m.latency_budget_ms <= 0:
            bad("--latency-budget-ms", f"must be > 0, got {m.latency_budget_ms!r}")
        if m.target not in ("host", None):
            from ...errors import UnsupportedError

            raise UnsupportedError(f"--latency-budget-ms with --target {m.target}: kernel times can only be "
                                   f"measured on this machine (--target host) for now")
    if isinstance(m.latency_margin, bool) or not isinstance(m.latency_margin, (int, float)) \
            or not 0 <= m.latency_margin < 0.5:
        bad("--latency-margin", f"must be a fraction in [0, 0.5), got {m.latency_margin!r}")
    if m.other_ms is not None and (not isinstance(m.other_ms, (int, float)) or m.other_ms < 0):
        bad("other_ms", f"must be a number of ms >= 0 (or unset: measured), got {m.other_ms!r}")
    if not isinstance(m.measure_latency, bool):
        bad("measure_latency", f"must be true or false, got {m.measure_latency!r}")
    for flag, v, lo in (("latency_measure_rounds", m.latency_measure_rounds, 1), ("--latency-verify", m.latency_verify, 0),
                        ("latency_verify_rounds", m.latency_verify_rounds, 1), ("hawq_probes", m.hawq_probes, 2),
                        ("hawq_window", m.hawq_window, 2), ("kl_windows", m.kl_windows, 1), ("kl_window", m.kl_window, 2),
                        ("latency_rows", m.latency_rows, 1), ("latency_threads", m.latency_threads, 1),
                        ("--report-eval-tokens", m.eval_tokens, 0), ("eval_window", m.eval_window, 2)):
        if not isinstance(v, int) or v < lo:
            bad(flag, f"must be an integer >= {lo}, got {v!r}")
    if not isinstance(m.hawq_tol, (int, float)) or not 0 < m.hawq_tol < 1:
        bad("hawq_tol", f"must be in (0, 1), got {m.hawq_tol!r}")
