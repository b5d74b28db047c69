"""`shiftc serve`: the OpenAI-compatible server over a compiled decoder, spoken to with the `openai`
client on 127.0.0.1. References: `shiftc generate` (the same prompt, sampler and seed give the same
text) and, for batching, the logits of a batch-1 KV-cache session on the same tokens."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from conftest import assert_close, run_cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

# batched decode (main over n slots) vs the batch-1 decode function on the same tokens: the same
# kernels up to the GEMM/GEMV split and the float16 cache, logits of magnitude ~1
TOL_BATCHED = dict(rtol=1e-3, atol=1e-3)
PROMPTS = ["The capital of France is", "Once upon a time", "In 1990, the", "Python is a language that",
           "Hello", "The quick brown fox jumps over the lazy dog and then"]


class Served:
    """A server on an ephemeral 127.0.0.1 port, run by uvicorn in a thread."""

    def __init__(self, lib: str, tokenizer: str, **kw):
        import uvicorn

        from shiftc.server.app import build

        self.app, self.engine = build(lib, tokenizer=tokenizer, threads=1, model_id="tiny", **kw)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()


@pytest.fixture(scope="module")
def served(tiny_llama, smollm2_gguf_path):
    s = Served(tiny_llama[1], smollm2_gguf_path, max_batch=4, max_queue=16)
    yield s
    s.close()


def _reference(lib, tok, prompt, n, **kw):
    import shiftc

    return shiftc.generate(lib, prompt, max_new_tokens=n, tokenizer=tok, threads=1, **kw)


def test_completion_equals_generate(served, tiny_llama, smollm2_gguf_path):
    """Greedy /v1/completions, plain and streamed, gives `shiftc generate`'s text."""
    ref = _reference(tiny_llama[1], smollm2_gguf_path, PROMPTS[0], 12)
    r = served.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == ref["text"]
    assert r.usage.prompt_tokens == ref["prompt_tokens"] and r.usage.completion_tokens == ref["new_tokens"]
    assert r.choices[0].finish_reason == ("length" if ref["new_tokens"] == 12 else "stop")
    chunks = list(served.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_and_sampling_equal_generate(served, tiny_llama, smollm2_gguf_path):
    """Chat (the tokenizer's template) streamed with usage; seeded top-k/top-p sampling and
    Mirostat give the text `shiftc generate` draws with the same sampler and seed."""
    ref = _reference(tiny_llama[1], smollm2_gguf_path, "Say hi", 10, chat=True)
    stream = served.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref["text"]
    assert chunks[-1].usage.completion_tokens == ref["new_tokens"]

    ref = _reference(tiny_llama[1], smollm2_gguf_path, PROMPTS[1], 10, temperature=0.8, top_k=40, top_p=0.9, seed=7)
    r = served.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0.8,
                                         top_p=0.9, seed=7, extra_body={"top_k": 40})
    assert r.choices[0].text == ref["text"]
    ref = _reference(tiny_llama[1], smollm2_gguf_path, PROMPTS[2], 10, temperature=1.0, mirostat_tau=5.0, seed=3)
    r = served.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, seed=3,
                                         extra_body={"mirostat_tau": 5.0})
    assert r.choices[0].text == ref["text"]


def test_stop_sequence(served, tiny_llama, smollm2_gguf_path):
    """The text ends before the first occurrence of a stop string, which is not returned."""
    ref = _reference(tiny_llama[1], smollm2_gguf_path, PROMPTS[3], 16)["text"]
    stop = ref[len(ref) // 2:len(ref) // 2 + 3]
    for stream in (False, True):
        r = served.client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=16, temperature=0,
                                             stop=[stop], stream=stream)
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert text == ref[:ref.index(stop)]


def test_logit_bias_and_ignore_eos(served):
    """logit_bias shifts the logits before sampling (+100 on a token makes greedy choose it);
    ignore_eos keeps generating through an end-of-sequence token."""
    tok = served.engine.tok
    word = tok(" hello", add_special_tokens=False)["input_ids"][0]
    r = served.client.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0,
                                         logit_bias={str(word): 100})
    assert r.choices[0].text == tok.decode([word] * 5)
    eos = str(sorted(served.engine.eos)[0])
    r = served.client.completions.create(model="tiny", prompt="Hi", max_tokens=6, temperature=0, logit_bias={eos: 100})
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = served.client.completions.create(model="tiny", prompt="Hi", max_tokens=6, temperature=0, logit_bias={eos: 100},
                                         extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model="tiny", prompt="Hi", max_tokens=2, logit_bias={"10000000": 1})
    assert e.value.body["param"] == "logit_bias"


class _Recorder:
    """Greedy, keeping every logits vector it was given."""

    def __init__(self):
        self.logits = []

    def sample(self, logits):
        self.logits.append(np.array(logits, np.float32))
        return int(np.argmax(logits))


def test_batched_decode_matches_single_sessions(tiny_llama, smollm2_gguf_path):
    """Six requests through a batch of 4 slots (joining and leaving mid-flight, compaction of the
    rows): every step's logits equal a batch-1 session's on the same tokens."""
    from shiftc.backend.runtime import load
    from shiftc.server.engine import Engine, Request
    from shiftc.tokenizer import load_tokenizer

    model = load(tiny_llama[1], threads=1)
    tok = load_tokenizer(smollm2_gguf_path)
    engine = Engine(model, tok, max_batch=4, max_queue=8).start()
    done = threading.Semaphore(0)
    reqs = []
    for i, p in enumerate(PROMPTS):
        req = Request(prompt_ids=tok(p, add_special_tokens=False)["input_ids"], max_tokens=20 + 7 * i,
                      sampler=_Recorder(), emit=lambda ev: done.release() if ev["type"] != "text" else None,
                      stop_at_eos=False)
        engine.submit(req)
        reqs.append(req)
    for _ in reqs:
        assert done.acquire(timeout=120)
    stats = dict(engine.stats)
    engine.stop()
    assert stats["max_batch_seen"] == 4 and stats["completed"] == len(PROMPTS)
    for req in reqs:
        s = model.lm_session(batch=1)
        want = [s.step(np.asarray([req.prompt_ids]), last_only=True)[0]]
        for t in req.tokens[:-1]:
            want.append(s.step(np.asarray([[t]]), last_only=True)[0])
        assert len(req.sampler.logits) == len(want) == req.max_tokens
        assert_close(np.stack(req.sampler.logits), np.stack(want), **TOL_BATCHED, what="batched logits")


def test_concurrent_clients_all_served(served):
    """Below the queue bound every concurrent request succeeds, decoded in one batch."""
    results, errors = [], []

    def one(p):
        try:
            r = served.client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)
            results.append(r.usage.completion_tokens)
        except Exception as exc:  # noqa: BLE001 - counted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == len(PROMPTS)
    assert served.health()["max_batch_seen"] >= 2


def test_overload_gives_503_only(tiny_llama, smollm2_gguf_path):
    """One slot and a queue of one: of eight simultaneous requests, two are served and the rest get
    503 with Retry-After and an OpenAI error object; nothing else."""
    s = Served(tiny_llama[1], smollm2_gguf_path, max_batch=1, max_queue=1)
    try:
        start = threading.Barrier(8)
        out = []

        def one():
            start.wait()
            r = httpx.post(s.url + "/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": "Hello", "max_tokens": 200, "temperature": 0})
            out.append(r)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted(r.status_code for r in out)
        assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1, codes
        for r in out:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
            else:
                assert r.json()["usage"]["completion_tokens"] >= 1
        assert s.health()["rejected"] == codes.count(503)
    finally:
        s.close()


def test_disconnect_frees_the_slot(served):
    """A client that goes away mid-stream is cancelled and its slot freed."""
    before = served.health()["cancelled"]
    with httpx.stream("POST", served.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "Hello", "max_tokens": 400, "temperature": 0,
                            "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(g.startswith("data: ") for g in got)
    deadline = time.time() + 30
    while time.time() < deadline:
        h = served.health()
        if h["cancelled"] > before and h["active"] == 0:
            break
        time.sleep(0.1)
    assert h["cancelled"] > before and h["active"] == 0, h


def test_bad_requests(served):
    c = served.client
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="Hi " * 600, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="Hi", max_tokens=-1)
    assert "max_tokens" in e.value.body["message"]
    for bad in ({"n": 2}, {"temperature": 5}, {"logprobs": 2}):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="Hi", max_tokens=2, **bad)
        assert e.value.body["param"] == next(iter(bad))
    r = httpx.post(served.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = httpx.post(served.url + "/v1/chat/completions",  # no max_tokens: the context must hold the prompt
                   json={"model": "tiny", "messages": [{"role": "user", "content": "Hi " * 600}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_cli_serve_refusals(tiny_llama, tmp_path):
    """An .onnx (no in-place KV cache library) and a port already taken: one error each."""
    r = run_cli("serve", tiny_llama[0], "--port", "0")
    assert r.returncode == 2 and "compiled causal-LM library" in r.stderr, r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", tiny_llama[1], "--port", str(port))
    assert r.returncode == 2 and f"--port {port}" in r.stderr, r.stderr


def test_stream_coalesces_queued_text():
    """Text events already queued when a stream reads go out as one chunk, in order; the events
    after text (done, error) are kept and end the stream."""
    import asyncio

    from shiftc.server.app import _coalesced

    async def read(evs):
        q: asyncio.Queue = asyncio.Queue()
        for ev in evs:
            q.put_nowait(ev)
        return [ev async for ev in _coalesced(q)]

    t = lambda s: {"type": "text", "text": s}  # noqa: E731
    done = {"type": "done", "finish_reason": "length"}
    assert asyncio.run(read([t("a"), t("b"), t("c"), done])) == [t("abc"), done]
    assert asyncio.run(read([done, t("never read")])) == [done]
    err = {"type": "error", "message": "x"}
    assert asyncio.run(read([t("a"), err])) == [t("a"), err]
