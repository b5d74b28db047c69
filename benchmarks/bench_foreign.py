"""SmolLM2-135M from three exporters: shiftc's own export, PyTorch's (dynamo) and optimum's.

The real SmolLM2-135M weights (the GGUF that installs with the project's assets, loaded into
transformers in float32) are saved as a Hugging Face folder, then exported three ways: ``shiftc
export`` of the folder, ``torch.onnx.export(..., dynamo=True)`` of the model (tests/families.py's
recipe: ids and mask in, logits out) beside its config.json, and optimum's ``text-generation-with-
past`` export in the test side venv (``make test`` builds .venv-optimum). ``shiftc compile`` runs on
each file as given; the foreign ones go through the front stage (shiftc/frontend/foreign.py). The
three libraries are then compared: single-token decode after a C-token prompt, libraries
alternated step by step (median CPU time of the calling thread, 1 thread), and perplexity on the
same held-out Wikipedia windows.

    .venv/bin/python benchmarks/bench_foreign.py [--contexts 128,1024] [--steps 30] [--tokens 4096]
        [--out benchmarks/results/foreign.json]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from common import ROOT, work_dir, write_results

sys.path.insert(0, os.path.join(ROOT, "tests"))
OPTIMUM_PY = os.path.join(ROOT, ".venv-optimum", "bin", "python")
OPTIMUM_EXPORT = ("from optimum.exporters.onnx import main_export; import sys; "
                  "main_export(sys.argv[1], output=sys.argv[2], task='text-generation-with-past')")


def _sources(work: str, gguf: str) -> dict[str, str]:
    """The three .onnx files (made once; a rerun reuses them)."""
    import families
    import shiftc
    from shiftc.frontend.export import load_hf_model

    hf = os.path.join(work, "hf")
    files = {"shiftc export": os.path.join(work, "own.onnx"), "torch.onnx dynamo": os.path.join(hf, "dynamo.onnx"),
             "optimum": os.path.join(work, "optimum", "model.onnx")}
    if all(os.path.exists(f) for f in files.values()):
        return files
    import copy

    import transformers

    loaded, _, _ = load_hf_model(gguf)
    config = copy.deepcopy(loaded.config)  # a GGUF-loaded model counts as quantized and will not save itself
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(hf)
    t0 = time.perf_counter()
    shiftc.export(hf, files["shiftc export"])
    print(f"shiftc export {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    families.dynamo_export(model, files["torch.onnx dynamo"])
    print(f"torch.onnx dynamo export {time.perf_counter() - t0:.1f}s")
    if not os.path.exists(OPTIMUM_PY):
        raise SystemExit("the optimum side venv is missing: `make test` (or make .venv-optimum/.installed) builds it")
    t0 = time.perf_counter()
    subprocess.run([OPTIMUM_PY, "-c", OPTIMUM_EXPORT, _v4_folder(hf, work), os.path.dirname(files["optimum"])], check=True)
    print(f"optimum export {time.perf_counter() - t0:.1f}s")
    return files


def _v4_folder(hf: str, work: str) -> str:
    """The folder as transformers 4.x writes it, for optimum's exporter (transformers 4.57): the rope
    base at the top level. Given transformers 5's config as is, 4.57 reads no rope_theta there and
    exports the model with the default base 10000 instead of SmolLM2's 100000 — a graph of
    another model, which shiftc's front stage refuses (its logits differ by ~2.8)."""
    import json

    out = os.path.join(work, "hf_v4")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for name in os.listdir(hf):
        if name.endswith(".safetensors") and not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.join(hf, name), os.path.join(out, name))
    return out


def _decode(libs: dict[str, str], contexts: list[int], steps: int) -> dict:
    import shiftc

    models = {k: shiftc.load(lib, threads=1) for k, lib in libs.items()}
    rng = np.random.default_rng(0)
    rows = {}
    for c in contexts:
        sessions = {k: m.lm_session() for k, m in models.items()}
        prompt = rng.integers(0, 49152, (1, c))
        for s in sessions.values():
            s.step(prompt, last_only=True)
        cpu = {k: [] for k in sessions}
        for _ in range(steps):
            for k, s in sessions.items():
                t0 = time.thread_time()
                s.step(np.array([[11]]), last_only=True)
                cpu[k].append((time.thread_time() - t0) * 1e3)
        own = statistics.median(cpu["shiftc export"])
        rows[f"C={c}"] = {k: {"cpu_ms": statistics.median(v), "ratio_to_own": statistics.median(v) / own}
                          for k, v in cpu.items()}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokens", type=int, default=4096, help="perplexity tokens (windows of 512)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "foreign.json"))
    args = p.parse_args(argv)

    import shiftc
    from shiftc.frontend.data import smollm2_gguf

    work = work_dir("foreign")
    gguf = str(smollm2_gguf())
    files = _sources(work, gguf)
    libs, compile_s = {}, {}
    for k, f in files.items():
        libs[k] = os.path.join(work, k.split()[0].replace(".", "_") + ".so")
        t0 = time.perf_counter()
        shiftc.compile(f, libs[k])
        compile_s[k] = round(time.perf_counter() - t0, 1)
    decode = _decode(libs, [int(c) for c in args.contexts.split(",")], args.steps)
    ppl = {k: shiftc.evaluate(lib, tokens=args.tokens, window=512, tokenizer=gguf, threads=2)["perplexity"]
           for k, lib in libs.items()}
    sha = {k: hashlib.sha256(open(lib, "rb").read()).hexdigest()[:16] for k, lib in libs.items()}
    print(f"{'exporter':20s} {'compile s':>9s} {'perplexity':>10s} " +
          " ".join(f"{c + ' ms (x own)':>22s}" for c in decode) + "  library sha256")
    for k in libs:
        cells = " ".join(f"{decode[c][k]['cpu_ms']:9.2f} ({decode[c][k]['ratio_to_own']:.3f}x)     " for c in decode)
        print(f"{k:20s} {compile_s[k]:9.1f} {ppl[k]:10.4f} {cells} {sha[k]}")
    result = {"model": "SmolLM2-135M (float32, from the GGUF asset)", "threads": 1, "steps": args.steps,
              "loadavg": os.getloadavg(), "onnx_bytes": {k: os.path.getsize(f) for k, f in files.items()},
              "compile_s": compile_s, "perplexity": ppl, "perplexity_tokens": args.tokens, "decode": decode,
              "library_sha256_16": sha}
    write_results(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
