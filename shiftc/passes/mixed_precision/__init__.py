"""Mixed precision: per-layer shift-add bit widths from measured sensitivity, under a size budget
(average stored bits per weight, scales included; or the bytes of the whole output) and optionally
a latency budget. Works for every scale mode (BCQ pow2 / pow2x2, uniform grids).

    sensitivity.py  each layer quantized alone at each candidate width: output error on the
                    calibration data tr(ΔW H ΔWᵀ) (no PyTorch), weight error, ShiftAddLLM's score
    hawq.py         HAWQ-V2: Hessian traces per layer by Hutchinson probes through PyTorch
    allocate.py     the integer program (scipy.optimize.milp), Pareto sweep, ShiftAddLLM's
                    sort-and-threshold and random allocations (baselines)
    latency.py      kernel time per layer shape and width (the LUT kernels), for the latency budget
    cache.py        per-layer quantized results on disk (each layer quantized once per width)
    size.py         exact bytes of the output: the fixed part and each layer at each width
    assemble.py     fp32 models with Ŵ written back, to evaluate plans quickly
    plan.py         the step behind ``shiftc compress --bits-budget``; report.py the HTML/JSON report

The plan is a {layer name: bits} mapping for ShiftAddConfig.layer_bits.
"""

from .config import MixedPrecisionConfig

__all__ = ["MixedPrecisionConfig"]
