"""shiftc libraries side by side with llama.cpp and ONNX Runtime GenAI on SmolLM2-135M: size, perplexity, speed.

What it measures
  * llama.cpp ladder: the fp32 weights that shiftc's export reads (the packaged Q4_1 GGUF loaded to
    fp32 by transformers) are saved as an HF folder, written as an F32 GGUF by llama.cpp's own
    convert_hf_to_gguf.py, and quantized with ``llama_cpp.llama_model_quantize`` (``--types``).
  * ORT GenAI int4 (``--ortgenai``, on by default): the same HF folder written by ONNX Runtime
    GenAI's own model builder as its int4 CPU model (``-p int4 -e cpu``, the builder's defaults:
    4-bit blocks of 32 for every MatMul and the tied embedding, int8 activations in the MatMuls,
    logits for every prompt position); its ``x fp32`` is relative to shiftc's fp32 .onnx.
  * perplexity on exactly shiftc's held-out windows (shiftc/evaluation.py: ``--tokens`` // 512
    windows, each from an empty cache, NLL of every position but the first, float64 log-softmax);
    llama.cpp scores them with ``Llama(logits_all=True).eval``; ORT GenAI's model.onnx runs in
    onnxruntime (the runtime under ORT GenAI, same graph and kernels), one pass per window; shiftc
    with ``api.evaluate`` (its fp32 .onnx is the reference every ``x fp32`` column is relative to, per ladder).
  * speed, same machine and thread count, runs alternated library by library, round-robin over
    ``--rounds`` (the order rotates each round): decode = median ms of one-token steps after a
    prompt of C tokens (``--contexts``) with the KV cache (``Llama.eval([t])`` / ORT GenAI
    ``Generator.append_tokens([t])`` / shiftc ``lm_session().step(t, last_only=True)``, what a
    user's generation loop calls), prefill = one forward pass over 128 / 512 tokens from an empty
    cache (ORT GenAI: a new Generator, batch 1); at each of ``--threads`` (llama.cpp n_threads =
    n_threads_batch = T; ORT GenAI session intra_op_num_threads = T; shiftc ``api.load(lib,
    threads=T)``). Each run starts after a short pause so the other runtime's spinning worker
    threads are parked (see shiftc.benchmarking).
  * size: file MB and bits per weight = file bits / all parameters of the model (134.5M; for .so
    libraries the code is counted too; for ORT GenAI its .onnx and .onnx.data files).

llama-cpp-python and onnxruntime-genai live in their own venv (out/bench-venv, made on demand: 8-20
min of compiling), never in shiftc's: this file is the driver (shiftc's venv) and, with ``--worker``,
a JSON-lines server run by the bench venv's python (no shiftc import there); token arrays travel as
.npy files. GGUFs, the ORT GenAI model, the venv and perplexities are cached under out/ so that
reruns are quick.

    .venv/bin/python benchmarks/bench_vs_llamacpp.py \\
        --shiftc fp32=out/demo/smollm2-135m.so --shiftc sa3=out/demo/smollm2-135m-sa3.so \\
        [--types Q4_1,Q4_K_M,Q3_K_M,Q3_K_S,Q2_K] [--speed-types F32,Q4_1,Q3_K_M] [--tokens 32768]
        [--contexts 128,1024] [--threads 1,2] [--rounds 3] [--steps 16] [--no-ortgenai] [--skip-ppl]
        [--skip-speed] [--setup] [--out benchmarks/results/vs_llamacpp.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out"
VENV = OUT / "bench-venv"
WORK = OUT / "bench-llamacpp"
LLAMA_CPP = "llama-cpp-python==0.3.36"
# what convert_hf_to_gguf.py imports; transformers as in shiftc (4.57 cannot read the tokenizer 5.x saves)
BENCH_REQS = ["torch==2.13.0", "transformers==5.24.0", "sentencepiece==0.2.3"]
# ONNX Runtime GenAI (pulls onnxruntime) and what its model builder imports without declaring it
ORTGENAI_REQS = ["onnxruntime-genai==0.18.0", "onnx==1.23.2", "onnx-ir==1.1.0"]
ORTGENAI_LABEL = "ORT GenAI int4"
LADDER = "Q4_1,Q4_0,IQ4_NL,Q4_K_M,Q3_K_M,Q3_K_S,Q2_K"
WINDOW = 512
PREFILLS = (128, 512)
# Pause before each timed block, so that the other runtime's worker threads have stopped spinning
# (llama.cpp and ONNX Runtime poll for work after a run; on 2 cores a spinning thread of the idle
# process halves a 2-thread run of the measured one: measured 163 vs 215 tok/s with 0.05 s).
GAP_S = 0.5
STEM = "smollm2-135m"
WORKER_KINDS = ("llama.cpp", "ortgenai")  # run by the bench venv's worker; "shiftc" runs in the driver


# ---------------------------------------------------------------- worker (bench venv, no shiftc)

def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Same as shiftc.evaluation.window_nll: sum of -log p(ids[t] | ids[<t]) for t >= 1."""
    z = logits[:-1].astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))
    target = z[np.arange(len(ids) - 1), ids[1:]]
    return float((lse - target).sum()), len(ids) - 1


class LlamaWorker:
    def __init__(self):
        import llama_cpp

        self.lc = llama_cpp
        self.models = {}

    def _llama(self, path, threads, n_ctx, logits_all=False):
        return self.lc.Llama(model_path=path, n_ctx=n_ctx, n_batch=max(WINDOW, 512), logits_all=logits_all,
                             n_threads=threads, n_threads_batch=threads, verbose=False)

    def op_version(self):
        out = {"llama_cpp_python": self.lc.__version__, "system_info": self.lc.llama_print_system_info().decode()}
        try:
            import onnxruntime
            import onnxruntime_genai

            out.update(onnxruntime_genai=onnxruntime_genai.__version__, onnxruntime=onnxruntime.__version__)
        except ImportError:
            pass
        return out

    def op_quantize(self, src, dst, type, threads):
        p = self.lc.llama_model_quantize_default_params()
        p.ftype, p.nthread = getattr(self.lc, f"LLAMA_FTYPE_MOSTLY_{type}"), threads
        rc = self.lc.llama_model_quantize(src.encode(), dst.encode(), p)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {type} returned {rc}")
        return {"bytes": os.path.getsize(dst)}

    def op_info(self, path):
        llm = self._llama(path, 1, 64)
        return {"n_params": int(self.lc.llama_model_n_params(llm.model)),
                "tensor_bytes": int(self.lc.llama_model_size(llm.model))}

    def op_ppl(self, path, windows, threads):
        wins = np.load(windows)
        llm = self._llama(path, threads, wins.shape[1], logits_all=True)
        total, count, t0 = 0.0, 0, time.perf_counter()
        for w in wins:
            llm.reset()
            llm.eval(w.tolist())
            nll, n = window_nll(np.asarray(llm.scores[: len(w)]), w)
            total, count = total + nll, count + n
            print(f"{path}: {count // (len(w) - 1)}/{len(wins)} windows, ppl so far {np.exp(total / count):.3f}",
                  file=sys.stderr, flush=True)
        return {"nll": total, "count": count, "seconds": time.perf_counter() - t0}

    def op_load(self, key, path, threads, n_ctx):
        self.models[key] = llm = self._llama(path, threads, n_ctx)
        return {"n_threads": self.lc.llama_n_threads(llm.ctx),
                "n_threads_batch": self.lc.llama_n_threads_batch(llm.ctx)}

    def op_ortgenai_load(self, key, path, threads, n_ctx):
        self.models.pop(key, None)
        self.models[key] = GenaiSession(path, threads, n_ctx)
        return {"intra_op_num_threads": threads, "max_length": n_ctx}

    def op_ortgenai_ppl(self, path, windows, threads):
        """Plain onnxruntime on the builder's model.onnx (the graph ORT GenAI runs): each window in
        one pass from an empty KV cache, logits of every position."""
        import onnxruntime as ort

        wins = np.load(windows)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(Path(path) / "model.onnx"), so, providers=["CPUExecutionProvider"])
        dec = json.loads((Path(path) / "genai_config.json").read_text())["model"]["decoder"]
        empty = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)  # past length 0
        past = {i.name: empty for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
        total, count, t0 = 0.0, 0, time.perf_counter()
        for w in wins:
            w = w.astype(np.int64)
            logits = sess.run(["logits"], {"input_ids": w[None], "attention_mask": np.ones((1, len(w)), np.int64),
                                           **past})[0][0]
            nll, n = window_nll(logits, w)
            total, count = total + nll, count + n
            print(f"{path}: {count // (len(w) - 1)}/{len(wins)} windows, ppl so far {np.exp(total / count):.3f}",
                  file=sys.stderr, flush=True)
        return {"nll": total, "count": count, "seconds": time.perf_counter() - t0}

    def op_unload(self, key):
        self.models.pop(key, None)
        return {}

    def op_decode(self, key, prompt, steps):
        llm, ids = self.models[key], np.load(prompt).tolist()
        llm.reset()
        llm.eval(ids[:-steps])
        return timed_steps(lambda t: llm.eval([t]), ids[-steps:])

    def op_prefill(self, key, prompt):
        llm, ids = self.models[key], np.load(prompt).tolist()
        llm.reset()
        time.sleep(GAP_S)
        t0 = time.perf_counter()
        llm.eval(ids)
        return {"seconds": time.perf_counter() - t0}


class GenaiSession:
    """An ORT GenAI model driven as a user's generation loop drives it, with the reset/eval calls
    that op_decode and op_prefill make on a Llama: one Generator (batch 1, KV cache of n_ctx) per
    prompt, tokens fed with ``append_tokens`` (one forward pass over them); session threads =
    ``intra_op_num_threads`` through a genai_config overlay."""

    def __init__(self, path, threads, n_ctx):
        import onnxruntime_genai as og

        cfg = og.Config(str(path))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og, self.model, self.n_ctx, self.gen = og, og.Model(cfg), n_ctx, None

    def reset(self):
        self.gen = None  # the previous KV cache goes first
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx, batch_size=1)
        self.gen = self.og.Generator(self.model, params)

    def eval(self, ids):
        self.gen.append_tokens(np.asarray(ids, dtype=np.int32))


def timed_steps(step, tokens) -> dict:
    """Time one call of ``step`` per token, back to back after one pause; CPU/wall over the block
    tells how many cores were really busy (thread count check)."""
    time.sleep(GAP_S)
    times, c0, w0 = [], time.process_time(), time.perf_counter()
    for t in tokens:
        t1 = time.perf_counter()
        step(int(t))
        times.append(time.perf_counter() - t1)
    return {"times": times, "cpu_per_wall": (time.process_time() - c0) / (time.perf_counter() - w0)}


def worker_main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything native code prints goes to stderr, not into the protocol
    w = LlamaWorker()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            out = {"ok": True, **getattr(w, "op_" + req.pop("op"))(**req)}
        except Exception as exc:  # reported to the driver, which raises
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(out) + "\n")
    return 0


# ---------------------------------------------------------------- driver: bench venv and files

def run(cmd, log=None, env=None):
    print("+", " ".join(map(str, cmd)) + (f"  (log: {log})" if log else ""), flush=True)
    fh = open(log, "a") if log else None
    subprocess.run(list(map(str, cmd)), check=True, env=env, stdout=fh, stderr=subprocess.STDOUT if fh else None)


def sdist_dir() -> Path:
    return WORK / "src" / LLAMA_CPP.replace("-", "_").replace("==", "-")


def ensure_bench_env(force: bool = False) -> Path:
    """out/bench-venv with llama-cpp-python built from source (GGML_NATIVE), the converter's needs
    and ONNX Runtime GenAI with its model builder's; the downloaded sdist is unpacked for
    vendor/llama.cpp/convert_hf_to_gguf.py. Each step is skipped when already done (``force``:
    rebuild llama-cpp-python)."""
    py = VENV / "bin" / "python"
    WORK.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        run([sys.executable, "-m", "venv", VENV])
    sdists = sorted((WORK / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        run([py, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP, "-d", WORK / "sdist"])
        sdists = sorted((WORK / "sdist").glob("llama_cpp_python-*.tar.gz"))

    def has(code):
        return subprocess.run([str(py), "-c", code], capture_output=True).returncode == 0

    if force or not has(f"import llama_cpp; assert llama_cpp.__version__ == '{LLAMA_CPP.split('==')[1]}'"):
        print("building llama-cpp-python from source (~8 min on 2 cores), log in", WORK / "build.log", flush=True)
        again = ["--force-reinstall", "--no-deps"] if force else []
        run([py, "-m", "pip", "install", "--no-cache-dir", *again, sdists[-1]], log=WORK / "build.log",
            env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"})
    for reqs in (BENCH_REQS, ORTGENAI_REQS):
        pins = dict(r.split("==") for r in reqs)
        if not has(f"from importlib.metadata import version as v\n"
                   f"assert all(v(n).split('+')[0] == p for n, p in {pins}.items())"):
            run([py, "-m", "pip", "install", *reqs], log=WORK / "build.log")
    if not sdist_dir().exists():
        (WORK / "src").mkdir(exist_ok=True)
        run(["tar", "xzf", sdists[-1], "-C", WORK / "src"])
    return py


class Worker:
    """The bench venv's python running this file with --worker; one JSON line per call."""

    def __init__(self, python: Path):
        self.log = open(WORK / "worker.log", "a")  # llama.cpp's own messages (quantization, loading)
        self.p = subprocess.Popen([str(python), __file__, "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)

    def __call__(self, op, **kw):
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        out = json.loads(self.p.stdout.readline())
        if not out.pop("ok"):
            raise RuntimeError(f"worker {op}: {out['error']}")
        return out

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def atomic(path: Path, make) -> Path:
    if not path.exists():
        tmp = path.with_name("partial-" + path.name)
        make(tmp)
        tmp.rename(path)
    return path


def hf_folder(gguf_src: Path) -> Path:
    """The fp32 weights shiftc exports (the packaged GGUF loaded to fp32 by transformers) saved as
    an HF folder, the input of both llama.cpp's converter and ORT GenAI's model builder; cached."""

    def save_hf(tmp):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"gguf_file": gguf_src.name}
        model = AutoModelForCausalLM.from_pretrained(gguf_src.parent, dtype=torch.float32, **kw)
        model.hf_quantizer = None  # de-quantized to fp32 on load; transformers still calls it "gguf-quantized"
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_src.parent, **kw).save_pretrained(tmp)

    return atomic(WORK / "hf-fp32", save_hf)


def prepare_ggufs(worker: Worker, python: Path, gguf_src: Path, types: list[str]) -> dict[str, Path]:
    """F32 GGUF from the fp32 weights shiftc exports, then the quantized ladder; all cached."""
    hf = hf_folder(gguf_src)
    conv = sdist_dir() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    paths = {"F32": atomic(WORK / f"{STEM}-F32.gguf", lambda tmp: run(
        [python, conv, hf, "--outtype", "f32", "--outfile", tmp], log=WORK / "convert.log"))}
    for t in types:
        paths[t] = atomic(WORK / f"{STEM}-{t}.gguf", lambda tmp, t=t: print(f"quantizing: {t}", flush=True) or worker(
            "quantize", src=str(paths["F32"]), dst=str(tmp), type=t, threads=os.cpu_count()))
    return paths


def prepare_ortgenai(python: Path, gguf_src: Path) -> Path:
    """ORT GenAI's int4 CPU model, written by its own model builder from the same HF folder; cached."""
    import shutil

    def build(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        print("building the ORT GenAI int4 model, log in", WORK / "ortgenai-build.log", flush=True)
        run([python, "-m", "onnxruntime_genai.models.builder", "-i", hf_folder(gguf_src), "-o", tmp,
             "-p", "int4", "-e", "cpu", "-c", WORK / "ortgenai-cache"], log=WORK / "ortgenai-build.log")

    return atomic(WORK / "ortgenai-int4", build)


def model_files(path: Path) -> list[Path]:
    """The file itself, or for a model folder its graph and weights (.onnx, .onnx.data)."""
    return sorted(f for f in path.iterdir() if f.name.endswith((".onnx", ".onnx.data"))) if path.is_dir() else [path]


def file_key(path: Path, tokens: int) -> str:
    sts = [f.stat() for f in model_files(path)]
    return (f"{path.resolve()}|{sum(st.st_size for st in sts)}|{int(max(st.st_mtime for st in sts))}"
            f"|{tokens}|{WINDOW}")


# ---------------------------------------------------------------- driver: measurements

def perplexities(libs: dict, worker: Worker, args) -> tuple[dict, str]:
    """{label: perplexity record}; llama.cpp and ORT GenAI scored on shiftc's own windows; cached by file."""
    from shiftc import api
    from shiftc.frontend.data import load_corpus, smollm2_gguf, token_windows
    from shiftc.tokenizer import load_tokenizer

    wins = token_windows(load_tokenizer(str(smollm2_gguf())), load_corpus("wikipedia", "eval"),
                         window=WINDOW, n_tokens=args.tokens)
    digest = hashlib.sha256(wins.astype(np.int64).tobytes()).hexdigest()[:16]
    win_file = WORK / f"windows-{digest}.npy"  # named by content: concurrent runs cannot swap them
    np.save(win_file, wins)
    cache_path = WORK / "ppl-cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    threads = max(args.threads)
    out = {}
    for label, lib in libs.items():
        key = file_key(lib["path"], args.tokens) + "|" + digest
        if key not in cache and not args.skip_ppl:
            print(f"perplexity: {label} ({wins.shape[0]} windows of {WINDOW})", flush=True)
            if lib["kind"] in WORKER_KINDS:
                op = "ppl" if lib["kind"] == "llama.cpp" else "ortgenai_ppl"
                r = worker(op, path=str(lib["path"]), windows=str(win_file), threads=threads)
                assert r["count"] == wins.shape[0] * (WINDOW - 1), r
                cache[key] = {"perplexity": float(np.exp(r["nll"] / r["count"])), "tokens_scored": r["count"],
                              "seconds": round(r["seconds"], 1), "windows": int(wins.shape[0])}
            else:
                r = api.evaluate(str(lib["path"]), tokens=args.tokens, window=WINDOW, threads=threads)
                cache[key] = {k: r[k] for k in ("perplexity", "tokens_scored", "seconds", "windows")}
            cache_path.write_text(json.dumps(cache, indent=1))
        if key in cache:
            out[label] = cache[key]
    return out, digest


def speed(libs: dict, worker: Worker, args) -> dict:
    """{label: {cell: record}}, cells 'decode C=..,T=..' and 'prefill P=..,T=..'."""
    from shiftc import api

    n_ctx = max(max(args.contexts) + args.steps, max(PREFILLS)) + 8
    prompts = {}
    for n in [c + args.steps for c in args.contexts] + list(PREFILLS):
        prompts[n] = np.random.default_rng(n).integers(0, 49152, n).astype(np.int64)  # same file for every run
        np.save(WORK / f"prompt-{n}.npy", prompts[n])
    times = {lab: {} for lab in libs}
    info = {lab: {} for lab in libs}
    for T in args.threads:
        sessions = {}
        for lab, lib in libs.items():
            if lib["kind"] in WORKER_KINDS:
                op = "load" if lib["kind"] == "llama.cpp" else "ortgenai_load"
                info[lab][f"T={T}"] = worker(op, key=lab, path=str(lib["path"]), threads=T, n_ctx=n_ctx)
            else:
                sessions[lab] = api.load(str(lib["path"]), threads=T).lm_session()
                info[lab][f"T={T}"] = {"tvm_threads": tvm_threads()}
        order = list(libs)
        for lab in order:  # warm-up (weights paged in, thread pools started), not recorded
            prefill_run(worker, lab, sessions.get(lab), prompts[PREFILLS[0]], PREFILLS[0])
        for rnd in range(args.rounds):
            print(f"speed: threads {T}, round {rnd + 1}/{args.rounds}", flush=True)
            for lab in order[rnd % len(order):] + order[: rnd % len(order)]:
                for C in args.contexts:
                    r = decode_run(worker, lab, sessions.get(lab), prompts[C + args.steps], args.steps, C)
                    d = times[lab].setdefault(f"decode C={C},T={T}", {"times": [], "cpu_per_wall": []})
                    d["times"] += r["times"]
                    d["cpu_per_wall"].append(r["cpu_per_wall"])
                for P in PREFILLS:
                    s = prefill_run(worker, lab, sessions.get(lab), prompts[P], P)
                    times[lab].setdefault(f"prefill P={P},T={T}", {"times": []})["times"].append(s)
        for lab, lib in libs.items():
            if lib["kind"] in WORKER_KINDS:
                worker("unload", key=lab)
        del sessions
    out = {}
    for lab, cells in times.items():
        out[lab] = {"threads_applied": info[lab]} if info[lab] else {}
        for cell, d in cells.items():
            med = statistics.median(d["times"])
            n = int(cell.split("=")[1].split(",")[0]) if cell.startswith("prefill") else 1
            out[lab][cell] = {"median_ms": med * 1e3, "tokens_per_s": n / med, "samples": len(d["times"])}
            if "cpu_per_wall" in d:
                out[lab][cell]["cpu_per_wall"] = round(statistics.median(d["cpu_per_wall"]), 2)
    return out


def tvm_threads() -> int:
    import tvm  # noqa: F401  (registers the runtime functions)
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def decode_run(worker, label, session, prompt, steps, C) -> dict:
    if session is None:
        return worker("decode", key=label, prompt=str(WORK / f"prompt-{len(prompt)}.npy"), steps=steps)
    session.reset()
    session.step(prompt[None, :C], last_only=True)
    return timed_steps(lambda t: session.step(np.array([[t]]), last_only=True), prompt[C:])


def prefill_run(worker, label, session, prompt, P) -> float:
    if session is None:
        return worker("prefill", key=label, prompt=str(WORK / f"prompt-{P}.npy"))["seconds"]
    session.reset()
    time.sleep(GAP_S)
    t0 = time.perf_counter()
    session.step(prompt[None], last_only=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- report

def report(res: dict, out: Path) -> None:
    cells = sorted({c for s in res["speed"].values() for c in s if c.startswith(("decode", "prefill"))},
                   key=lambda c: (c[0], int(c.split("=")[1].split(",")[0]), c))
    head = ["library", "MB", "bpw", "ppl", "x fp32"] + [c.replace("decode ", "dec ").replace("prefill ", "pre ")
                                                       for c in cells]
    rows = []
    for lab, lib in res["libraries"].items():
        p = res["perplexity"].get(lab, {}).get("perplexity")
        ref = res["perplexity"].get("llama.cpp F32" if lib["kind"] == "llama.cpp" else "shiftc onnx fp32", {})
        rows.append([lab, f"{lib['bytes'] / 1e6:.1f}", f"{lib['bits_per_weight']:.2f}", f"{p:.3f}" if p else "-",
                     f"{p / ref['perplexity']:.3f}" if p and ref else "-"]
                    + [f"{res['speed'].get(lab, {}).get(c, {}).get('tokens_per_s', float('nan')):.1f}"
                       if c in res["speed"].get(lab, {}) else "-" for c in cells])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    if res.get("ratios"):
        print("\ntok/s ratio shiftc / llama.cpp or ORT GenAI (> 1: shiftc faster)")
        for pair, by_cell in res["ratios"].items():
            print(f"  {pair:32s}" + "  ".join(f"{c}: {v:.2f}" for c, v in by_cell.items()))
    print("(decode/prefill columns: tokens/s; bpw: file bits / all parameters)")
    if "check_f32_vs_shiftc_onnx" in res:
        print(f"llama.cpp F32 vs shiftc fp32 .onnx perplexity: "
              f"{res['check_f32_vs_shiftc_onnx']['relative_difference'] * 100:+.3f}%")
    raw = Path(write_results(str(out), res))
    plot(res, raw.with_suffix(".png"))
    print(f"wrote {out} (summary), {raw} and {raw.with_suffix('.png')}")


def _annotate(ax, pts, name: str, flip: bool = False) -> None:
    """Label points without the runtime's name (``name``, in the legend); libraries at the same spot
    (llama.cpp's Q2_K and Q3_K_S here) share one label."""
    spots: dict = {}
    for x, y, lab in pts:
        spots.setdefault((round(x, 1), round(y, 3)), []).append(lab.removeprefix(name + " "))
    for i, ((x, y), names) in enumerate(spots.items()):
        ax.annotate(" = ".join(names), (x, y), fontsize=8, xytext=(4, 4 - 14 * ((i + flip) % 2)),
                    textcoords="offset points")


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    cell = f"decode C={min(res['config']['contexts'])},T={min(res['config']['threads'])}"  # least disturbed by load
    for kind, mark, name in (("llama.cpp", "o-", "llama.cpp"), ("ortgenai", "^", "ORT GenAI"),
                             ("shiftc", "s", "shiftc")):
        labs = sorted((l for l, v in res["libraries"].items() if v["kind"] == kind and l in res["perplexity"]),
                      key=lambda l: res["libraries"][l]["bytes"])
        pts = [(res["libraries"][l]["bytes"] / 1e6, res["perplexity"][l]["perplexity"], l) for l in labs]
        if not pts:
            continue
        a.plot([p[0] for p in pts], [p[1] for p in pts], mark, label=name)
        _annotate(a, pts, name, kind == "shiftc")
        sp = [(res["perplexity"][l]["perplexity"], res["speed"][l][cell]["tokens_per_s"], l)
              for l in labs if cell in res["speed"].get(l, {})]
        b.plot([p[0] for p in sp], [p[1] for p in sp], mark[0], label=name)
        _annotate(b, sp, name, kind == "shiftc")
    a.set(xscale="log", xlabel="file size (MB, log)", ylabel=f"perplexity ({res['config']['tokens']} tokens)",
          title="SmolLM2-135M: perplexity vs size")
    b.set(xlabel="perplexity", ylabel="decode tokens/s", title=f"decode speed vs perplexity ({cell})")
    for ax in (a, b):
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _, ax=ax: f"{v:g}" if ax is a else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shiftc", action="append", default=[], metavar="LABEL=PATH",
                    help="a shiftc .so library (repeatable); default: out/demo/smollm2-135m{,-sa3}.so if present")
    ap.add_argument("--reference-onnx", help="shiftc's fp32 .onnx (default out/demo/smollm2-135m.onnx, else exported)")
    ap.add_argument("--types", default=LADDER, help="llama.cpp ladder beside F32 (sizes, perplexity)")
    ap.add_argument("--speed-types", default="F32,Q4_1,Q3_K_M", help="llama.cpp types timed")
    ap.add_argument("--ortgenai", action=argparse.BooleanOptionalAction, default=True,
                    help="ONNX Runtime GenAI's int4 CPU model as a library (perplexity and speed)")
    ap.add_argument("--tokens", type=int, default=32768, help="perplexity budget (windows of 512)")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per library, cell and round")
    ap.add_argument("--skip-ppl", action="store_true", help="no new perplexity runs (cached ones are still shown)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--setup", action="store_true", help="(re)build the bench venv first")
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    ap.add_argument("--out", default="benchmarks/results/vs_llamacpp.json")
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main()
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.threads = [int(x) for x in args.threads.split(",")]
    types = [t for t in args.types.split(",") if t and t != "F32"]
    # TVM sizes its pool at most hardware_concurrency / 2 on x86-64 (it assumes hyper-threads): on
    # this 2-vCPU machine threads=2 silently ran on one thread. The variable lifts that cap; it must
    # be set before TVM loads. set_threads (api.load) still picks each T below it.
    os.environ.setdefault("TVM_NUM_THREADS", str(max(args.threads)))
    from shiftc import api
    from shiftc.frontend.data import smollm2_gguf

    python = ensure_bench_env(args.setup)
    worker = Worker(python)
    try:
        ggufs = prepare_ggufs(worker, python, Path(smollm2_gguf()), types)
        n_params = worker("info", path=str(ggufs["F32"]))["n_params"]
        libs = {f"llama.cpp {t}": {"kind": "llama.cpp", "type": t, "path": p} for t, p in ggufs.items()}
        for t, p in ggufs.items():
            libs[f"llama.cpp {t}"]["tensor_bytes"] = worker("info", path=str(p))["tensor_bytes"]
        if args.ortgenai:
            libs[ORTGENAI_LABEL] = {"kind": "ortgenai", "type": "int4",
                                    "path": prepare_ortgenai(python, Path(smollm2_gguf()))}
        ref = Path(args.reference_onnx or OUT / "demo" / f"{STEM}.onnx")
        if not ref.exists() and not args.skip_ppl:
            ref = atomic(WORK / f"{STEM}.onnx", lambda tmp: api.export(str(smollm2_gguf()), tmp, max_positions=2048))
        if ref.exists():
            libs["shiftc onnx fp32"] = {"kind": "shiftc", "path": ref, "timed": False}
        shiftc_args = args.shiftc or [f"{n}={p}" for n, p in (("fp32", OUT / "demo" / f"{STEM}.so"),
                                                                ("sa3", OUT / "demo" / f"{STEM}-sa3.so")) if p.exists()]
        for spec in shiftc_args:
            lab, _, path = spec.partition("=")
            libs[f"shiftc {lab}"] = {"kind": "shiftc", "path": Path(path)}
        for lib in libs.values():
            files = model_files(lib["path"])
            lib["bytes"] = sum(f.stat().st_size for f in files)
            lib["modified_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(max(f.stat().st_mtime for f in files)))
            lib["bits_per_weight"] = lib["bytes"] * 8 / n_params
        ppl, digest = perplexities(libs, worker, args)
        speed_types = [t for t in args.speed_types.split(",") if t]
        timed = {lab: lib for lab, lib in libs.items()
                 if lib.get("timed", True) and (lib["kind"] != "llama.cpp" or lib["type"] in speed_types)}
        load0 = os.getloadavg()
        sp = {} if args.skip_speed else speed(timed, worker, args)
        version = worker("version")
    finally:
        worker.close()
    ratios = {}
    for s in [l for l in sp if libs[l]["kind"] == "shiftc"]:
        for q in [l for l in sp if libs[l]["kind"] in WORKER_KINDS]:
            ratios[f"{s} / {q}"] = {c: sp[s][c]["tokens_per_s"] / sp[q][c]["tokens_per_s"]
                                    for c in sp[s] if c in sp[q] and "tokens_per_s" in sp[s][c]}
    res = {
        "what": "SmolLM2-135M: shiftc libraries vs llama.cpp (llama-cpp-python) and ONNX Runtime GenAI "
                "on the same machine",
        "config": {"tokens": args.tokens, "window": WINDOW, "windows_sha256_16": digest, "contexts": args.contexts,
                   "threads": args.threads, "rounds": args.rounds, "decode_steps_per_round": args.steps,
                   "prefills": list(PREFILLS), "gap_s": GAP_S, "n_params": n_params, "note": args.note},
        "environment": {"host": platform.node(), "cpu": _cpu_name(), "cores": os.cpu_count(), **version,
                        "loadavg_before_speed": load0, "loadavg_after_speed": os.getloadavg(),
                        "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "bench_reqs": BENCH_REQS + ORTGENAI_REQS,
                        "reference_onnx": str(ref), **_git()},
        "libraries": {l: {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()} for l, d in libs.items()},
        "perplexity": ppl, "speed": sp, "ratios": ratios,
    }
    f32, onnx = ppl.get("llama.cpp F32"), ppl.get("shiftc onnx fp32")
    if f32 and onnx:  # the same fp32 weights, scored on the same windows by both
        res["check_f32_vs_shiftc_onnx"] = {"relative_difference": f32["perplexity"] / onnx["perplexity"] - 1}
    report(res, ROOT / args.out)
    return 0


def _git() -> dict:
    """The shiftc commit the run saw; libraries built from a tree with local changes say so."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"shiftc_commit": git("rev-parse", "--short", "HEAD"),
            "shiftc_tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
