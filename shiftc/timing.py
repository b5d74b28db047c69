"""Timing side by side: calls interleaved round by round so that machine noise hits each alike;
the process's peak memory. A leaf module (nothing of shiftc imported): the passes time compiled
plans with it too."""

from __future__ import annotations

import time

GAP_S = 0.05  # idle time before each timed call (see alternate)


def alternate(fns: dict[str, callable], repeats: int, warmup: int = 1, gap_s: float = GAP_S) -> dict[str, list[float]]:
    """Time the functions in turn, ``repeats`` rounds. Each timed call is preceded by a short
    pause: ONNX Runtime's worker threads busy-spin for tens of milliseconds after a run and would
    otherwise take a core away from whatever runs next."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            time.sleep(gap_s)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory so far (bytes; ``getrusage`` maximum RSS), None where the
    platform does not report it. A CLI command is one process, so this is that command's peak."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB

