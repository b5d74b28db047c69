"""Progress reporting on stderr for steps that take more than a few seconds.

Quiet when SHIFTC_QUIET=1 or when the caller passes ``quiet=True``; output goes to stderr so that
``--json`` results on stdout stay machine-readable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time


def _quiet() -> bool:
    return os.environ.get("SHIFTC_QUIET", "") not in ("", "0")


def log(msg: str) -> None:
    if not _quiet():
        print(f"[shiftc] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(name: str):
    """Announce a step, then its duration when it ends."""
    log(f"{name} ...")
    t0 = time.perf_counter()
    yield
    log(f"{name} done in {time.perf_counter() - t0:.1f}s")


class Counter:
    """A counter that prints `name: i/n` at most every `every_s` seconds (and at the end)."""

    def __init__(self, name: str, total: int, every_s: float = 2.0):
        self.name, self.total, self.every_s = name, total, every_s
        self.t0 = self.last = time.perf_counter()
        self.i = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.i += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.i >= self.total:
            self.last = now
            rate = self.i / max(now - self.t0, 1e-9)
            log(f"{self.name}: {self.i}/{self.total} ({rate:.1f}/s){' ' + extra if extra else ''}")
