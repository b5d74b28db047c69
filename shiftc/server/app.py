"""The OpenAI-compatible HTTP API over an :class:`~shiftc.server.engine.Engine` (FastAPI).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
both with ``stream: true`` (server-sent events, ending with ``data: [DONE]``) or without;
``GET /v1/models``; ``GET /health`` (engine counters). Sampling: ``temperature`` (0: greedy),
``top_p``, ``top_k`` and ``mirostat_tau``/``mirostat_eta`` (extensions), ``seed``, ``max_tokens``
(``max_completion_tokens`` for chat), ``stop`` (a string or up to 4), ``logit_bias``,
``ignore_eos`` (extension). Errors are OpenAI error
objects: 400 for a bad body or a request that cannot fit the context, 404 for another model's
name, 503 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ShiftcError
from ..sampling import Sampler, SamplerConfig
from .engine import ContextExceeded, Engine, QueueFull, Request

RETRY_AFTER_S = 1
SWITCH_INTERVAL_S = 2e-4
MAX_STOPS = 4  # as the OpenAI API


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, type=self.type, param=self.param, code=self.code,
                      headers=self.headers)


def _error(status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Sampling(BaseModel):
    """Fields common to both endpoints; unknown fields are ignored, as the OpenAI API does for
    fields a server does not implement, unless they change the result (then 400, below)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # extension (llama.cpp, vLLM)
    mirostat_tau: float | None = Field(None, gt=0)  # extension: Mirostat v2
    mirostat_eta: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # extension (vLLM, llama.cpp): generate max_tokens whatever the model says
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ChatBody(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


def _unsupported(body: _Sampling) -> None:
    """400 for the fields that would change the answer and are not implemented."""
    if body.n != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    if body.presence_penalty or body.frequency_penalty:
        raise ApiError(400, "presence and frequency penalties are not supported", param="presence_penalty")
    if getattr(body, "logprobs", None):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if getattr(body, "echo", False):
        raise ApiError(400, "echo is not supported", param="echo")
    if (getattr(body, "best_of", None) or 1) != 1:
        raise ApiError(400, "only best_of = 1 is supported", param="best_of")


def _sampler(body: _Sampling) -> Sampler:
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    temperature = 1.0 if body.temperature is None else body.temperature
    if body.mirostat_tau is not None:
        if body.top_k is not None or (body.top_p or 1.0) < 1.0:
            raise ApiError(400, "mirostat_tau cannot be combined with top_k or top_p", param="mirostat_tau")
        if temperature == 0:
            raise ApiError(400, "mirostat_tau needs temperature > 0", param="temperature")
        eta = {} if body.mirostat_eta is None else {"mirostat_eta": body.mirostat_eta}  # else the sampler's default
        cfg = SamplerConfig(temperature=temperature, mirostat_tau=body.mirostat_tau, **eta)
    elif temperature == 0:
        cfg = SamplerConfig(greedy=True)
    else:
        cfg = SamplerConfig(temperature=temperature, top_k=body.top_k, top_p=body.top_p)
    return Sampler(config=cfg.validate(), seed=seed)


def _logit_bias(body: _Sampling) -> dict[int, float]:
    out = {}
    for k, v in (body.logit_bias or {}).items():
        try:
            out[int(k)] = float(v)
        except ValueError:
            raise ApiError(400, f"logit_bias: '{k}' is not a token id", param="logit_bias") from None
        if not -100 <= out[int(k)] <= 100:
            raise ApiError(400, f"logit_bias[{k}] must be in [-100, 100] (got {v})", param="logit_bias")
    return out


def _stops(body: _Sampling) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop sequences (got {len(stops)})", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    return stops


class Server:
    """What the routes share: the engine, its tokenizer and the model's public name."""

    def __init__(self, engine: Engine, model_id: str):
        self.engine, self.model_id, self.tok = engine, model_id, engine.tok
        self.created = int(time.time())
        self._handoff: _Handoff | None = None

    def handoff(self, loop: asyncio.AbstractEventLoop) -> _Handoff:
        """The event hand-off to ``loop`` (one per serving loop)."""
        if self._handoff is None or self._handoff.loop is not loop:
            self._handoff = _Handoff(loop)
        return self._handoff

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (got a list of several)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tok(prompt, add_special_tokens=False)["input_ids"])
        return [int(t) for t in prompt]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        msgs = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant", "developer", "tool"):
                raise ApiError(400, f"messages[{i}].role '{role}' is not one of system, developer, user, assistant, tool",
                               param=f"messages[{i}].role")
            if isinstance(content, list):  # content parts: text only
                texts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise ApiError(400, f"messages[{i}]: only text content parts are supported",
                                       param=f"messages[{i}].content")
                    texts.append(str(part.get("text", "")))
                content = "".join(texts)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or text parts",
                               param=f"messages[{i}].content")
            msgs.append({"role": "system" if role == "developer" else role, "content": content})
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def request(self, ids: list[int], max_tokens: int | None, body: _Sampling, emit) -> Request:
        if max_tokens is None:  # chat without a limit: what the context leaves
            if len(ids) >= self.engine.context:
                raise ApiError(400, f"this model's context is {self.engine.context} tokens; the prompt has {len(ids)}",
                               param="messages", code="context_length_exceeded")
            max_tokens = self.engine.context - len(ids)
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be >= 1 (got {max_tokens})", param="max_tokens")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        req = Request(prompt_ids=ids, max_tokens=max_tokens, sampler=_sampler(body), emit=emit, stop=_stops(body),
                      logit_bias=_logit_bias(body), stop_at_eos=not body.ignore_eos)
        try:
            self.engine.submit(req)
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy: {exc}; retry later", type="server_error",
                           code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except ContextExceeded as exc:
            raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from exc
        except ShiftcError as exc:
            raise ApiError(400, str(exc), param="logit_bias" if str(exc).startswith("logit_bias") else "prompt") from exc
        return req


class _Handoff:
    """Engine-thread events to the requests' queues on the event loop, with one wake-up of the loop
    per burst: a decode step emits an event for every active request, and each wake-up is a write
    to the loop's self-pipe and a turn of the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: collections.deque = collections.deque()
        self.armed = False

    def post(self, queue: asyncio.Queue, ev: dict) -> None:
        with self.lock:
            self.pending.append((queue, ev))
            if self.armed:
                return
            self.armed = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop has closed (shutdown): nobody waits for the events
            pass

    def _drain(self) -> None:
        with self.lock:
            items, self.pending = self.pending, collections.deque()
            self.armed = False
        for queue, ev in items:
            queue.put_nowait(ev)


def create_app(engine: Engine, model_id: str) -> FastAPI:
    """The FastAPI application; the engine must be started (``engine.start()``)."""
    srv = Server(engine, model_id)
    app = FastAPI(title="shiftc", description=f"OpenAI-compatible API for {model_id}")
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '?')})")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request body")
        return _error(400, f"{where}: {msg}" if where else msg, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500
                      else "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_id, "active": engine.active, "queued": engine.queued,
                "max_batch": engine.max_batch, "max_queue": engine.max_queue, "context": engine.context,
                **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": srv.model_id, "object": "model", "created": srv.created,
                                            "owned_by": "shiftc"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        srv.check_model(body.model)
        _unsupported(body)
        ids = srv.prompt_ids(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # the OpenAI default
        return await _respond(srv, http, body, ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest):
        srv.check_model(body.model)
        _unsupported(body)
        ids = srv.chat_ids(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _respond(srv, http, body, ids, max_tokens, chat=True)

    return app


async def _respond(srv: Server, http: HttpRequest, body: _Sampling, ids: list[int], max_tokens: int | None,
                   *, chat: bool):
    handoff = srv.handoff(asyncio.get_running_loop())
    events: asyncio.Queue = asyncio.Queue()
    req = srv.request(ids, max_tokens, body, lambda ev: handoff.post(events, ev))
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"

    def usage(done: dict) -> dict:
        p, c = done["prompt_tokens"], done["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    if not body.stream:
        parts = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        req.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                if ev["type"] == "text":
                    parts.append(ev["text"])
                elif ev["type"] == "error":
                    return _error(500, ev["message"], type="server_error")
                else:
                    break
        except asyncio.CancelledError:
            req.cancel()
            raise
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": ev["finish_reason"],
                   "logprobs": None} if chat else
                  {"index": 0, "text": text, "finish_reason": ev["finish_reason"], "logprobs": None})
        return {"id": rid, "object": obj, "created": created, "model": srv.model_id, "choices": [choice],
                "usage": usage(ev)}

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            d = ({"role": "assistant", "content": ""} if first else {}) | ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return json.dumps({"id": rid, "object": chunk_obj, "created": created, "model": srv.model_id,
                           "choices": [choice]})

    async def stream():
        try:
            if chat:
                yield {"data": chunk(None, None, first=True)}
            async for ev in _coalesced(events):
                if ev["type"] == "text":
                    yield {"data": chunk(ev["text"], None)}
                elif ev["type"] == "error":
                    yield {"data": json.dumps({"error": {"message": ev["message"], "type": "server_error",
                                                         "param": None, "code": None}})}
                    break
                else:
                    yield {"data": chunk(None, ev["finish_reason"])}
                    if include_usage:
                        yield {"data": json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                                   "model": srv.model_id, "choices": [], "usage": usage(ev)})}
                    break
            yield {"data": "[DONE]"}
        finally:
            req.cancel()  # a client gone mid-stream frees its slot; a no-op once done

    return EventSourceResponse(stream(), ping=15)


async def _coalesced(events: asyncio.Queue):
    """A request's engine events up to the last, text events already queued merged into one (a
    client or an event loop that falls behind under load gets fewer, longer chunks)."""
    while True:
        ev = await events.get()
        while ev["type"] == "text" and not events.empty():
            nxt = events.get_nowait()
            if nxt["type"] != "text":
                yield ev
                ev = nxt
                break
            ev = {"type": "text", "text": ev["text"] + nxt["text"]}
        yield ev
        if ev["type"] != "text":
            return


def build(model_path: str, *, threads: int | None = None, max_batch: int = 16, max_queue: int = 64,
          context: int | None = None, tokenizer: str | None = None, model_id: str | None = None):
    """(FastAPI app, started engine) for a compiled causal LM; ``model_id`` defaults to the
    file's stem."""
    import os

    from ..backend.runtime import load
    from ..tokenizer import tokenizer_for

    model = load(model_path, threads)
    Engine.check_model(model)
    tok = tokenizer_for(model.meta, tokenizer, model_path)
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue, context=context)
    name = model_id or os.path.splitext(os.path.basename(model_path))[0]
    return create_app(engine.start(), name), engine


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kw) -> None:
    """Serve a compiled causal LM until interrupted (``shiftc serve``); ``kw`` as :func:`build`."""
    import socket

    import uvicorn

    from ..errors import UsageError

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in [0, 65535] (got {port})")
    try:  # a taken port: one clear error before the model loads
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there: {exc.strerror or exc}") from exc
    app, engine = build(model_path, **kw)
    srv = app.state.server
    # The engine thread wants the GIL back after every library call; with the default 5 ms switch
    # interval it waits on the HTTP thread for up to that long per decode step.
    import sys

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    print(f"shiftc serve: {srv.model_id} on http://{host}:{port}/v1 (batch up to {engine.max_batch}, "
          f"queue {engine.max_queue}, context {engine.context}, {engine.model.threads} threads)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        engine.stop()
