"""Where shiftc keeps files between runs (a leaf module: any layer may import it)."""

from __future__ import annotations

import os

CACHE_ENV = "SHIFTC_CACHE_DIR"


def cache_dir(*parts: str) -> str:
    """shiftc's cache folder, or a path inside it: ``$SHIFTC_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/shiftc``, else ``~/.cache/shiftc`` (compiled kernels, CUDA fatbins, the
    aarch64 wheels and runtimes of ``shiftc package``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shiftc")
    return os.path.join(root, *parts)
