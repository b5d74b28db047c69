"""Load test: `shiftc serve` beside llama-cpp-python's OpenAI server on the same machine.

Both servers are loaded on 127.0.0.1 with the same thread count, for each of ``--threads`` (1 and
2), and measured alternately level by level (only one works at a time), ``--rounds`` times; each
level's figures are its median round. A bounded asyncio
client (httpx) keeps C requests in flight for C = 1, 4, 16 (``--clients``): each of C workers
sends ``--requests`` streamed /v1/completions requests one after the other. Every request is the
same body for both servers: a held-out Wikipedia passage of ``--prompt-words`` words as the
prompt, ``max_tokens`` tokens, greedy (temperature 0), and ``logit_bias`` -100 on the
end-of-sequence token so that both generate exactly ``max_tokens`` (equal work). Per level:
aggregate completion tokens/s (the tokens the servers' usage reports / the level's wall time,
prefills included), p50/p95 time to first token (request sent -> first streamed text), p50
request latency, failed requests. Then an overload burst for shiftc: ``max_batch + max_queue + 8``
simultaneous requests against a server with a small queue: beyond the bound only 503s.

    .venv/bin/python benchmarks/bench_serve.py            # shiftc 3-bit library vs llama.cpp Q3_K_M

The shiftc library defaults to SmolLM2-135M with the uniform-3bit recipe (made under
out/bench/serve/ on the first run: compress and compile, ~5 min); the GGUF is the decode-speed
benchmark's Q3_K_M (benchmarks/bench_vs_llamacpp.py makes it and the bench venv with
llama-cpp-python, to which this adds the server's packages). Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_vs_llamacpp as lc  # noqa: E402
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# pause before each timed level, so that the other server's worker threads have stopped spinning
GAP_S = 1.0
# what llama_cpp.server imports beyond llama-cpp-python itself (its "server" extra)
SERVER_REQS = ["fastapi==0.163.2", "uvicorn==0.54.0", "sse-starlette==3.7.0", "pydantic-settings==2.16.3",
               "starlette-context==0.3.6", "PyYAML==6.0.4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, words: int) -> list[str]:
    """``n`` held-out Wikipedia passages of about ``words`` words (the eval split shiftc scores)."""
    from shiftc.frontend.data import load_corpus

    out = []
    for text in load_corpus("wikipedia", "eval"):
        w = text.split()
        for i in range(0, len(w) - words, words * 3):
            out.append(" ".join(w[i:i + words]))
            if len(out) == n:
                return out
    return out


class ServerProcess:
    """A server subprocess on a free port; ``model`` is the id its /v1/models reports."""

    def __init__(self, label: str, cmd: list[str], port: int, log: Path, env=None):
        self.label, self.port = label, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        print("+", " ".join(map(str, cmd)), flush=True)
        self.p = subprocess.Popen(list(map(str, cmd)), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import httpx

        deadline = time.time() + 300
        while True:
            if self.p.poll() is not None:
                raise RuntimeError(f"{label} server exited with {self.p.returncode}; see {log}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200:
                    self.model = r.json()["data"][0]["id"]
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{label} server did not start in 300 s; see {log}")
            time.sleep(0.5)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


async def one_request(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    text = []
    chunks, usage = 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "retry_after": r.headers.get("retry-after")}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 500, "error": chunk["error"]}
                piece = chunk["choices"][0].get("text") if chunk.get("choices") else ""
                if piece:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
                    text.append(piece)
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - a failed request is counted
        return {"status": -1, "error": repr(exc)}
    t1 = time.perf_counter()
    return {"status": 200, "ttft_s": (first or t1) - t0, "latency_s": t1 - t0, "text": "".join(text),
            "tokens": usage if usage is not None else chunks}


async def level(url: str, model: str, clients: int, per_client: int, texts: list[str], max_tokens: int,
                eos: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    results = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(w):
            for i in range(per_client):
                body = {"model": model, "prompt": texts[(w * per_client + i) % len(texts)], "max_tokens": max_tokens,
                        "temperature": 0, "stream": True, "logit_bias": {str(eos): -100},
                        "stream_options": {"include_usage": True}}
                results.append(await one_request(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok)
    lat = sorted(r["latency_s"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None

    return {"clients": clients, "requests": len(results), "ok": len(ok),
            "failed": len(results) - len(ok), "statuses": sorted({r["status"] for r in results}),
            "errors": [r.get("error") for r in results if r["status"] != 200][:3],
            "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95), "latency_p50_s": pct(lat, 0.5),
            "texts": [r.get("text") for r in results]}


async def burst(url: str, model: str, n: int, texts: list[str], max_tokens: int) -> dict:
    """``n`` requests at once (non-streamed); status counts."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=n + 8)) as client:
        async def one(i):
            body = {"model": model, "prompt": texts[i % len(texts)], "max_tokens": max_tokens, "temperature": 0}
            try:
                r = await client.post(url + "/v1/completions", json=body)
                return r.status_code, r.headers.get("retry-after")
            except Exception as exc:  # noqa: BLE001
                return repr(exc), None

        out = await asyncio.gather(*(one(i) for i in range(n)))
    codes = [str(c) for c, _ in out]
    return {"requests": n, "status_counts": {c: codes.count(c) for c in sorted(set(codes))},
            "all_503_have_retry_after": all(ra is not None for c, ra in out if c == 503)}


def default_library() -> Path:
    """SmolLM2-135M compressed with the uniform-3bit recipe and compiled for this machine (made once)."""
    import shiftc
    from shiftc.frontend.data import smollm2_gguf

    work = ROOT / "out" / "bench" / "serve"
    lib = work / "smollm2-135m-uniform-3bit.so"
    if lib.exists():
        return lib
    src = ROOT / "out" / "demo" / "smollm2-135m.onnx"
    if not src.exists():
        src = work / "smollm2-135m.onnx"
        if not src.exists():
            shiftc.export(str(smollm2_gguf()), str(src), max_positions=2048)
    small = work / "smollm2-135m-uniform-3bit.onnx"
    if not small.exists():
        shiftc.compress(str(src), str(small), recipe=str(ROOT / "shiftc" / "passes" / "recipes" / "uniform-3bit.yaml"))
    shiftc.compile(str(small), str(lib))
    return lib


def ensure_server_env(python: Path) -> None:
    pins = dict(r.split("==") for r in SERVER_REQS)
    code = ("from importlib.metadata import version as v\n"
            f"assert all(v(n) == p for n, p in {pins}.items())\nimport llama_cpp.server.app")
    if subprocess.run([str(python), "-c", code], capture_output=True).returncode != 0:
        lc.run([python, "-m", "pip", "install", "--quiet", *SERVER_REQS])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shiftc", help="shiftc library (default: SmolLM2-135M with the uniform-3bit recipe, made "
                    "under out/bench/serve/ from make demo's fp32 .onnx or the GGUF if missing)")
    ap.add_argument("--gguf", help="llama.cpp model (default: the decode-speed benchmark's Q3_K_M)")
    ap.add_argument("--threads", default="1,2", help="thread counts, each a separate run of both servers")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client and level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16, help="shiftc serve --max-batch")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all levels, servers alternated level by level")
    ap.add_argument("--no-llamacpp", action="store_true", help="shiftc only")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    # TVM sizes its pool at most hardware_concurrency / 2 on x86-64 unless told (see bench_vs_llamacpp)
    os.environ.setdefault("TVM_NUM_THREADS", str(max(threads)))
    from shiftc.frontend.data import smollm2_gguf
    from shiftc.tokenizer import load_tokenizer

    eos = load_tokenizer(str(smollm2_gguf())).eos_token_id
    if args.shiftc is None:
        args.shiftc = str(default_library())
    texts = prompts(max(clients) * args.requests, args.prompt_words)
    work = ROOT / "out" / "bench" / "serve"
    work.mkdir(parents=True, exist_ok=True)

    def shiftc_cmd(t, max_batch, max_queue):
        return [sys.executable, "-m", "shiftc", "serve", args.shiftc, "--threads", t,
                "--max-batch", max_batch, "--max-queue", max_queue, "--tokenizer", smollm2_gguf()]

    gguf, python = args.gguf, None
    if not args.no_llamacpp:
        python = lc.ensure_bench_env()
        ensure_server_env(python)
        if gguf is None:
            worker = lc.Worker(python)
            try:
                gguf = str(lc.prepare_ggufs(worker, python, Path(smollm2_gguf()), ["Q3_K_M"])["Q3_K_M"])
            finally:
                worker.close()

    def llama_cmd(t):
        return [python, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", t, "--n_threads_batch", t,
                "--n_ctx", 2048, "--host", "127.0.0.1",
                "--interrupt_requests", "False"]  # its default cuts a streaming request short when another arrives

    res = {"what": "OpenAI-API load test on 127.0.0.1: shiftc serve vs llama-cpp-python's server, SmolLM2-135M 3-bit",
           "config": {k: getattr(args, k) for k in ("requests", "max_tokens", "prompt_words", "max_batch")}
           | {"clients": clients, "threads": threads, "shiftc": args.shiftc, "gguf": gguf,
              "body": "stream, temperature 0, logit_bias eos -100 (every request generates max_tokens)"},
           "environment": {"host": platform.node(), "cpu": lc._cpu_name(), "cores": os.cpu_count(),
                           "loadavg_before": os.getloadavg()},
           "runs": {}}
    for t in threads:
        cmds = {"shiftc": shiftc_cmd(t, args.max_batch, 64)}
        if python is not None:
            cmds["llama.cpp"] = llama_cmd(t)
        run = res["runs"][f"T={t}"] = {"servers": {}}
        servers = {}
        try:
            for label, cmd in cmds.items():  # both loaded; only one works at a time
                port = free_port()
                servers[label] = ServerProcess(label, cmd + ["--port", port], port, work / f"{label}-T{t}.log")
                asyncio.run(level(servers[label].url, servers[label].model, 1, 1, texts, 8, eos))  # warm-up
            rounds: dict[str, dict[str, list]] = {lab: {str(c): [] for c in clients} for lab in servers}
            for rnd in range(args.rounds):
                for c in clients:
                    for label, srv in servers.items():  # alternated level by level
                        time.sleep(GAP_S)
                        r = asyncio.run(level(srv.url, srv.model, c, args.requests, texts, args.max_tokens, eos))
                        rounds[label][str(c)].append(r)
                        print(f"T={t} round {rnd} {label:10} clients {c:3d}: {r['tokens_per_s']:7.1f} tok/s  ttft p50 "
                              f"{r['ttft_p50_s']:.2f}s p95 {r['ttft_p95_s']:.2f}s  latency p50 {r['latency_p50_s']:.2f}s  "
                              f"failed {r['failed']}", flush=True)
        finally:
            for srv in servers.values():
                srv.stop()
        for label, by_c in rounds.items():
            rows = {}
            for c, rs in by_c.items():
                best = sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2]  # the (lower) median round
                rows[c] = {**best, "tokens_per_s_rounds": [r["tokens_per_s"] for r in rs],
                           "failed": sum(r["failed"] for r in rs)}
            run["servers"][label] = {"levels": rows}
        lv = {lab: d["levels"] for lab, d in run["servers"].items()}
        run["shiftc_scaling"] = {c: lv["shiftc"][c]["tokens_per_s"] / lv["shiftc"][str(clients[0])]["tokens_per_s"]
                                 for c in lv["shiftc"]}
        if "llama.cpp" in lv:
            run["ratios_tokens_per_s"] = {c: lv["shiftc"][c]["tokens_per_s"] / lv["llama.cpp"][c]["tokens_per_s"]
                                          for c in lv["shiftc"]}
            # greedy on the same prompts: 3-bit models of two formats need not write the same text
            run["same_text_as_llamacpp_at_1_client"] = sum(
                x == y for x, y in zip(lv["shiftc"][str(clients[0])]["texts"], lv["llama.cpp"][str(clients[0])]["texts"]))
        for d in lv.values():
            for r in d.values():
                r.pop("texts", None)
    # overload: a small queue and a burst beyond it
    qb, mb = 4, 4
    port = free_port()
    srv = ServerProcess("shiftc-overload", shiftc_cmd(max(threads), mb, qb) + ["--port", port], port,
                        work / "shiftc-overload.log")
    try:
        res["overload"] = {"max_batch": mb, "max_queue": qb,
                           **asyncio.run(burst(srv.url, srv.model, mb + qb + 8, texts, args.max_tokens))}
    finally:
        srv.stop()
    print("overload:", res["overload"], flush=True)
    res["environment"]["loadavg_after"] = os.getloadavg()
    write_results(args.out, res)
    print(_table(res))
    return 0


def _table(res: dict) -> str:
    lines = ["| threads | clients | shiftc tok/s | TTFT p50 / p95 s | llama.cpp tok/s | TTFT p50 / p95 s | shiftc / llama.cpp |",
             "|---|---|---|---|---|---|---|"]
    for t, run in res["runs"].items():
        sv = run["servers"]
        for c, r in sv["shiftc"]["levels"].items():
            q = sv.get("llama.cpp", {}).get("levels", {}).get(c)
            cells = [t.split("=")[1], c, f"{r['tokens_per_s']:.1f}", f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f}"]
            cells += [f"{q['tokens_per_s']:.1f}", f"{q['ttft_p50_s']:.2f} / {q['ttft_p95_s']:.2f}",
                      f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x"] if q else ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
