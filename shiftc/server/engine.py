"""Continuous batching for a compiled causal LM: many requests decode together, one library call
per step over the batch dimension.

The library's ``main`` takes the in-place KV caches ``cache.{i}.key|value [B, KVH, rows, D]``
(backend/kv_cache.py), an attention mask ``[B, T]`` and position ids; a step writes the new keys
and values to rows ``[T − S, T)`` of every sequence's cache and attends over the rows its mask
marks. The engine keeps one set of caches of ``max_batch`` slots and a shared row clock ``T``:

- requests are admitted into free slots by one prefill of their prompts together (left-padded
  to the longest, on scratch caches); a prompt of ``L`` tokens is then copied to rows
  ``[T − L, T)`` of its slot, right-aligned with the sequences already decoding, and decodes with
  the mask ``0…0 1…1`` (left padding, which the decoder's mask supports: ``kpos = cumsum(mask) −
  1``, so a row's position is what the sequence has before it);
- each decode step feeds one token per occupied slot (ids ``[n, 1]``, each slot's own position),
  writes row ``T`` of every slot and advances the clock; slots past the last occupied one are not
  run (the batch is ``n`` = last occupied slot + 1, a view of the first ``n`` slots);
- a slot's rows are always the contiguous range ``[start, T)``; when the clock reaches the
  caches' rows they grow (doubling, up to the context), and when it would pass the context, or the
  rows below the oldest sequence waste more than they hold, the occupied slots are compacted:
  moved down so that they end at ``max length`` (one copy per slot and cache).

Everything runs on one engine thread; requests arrive through :meth:`Engine.submit` from any
thread and report through their ``emit`` callback (called on the engine thread).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable

import numpy as np

from ..backend.runtime import CompiledModel, Model
from ..errors import ShiftcError, UsageError
from ..sampling import Sampler

FIRST_ROWS = 256  # caches start with this many rows per slot and double as the clock needs


class QueueFull(ShiftcError):
    """More requests are waiting than ``max_queue``."""


class ContextExceeded(ShiftcError):
    """A prompt plus the tokens asked do not fit in the context."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. ``emit(event)`` receives, on the engine thread:
    ``{"type": "text", "text": delta}`` as text becomes final (held back while it may still turn
    into a stop string or is an incomplete character), then one ``{"type": "done",
    "finish_reason": "stop" | "length" | "cancelled", "prompt_tokens": P, "completion_tokens": C}``
    or ``{"type": "error", "message": ...}``."""

    prompt_ids: list[int]
    max_tokens: int
    sampler: Sampler
    emit: Callable[[dict], None]
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_at_eos: bool = True
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)  # added to the logits
    # engine state
    cancelled: bool = False
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    text: str = ""  # the text of tokens[:read_at]
    prefix_at: int = 0
    read_at: int = 0
    start: int = 0  # first cache row of the sequence (its rows are [start, clock))

    def __post_init__(self):
        self.bias_ids = np.fromiter(self.logit_bias, np.int64, len(self.logit_bias))
        self.bias_values = np.fromiter(self.logit_bias.values(), np.float32, len(self.logit_bias))

    def cancel(self) -> None:
        """Ask the engine to drop this request (a disconnected client): its slot is freed at the
        next step, and ``done`` with ``finish_reason="cancelled"`` is emitted."""
        self.cancelled = True


class Engine:
    """Batched decoding of one compiled causal LM.

    ``Engine(model, tokenizer, max_batch=16, max_queue=64, context=None)``; ``start()`` runs the
    engine thread, ``submit(request)`` queues a request (raises :class:`QueueFull` beyond
    ``max_queue`` waiting, :class:`ContextExceeded` when it cannot fit), ``stop()`` ends it.
    ``context``: the most tokens (prompt + generated) one request may hold; default the model's
    positions (``shiftc export --max-positions``) or 2048 where none is recorded.
    """

    def __init__(self, model: Model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 context: int | None = None):
        self.check_model(model)
        if max_batch < 1 or max_queue < 0:
            raise UsageError(f"--max-batch must be >= 1 and --max-queue >= 0 (got {max_batch}, {max_queue})")
        d = model.meta["decoder"]
        self.model, self.tok = model, tokenizer
        self.layers, self.kv_heads, self.head_dim, self.vocab = (
            d["num_layers"], d["num_kv_heads"], d["head_dim"], d["vocab_size"])
        limit = d.get("max_positions")
        if context is not None and limit and context > limit:
            raise UsageError(f"--context {context} exceeds the model's {limit} positions")
        self.context = int(context or limit or 2048)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos = set(d.get("eos_token_ids", [])) | (
            {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set())
        self._caches: list[np.ndarray] = []
        self._view_cache: dict[int, list] = {}
        self._rows = 0
        self._clock = 0
        self._slots: list[Request | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: counters for /health and the load test: steps, batch sizes, compactions
        self.stats = {"decode_steps": 0, "decoded_tokens": 0, "prefills": 0, "prefill_tokens": 0,
                      "compactions": 0, "max_batch_seen": 0, "completed": 0, "cancelled": 0, "rejected": 0}

    @staticmethod
    def check_model(model: Model) -> None:
        """Raise :class:`UsageError` unless ``model`` is a library the engine can batch."""
        if not isinstance(model, CompiledModel) or not model.kv_inplace or "decoder" not in model.meta:
            raise UsageError(f"'{model.path}': serving needs a compiled causal-LM library (.so) with the in-place "
                             "KV cache: shiftc compile a causal-LM .onnx for a CPU target")

    # -- requests -------------------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise :class:`ContextExceeded` when the request cannot fit in the context."""
        if prompt_tokens < 1:
            raise UsageError("the prompt is empty after tokenization")
        if max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1 (got {max_tokens})")
        if prompt_tokens + max_tokens > self.context:
            raise ContextExceeded(
                f"this model's context is {self.context} tokens; the request asks for "
                f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} to generate)")

    def submit(self, req: Request) -> None:
        self.check(len(req.prompt_ids), req.max_tokens)
        for what, ids in (("prompt", np.asarray(req.prompt_ids)), ("logit_bias", req.bias_ids)):
            if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
                raise UsageError(f"{what}: token ids must be in [0, {self.vocab}), got [{ids.min()}, {ids.max()}]")
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = sum(s is None for s in self._slots)  # free slots take waiting requests at the next step
            if len(self._waiting) >= self.max_queue + free:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(req)
            self._cv.notify()

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # -- thread ---------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="shiftc-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not any(self._slots):
                    self._cv.wait()
                if self._stopping:
                    pending = list(self._waiting) + [s for s in self._slots if s is not None]
                    self._waiting.clear()
                    break
                admitted = []
                for b in range(self.max_batch):
                    if self._slots[b] is None and self._waiting:
                        req = self._waiting.popleft()
                        self._slots[b] = req
                        admitted.append((b, req))
            try:
                live = [(b, r) for b, r in admitted if not r.cancelled]
                if live:
                    self._prefill(live)
                for b, req in enumerate(self._slots):  # cancelled, admitted or decoding: freed
                    if req is not None and req.cancelled:
                        self._finish(b, "cancelled")
                if any(self._slots):
                    self._decode_step()
            except Exception as exc:  # a failed library call: fail the requests in flight, keep serving
                for b, req in enumerate(self._slots):
                    if req is not None:
                        req.emit({"type": "error", "message": f"generation failed: {exc}"})
                        self._slots[b] = None
        for req in pending:
            req.emit({"type": "error", "message": "the server is shutting down"})

    # -- caches ---------------------------------------------------------------------------------
    def _views(self, n: int) -> list:
        """Tensors on the first ``n`` slots of every cache, sharing their memory (DLPack)."""
        if n not in self._view_cache:
            import tvm

            self._view_cache[n] = [tvm.runtime.from_dlpack(c[:n]) for c in self._caches]
        return self._view_cache[n]

    def _grow(self, rows: int) -> None:
        """Caches of ``rows`` rows per slot holding what the old ones held. They are numpy arrays
        on 64-byte boundaries (as the TVM runtime requires of a tensor's data, and so of every
        slot's: a slot is a multiple of 64 bytes), handed to the library as views."""
        shape = (self.max_batch, self.kv_heads, rows, self.head_dim)
        grown = []
        for old in self._caches or [None] * (2 * self.layers):
            arr = _aligned_zeros(shape, self.model.kv_dtype)
            if old is not None and self._clock:
                arr[:, :, :self._clock] = old[:, :, :self._clock]
            grown.append(arr)
        self._caches, self._rows = grown, rows
        self._view_cache = {}

    def _room(self, rows: int) -> None:
        """Caches with at least ``rows`` rows (``rows`` <= context)."""
        if rows > self._rows:
            new = max(FIRST_ROWS, self._rows)
            while new < rows:
                new *= 2
            self._grow(-(-min(new, self.context) // 64) * 64)  # whole 64-row blocks: aligned slots

    def _compact(self, end: int) -> None:
        """Move every occupied slot's rows so that they end at row ``end`` (>= the longest
        sequence) and set the clock there."""
        self._room(end)
        for b, req in enumerate(self._slots):
            if req is None or not req.tokens:  # empty, or admitted and not yet prefilled
                continue
            n = self._clock - req.start
            if req.start == end - n:
                continue
            for c in self._caches:
                c[b, :, end - n:end] = c[b, :, req.start:self._clock].copy()
            req.start = end - n
        self._clock = end
        self.stats["compactions"] += 1

    # -- steps ----------------------------------------------------------------------------------
    def _prefill(self, admitted: list[tuple[int, Request]]) -> None:
        """The prompts of newly admitted requests in one library call (left-padded to the longest,
        on scratch caches), their rows then copied into their slots just below the clock: one
        weight expansion for all of them instead of one each."""
        longest = max(len(r.prompt_ids) for _, r in admitted)
        if self._clock < longest:
            self._compact(longest)
        self._room(self._clock)
        t, k = self._clock, len(admitted)
        ids = np.zeros((k, longest), np.int64)
        mask = np.zeros((k, longest), np.int64)
        pos = np.zeros((k, longest), np.int64)
        for i, (_, req) in enumerate(admitted):
            n = len(req.prompt_ids)
            ids[i, longest - n:] = req.prompt_ids
            mask[i, longest - n:] = 1
            pos[i, longest - n:] = np.arange(n)
        import tvm

        scratch = [_aligned_zeros((k, self.kv_heads, longest, self.head_dim), self.model.kv_dtype)
                   for _ in range(2 * self.layers)]
        out = self.model.run_kv(ids, mask, pos, [tvm.runtime.from_dlpack(c) for c in scratch])
        logits = np.from_dlpack(out)[:, -1].copy()  # the last position's rows only
        for i, (b, req) in enumerate(admitted):
            n = len(req.prompt_ids)
            req.start = t - n
            for c, sc in zip(self._caches, scratch):
                c[b, :, t - n:t] = sc[i, :, longest - n:]
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += int(mask.sum())
        for (b, req), tok in zip(admitted, self._choose([r for _, r in admitted], logits)):
            self._take(b, req, tok)

    def _decode_step(self) -> None:
        occupied = [b for b, r in enumerate(self._slots) if r is not None]
        longest = max(self._clock - self._slots[b].start for b in occupied)
        if self._clock + 1 > self.context or self._clock - longest > max(FIRST_ROWS, longest):
            self._compact(longest)
        self._room(self._clock + 1)
        n = occupied[-1] + 1
        t = self._clock + 1
        ids = np.zeros((n, 1), np.int64)
        pos = np.zeros((n, 1), np.int64)
        mask = np.zeros((n, t), np.int64)
        mask[:, -1] = 1  # empty slots attend to the row they write: a finite softmax
        for b in occupied:
            req = self._slots[b]
            ids[b, 0] = req.tokens[-1]
            pos[b, 0] = self._clock - req.start
            mask[b, req.start:] = 1
        logits = np.from_dlpack(self.model.run_kv(ids, mask, pos, self._views(n)))[occupied, -1]
        self._clock = t
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += len(occupied)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(occupied))
        chosen = self._choose([self._slots[b] for b in occupied], logits)
        for b, tok in zip(occupied, chosen):
            self._take(b, self._slots[b], tok)

    @staticmethod
    def _choose(reqs: list[Request], logits: np.ndarray) -> list[int]:
        """The next token of each request from its row of ``logits`` [len(reqs), V] (a copy the
        engine owns: biased in place). Greedy requests take one argmax over their rows together;
        the others go through their sampler."""
        for i, req in enumerate(reqs):
            if req.logit_bias:
                logits[i, req.bias_ids] += req.bias_values
        greedy = [i for i, r in enumerate(reqs) if getattr(getattr(r.sampler, "config", None), "greedy", False)]
        sampled = set(range(len(reqs))) - set(greedy)
        out = [0] * len(reqs)
        if greedy:
            rows = logits[greedy]
            best = rows.argmax(axis=1)
            if not np.isfinite(rows[np.arange(len(greedy)), best]).all():  # argmax stops at a NaN
                raise FloatingPointError("the model produced logits with NaN or without any finite value")
            for i, tok in zip(greedy, best.tolist()):
                out[i] = tok
        for i, req in enumerate(reqs):
            if i in sampled:
                out[i] = req.sampler.sample(logits[i])
        return out

    def _take(self, b: int, req: Request, tok: int) -> None:
        """Record slot ``b``'s next token, emit what text became final, and free the slot when
        the request is done."""
        if req.cancelled:
            self._finish(b, "cancelled")
            return
        req.tokens.append(tok)
        eos = req.stop_at_eos and tok in self.eos
        done = eos or len(req.tokens) >= req.max_tokens
        # the whole text once at the end (what `shiftc generate` returns); on the way, the text of
        # the new tokens only
        text = self.tok.decode(req.tokens, skip_special_tokens=True) if done else self._detokenize(req)
        stop_at = _find_stop(text, req.stop, req.sent)
        if stop_at is not None:
            self._send(req, text[:stop_at])
            self._finish(b, "stop")
        elif done:
            self._send(req, text)
            self._finish(b, "stop" if eos else "length")
        else:
            self._send(req, text[:len(text) - _held_back(text, req.stop)])

    def _detokenize(self, req: Request) -> str:
        """The request's text so far, complete characters only, decoding a few tokens per step:
        the tokens from ``prefix_at`` decoded with and without the new ones, the difference
        appended once it is no longer an incomplete character (decoding from a few tokens back
        keeps tokenizers that drop a word's leading space at the start of a text right)."""
        prefix = self.tok.decode(req.tokens[req.prefix_at:req.read_at], skip_special_tokens=True)
        new = self.tok.decode(req.tokens[req.prefix_at:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            req.text += new[len(prefix):]
            req.prefix_at, req.read_at = req.read_at, len(req.tokens)
        return req.text

    def _send(self, req: Request, text: str) -> None:
        if len(text) > req.sent:
            req.emit({"type": "text", "text": text[req.sent:]})
            req.sent = len(text)

    def _finish(self, b: int, reason: str) -> None:
        req = self._slots[b]
        self._slots[b] = None
        self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        req.emit({"type": "done", "finish_reason": reason, "prompt_tokens": len(req.prompt_ids),
                  "completion_tokens": len(req.tokens)})
        if not any(self._slots):
            self._clock = 0  # nothing cached: the next sequence starts at row 0


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Index of the earliest stop string in ``text`` that ends after the ``sent`` characters
    already emitted (earlier ones were checked before), or None."""
    best = None
    for s in stops:
        i = text.find(s, max(0, sent - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold: the longest suffix that is a prefix of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def _aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + n].view(dtype).reshape(shape)
