"""shiftc: compile trained neural networks into small, fast native libraries.

    import shiftc
    shiftc.export("path/to/hf-folder-or.gguf", "model.onnx")
    shiftc.compile("model.onnx", "model.so", target="host")
    m = shiftc.load("model.so", threads=2)
    m.run({"x": array}) / m.generate(prompt, tokenizer=...)
    shiftc.evaluate("model.so", task="perplexity", tokens=32768, window=512)
    shiftc.bench("model.so", vs="onnxruntime", threads=1)
    shiftc.compress("model.onnx", "model-3bit.onnx", bits=3, group=128, calib="wikipedia")
    shiftc.package("model.onnx", "model-arm", target="aarch64")   # a folder for an Arm board

The API is imported lazily so that ``import shiftc`` (and the native kernels) stay light.
"""

import os as _os

__version__ = "0.1.0"

# TVM sizes its thread pool from TVM_NUM_THREADS, else from half the logical CPUs (it assumes
# hyper-threads), and then pins the process to the cores it chose: on a 2-core machine, one thread
# and a process held on core 0 whatever ``threads=`` asks (decode of the 3-bit SmolLM2 library:
# 11.7 ms at "2 threads" vs 5.2 ms with the pool sized to the machine). shiftc sizes the pool
# itself (``runtime.set_threads``), so TVM is told every usable core before it starts one.
if hasattr(_os, "sched_getaffinity"):
    _os.environ.setdefault("TVM_NUM_THREADS", str(max(1, len(_os.sched_getaffinity(0)))))

_API = ("export", "compile", "load", "evaluate", "bench", "inspect", "generate", "compress", "package", "serve")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in ("ShiftcError",):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'shiftc' has no attribute '{name}'")


__all__ = list(_API) + ["ShiftcError", "__version__"]
