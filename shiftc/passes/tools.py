"""What the passes need from the rest of shiftc, handed in by the caller.

The passes transform graphs; compiling, loading and scoring a model belong to the backend and the
API, which import the passes, not the other way round. Where a pass has to measure something (the
mixed-precision latency budget compiles and times plans; its report scores perplexity) the caller
(:func:`shiftc.api.compress`) passes these callables in a :class:`Tools`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UsageError


@dataclass(frozen=True)
class Tools:
    compile: Callable[[str, str], Any] | None = None  # compile(onnx_path, library_path): a library for the host
    load: Callable[..., Any] | None = None  # load(library_path, threads=N) -> a model with lm_session()
    evaluate: Callable[..., dict] | None = None  # evaluate(path, tokens=, window=, threads=, tokenizer=) -> {"perplexity", ...}

    def need(self, name: str, why: str) -> Callable:
        fn = getattr(self, name)
        if fn is None:
            raise UsageError(f"{why} needs shiftc's {name} step: call it through shiftc.compress (or pass "
                             f"tools=Tools({name}=...))")
        return fn
