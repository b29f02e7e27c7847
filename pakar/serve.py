"""`pakar serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and the web chat page.

Endpoints: POST /v1/chat/completions, POST /v1/completions (with `stream`), GET /v1/models,
GET /health, and the chat page at / (pakar/web/).

Design choices:
- One worker thread owns the model. HTTP handlers (on uvicorn's event loop) validate and tokenize a
  request, then hand it to the worker through a queue; the worker keeps one running
  pakar.generate.TextBatch and admits queued requests into it between decode steps (continuous
  batching, up to --max-batch rows), so sixteen clients share one forward per token instead of
  waiting in line. The model never runs on two threads, and every row has its own sampling state
  (pakar/engine.py), so one client's settings or seed never change another's output.
- Results travel back per request through an asyncio.Queue fed with loop.call_soon_threadsafe.
  A client that disconnects (a closed stream, the web page's stop button) cancels its rows at the
  next step, so abandoned requests stop costing compute.
- Validation happens before a request is queued, so every user mistake is answered with the OpenAI
  error shape {"error": {"message", "type", "param", "code"}} and a 4xx status, before any streaming
  starts: 400 for unreadable JSON, wrong types, out-of-range values, unsupported options that would
  change the result (penalties, logprobs, tools: refused rather than silently ignored) and prompts
  that do not fit the context window (code "context_length_exceeded"); 401 for a missing or wrong
  key when a key is set; 404 for an unknown model name or URL; 429 when the queue is full.
  500 is left for bugs. Unknown fields are ignored, as clients send many.
- One client cannot hurt another (zero 5xx for any input; benchmarks/fault_server.py counts them):
  * Safe ranges. temperature [0, 2], with (0, 0.01) raised to 0.01 (1e-300 is 0 in float32 and
    logits / temperature would overflow; 0.01 is greedy in all but ties); top_p [0, 1];
    repetition_penalty [0.01, 10]; n [1, 16] and n x prompts <= --max-batch; max_tokens <= the window;
    16 stop strings of <= 256 characters (each token scans the held-back tail against them).
    JSON is strict (no NaN/Infinity), at most MAX_JSON_DEPTH deep; integer literals longer than 32
    digits are never converted (Python refuses 4,300 digits with a ValueError) but refused by the
    field that holds them; text with a lone surrogate ("\\ud800") is a 400, as it cannot be encoded.
  * A row fails alone: the engine gives a row whose sampling distribution is not finite the finish
    reason "error" and goes on with the others; that request gets a 500 (a bug or a bypassed check),
    the rest of the batch is untouched. A failure of the whole forward still fails the whole batch.
  * Request bodies are read with a limit (--max-request-bytes, 413) and within --header-timeout (408);
    request line plus headers are bounded (16 KiB: h11 for slow ones, 431 for ones that arrive whole).
    JSON parsing and tokenization run in a 2-thread pool, never on the event loop, and a prompt whose
    UTF-8 length alone proves it cannot fit (more bytes than the window times the longest token's
    bytes) is refused with both lengths without tokenizing.
  * Connections (guarded_protocol, on uvicorn's h11 protocol): a connection must complete a request's
    headers within --header-timeout of opening or of its previous answer, else it is closed; idle
    keep-alive connections close after 5 s; connections beyond --max-connections are closed on
    arrival (and the open-file limit is raised to fit them), so silent sockets and slowloris clients
    can neither pile up nor exhaust file descriptors.
  * A client that leaves is cancelled: streams through Starlette's disconnect listener, non-streaming
    requests through a task that waits for the ASGI disconnect message (not by polling between
    results, which a busy generation never leaves time for).
  * Host allow-list (DNS rebinding: a page on an attacker's name resolving to 127.0.0.1 sends that
    name as Host): loopback names and the --host address by default, --allowed-hosts for more, "*"
    for any; others get 400. Without an API key, any POST with a foreign Origin (or a cross-site
    Sec-Fetch-Site) and any form/text body (which a page elsewhere can send without a CORS preflight)
    gets 403; the chat page's own fetches (same origin, JSON) pass. With a key, the key is the guard.
- max_tokens larger than the context window is refused; a prompt plus max_tokens that overflows the
  window is not: the answer stops at the window with finish_reason "length" (pakar/engine.py's
  policy), which lets chat UIs with a fixed max_tokens keep working as a conversation grows.
- Defaults follow OpenAI: temperature 1, top_p 1, max_tokens 16 on /v1/completions and "the rest of
  the window" on chat; `model` may be omitted. Extensions (vLLM's names): top_k, repetition_penalty.
  Waiting requests are admitted first come, first served; /health reports active and queued rows,
  finished rows by reason and the largest batch so far.
- Security: binds to 127.0.0.1 unless --host says otherwise; the key comes from --api-key-file,
  $PAKAR_API_KEY or --api-key (the command line is visible to other users), and is compared as
  SHA-256 digests in constant time (not even its length leaks);
  the page is served with a Content-Security-Policy that allows only its own script and style, on top
  of the page rendering model output as text only. FastAPI's /docs pages are off (they load
  JavaScript from a CDN).
- Retrieval (--index DIR, pakar/rag.py): on /v1/chat/completions the last user message is searched
  and replaced by the RAG template with numbered sources (room for min(max_tokens, a quarter of the
  window) tokens of answer is kept). The passages used come back in an extra top-level field
  "sources": [{"n", "source", "doc", "word", "score", "text"}] of the response (the first chunk when
  streaming); OpenAI clients ignore unknown fields (the Python client exposes it as
  `completion.model_extra["sources"]`). /v1/completions (raw text) is not augmented.
- Streaming is plain Server-Sent Events written by hand (`data: {...}` lines, then `data: [DONE]`):
  no extra dependency.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from pakar import PakarError
from pakar.generate import ContextLengthError, SamplingParams, TextBatch
from pakar.generate import Request as GenerationRequest  # fastapi's Request is the HTTP one
from pakar.args import (API_KEY_ENV, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_BATCH, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUE,
                        DEFAULT_MAX_REQUEST_BYTES)
from pakar.rag import sources_payload

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string: each token scans the held-back tail against every stop string
MAX_N = 16
MIN_TEMPERATURE = 0.01  # (0, 0.01) is raised to 0.01: below it float32 logits / temperature overflow
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0
MAX_JSON_DEPTH = 32  # a chat request nests 5 deep; deeper bodies are hostile, not clients
MAX_INT_DIGITS = 32  # longer integer literals are refused by the field that holds them, never parsed
KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's default)
MAX_HEADER_BYTES = 16 * 1024  # h11's bound on a request line plus headers; more is answered 400
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WEB_DIR = Path(__file__).with_name("web")
WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
             "/app.js": ("app.js", "text/javascript; charset=utf-8"),
             "/style.css": ("style.css", "text/css; charset=utf-8"),
             "/favicon.svg": ("favicon.svg", "image/svg+xml"),
             "/favicon.ico": ("favicon.svg", "image/svg+xml")}  # what browsers ask for without a <link>
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class APIError(Exception):
    """An error answered to the client in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------
# request validation


class _BigInt:
    """An integer literal longer than MAX_INT_DIGITS digits: kept as its length, refused by the field
    that holds it (parsing it would be slow, and Python refuses 4,300 digits with a ValueError)."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(literal: str):
    return int(literal) if len(literal) <= MAX_INT_DIGITS else _BigInt(literal)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes):
    """The request body as a JSON value; APIError 400 for anything that is not strict, shallow JSON."""
    try:
        body = json.loads(raw, parse_int=_parse_int, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    stack = [(body, 1)]
    while stack:  # iterative: the depth check itself must not recurse
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return body


def _text(s: str, where: str, param: str) -> str:
    """`s` if it is encodable text: a lone surrogate ("\\ud800" in JSON) cannot be tokenized."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{where} is not valid Unicode: a lone surrogate at character {e.start}", param) from None
    return s


def _get_int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, _BigInt):
        raise APIError(400, f"'{name}' is out of range: {v!r}", name)
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise APIError(400, f"'{name}' must be an integer, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise APIError(400, f"'{name}' must be {rng}, got {v}", name)
    return v


def _get_float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, _BigInt):
        raise APIError(400, f"'{name}' is out of range: {v!r}", name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise APIError(400, f"'{name}' must be a number, got {v!r}", name)
    if v < lo or v > hi:
        raise APIError(400, f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return float(v)


def _get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be true or false, got {v!r}", name)
    return v


def _refuse_unsupported(body: dict) -> None:
    """Options that would change the answer and that pakar does not implement: refused, not ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise APIError(400, f"'{name}' is not supported by this server (use 'repetition_penalty' > 1 "
                                f"instead)", name)
    checks = {
        "logit_bias": lambda v: not v, "logprobs": lambda v: v in (None, False, 0),
        "top_logprobs": lambda v: v in (None, 0), "tools": lambda v: not v, "functions": lambda v: not v,
        "tool_choice": lambda v: v in (None, "none", "auto"), "echo": lambda v: v in (None, False),
        "suffix": lambda v: not v, "best_of": lambda v: v in (None, 1),
        "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    }
    for name, ok in checks.items():
        if name in body and not ok(body[name]):
            raise APIError(400, f"'{name}' is not supported by this server", name)


def _stop_strings(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    for s in stops:
        _text(s, "a stop string", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise APIError(400, f"a stop string may be at most {MAX_STOP_CHARS} characters, got {len(s)}", "stop")
    return tuple(s for s in stops if s)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {m.get('role')!r} is not supported; use system, user "
                                f"or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts can be used
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": role, "content": _text(content, f"messages[{i}].content", "messages")})
    return out


def _prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    prompts = [p] if isinstance(p, str) else p
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) for x in prompts):
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings (token-id prompts are "
                            "not supported)", "prompt")
    return [_text(x, f"prompt[{i}]", "prompt") for i, x in enumerate(prompts)]


@dataclass
class Parsed:
    """A validated request: one pakar.generate.Request per choice."""

    kind: str  # "chat" or "completion"
    model: str
    requests: list  # pakar.generate.Request, in choice order
    prompt_tokens: int  # usage: tokens of the distinct prompts
    stream: bool
    include_usage: bool
    sources: list | None = None  # --index: the numbered passages in the prompt (the "sources" field)


def parse_request(body, kind: str, textgen, model_name: str, max_batch: int) -> Parsed:
    """Validate an OpenAI request body against the served model; raise APIError naming the culprit."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {type(model).__name__}", "model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    _refuse_unsupported(body)
    W = textgen.context_window
    if kind == "chat":
        prompts: list = [_messages(body)]
        max_tokens = _get_int(body, "max_completion_tokens", None, 1)
        max_tokens = _get_int(body, "max_tokens", max_tokens, 1)
        max_tokens = W if max_tokens is None else max_tokens
        param = "messages"
    else:
        prompts = _prompts(body)
        max_tokens = _get_int(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, 1)
        param = "prompt"
    if max_tokens > W:
        raise APIError(400, f"'max_tokens' is {max_tokens}, but the model's context window is {W} tokens "
                            f"(prompt and answer together)", "max_tokens")
    n = _get_int(body, "n", 1, 1, MAX_N)
    if n * len(prompts) > max_batch:
        raise APIError(400, f"this request asks for {n * len(prompts)} completions (n x prompts); this server "
                            f"runs at most {max_batch} at once (--max-batch)", "n")
    temperature = _get_float(body, "temperature", 1.0, 0.0, 2.0)
    if 0.0 < temperature < MIN_TEMPERATURE:  # documented clamp: as good as greedy, and finite
        temperature = MIN_TEMPERATURE
    top_p = _get_float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # the nucleus shrinks to the single most likely token: greedy
        temperature, top_p = 0.0, 1.0
    top_k = _get_int(body, "top_k", 0, -1)  # vLLM's extension; -1 or 0 = off
    repetition_penalty = _get_float(body, "repetition_penalty", 1.0, MIN_REPETITION_PENALTY,
                                    MAX_REPETITION_PENALTY)
    seed = _get_int(body, "seed", None, -(2**63), 2**63 - 1)
    stream = _get_bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    include_usage = bool(stream and opts and _get_bool(opts, "include_usage", False))
    stop = _stop_strings(body)

    requests, prompt_tokens = [], 0
    for prompt in prompts:
        _refuse_surely_too_long(prompt, textgen, param)
        for i in range(n):
            params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    top_k=max(top_k, 0), repetition_penalty=repetition_penalty,
                                    seed=None if seed is None else (seed + i) % 2**63)
            requests.append(GenerationRequest(prompt, params, stop))
        try:
            prompt_tokens += textgen.check(requests[-1])
        except ContextLengthError as e:
            raise APIError(400, str(e), param, "context_length_exceeded") from None
        except PakarError as e:
            raise APIError(400, str(e), param) from None
    return Parsed(kind, model_name, requests, prompt_tokens, stream, include_usage)


def _max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes of any vocabulary entry: no token stands for more input bytes than that
    (a byte-level entry spells each byte with one, sometimes two-byte, character)."""
    cached = getattr(tokenizer, "_pakar_max_token_bytes", None)
    if cached is None:
        cached = max(len(t.encode("utf-8")) for t in tokenizer.hf.get_vocab())
        tokenizer._pakar_max_token_bytes = cached
    return cached


def _refuse_surely_too_long(prompt, textgen, param: str) -> None:
    """A context_length_exceeded answer without tokenizing, for prompts that cannot fit whatever
    their tokens: megabytes of text would otherwise cost seconds of tokenizer time for nothing."""
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    per_token = _max_token_bytes(textgen.tokenizer)
    W = textgen.context_window
    if nbytes // per_token >= W:
        raise APIError(400, f"the prompt is {nbytes} bytes, so at least {nbytes // per_token} tokens (no token "
                            f"covers more than {per_token} bytes), but the model's context window is {W} tokens",
                       param, "context_length_exceeded")


# ----------------------------------------------------------------------------------------------
# the worker: one thread, one running batch


@dataclass
class Job:
    requests: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled = True


_STOP = object()


class Worker:
    """Owns the TextGenerator. Admits queued jobs into one running TextBatch between decode steps;
    sends ("delta", choice, text, finish_reason, completion|None) and ("error", APIError) to jobs."""

    def __init__(self, textgen, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE):
        self.textgen, self.max_batch, self.max_queue = textgen, max_batch, max_queue
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.owner: dict[int, tuple[Job, int]] = {}  # batch index -> (job, choice)
        self.running: dict[int, Job] = {}  # id(job) -> job, jobs with rows in the batch
        self.queued_rows = 0  # rows submitted but not yet admitted
        self.lock = threading.Lock()  # guards queued_rows (handlers add, the worker subtracts)
        # for /health: finished completions by reason, and the most rows ever decoded together
        self.stats = {"stop": 0, "length": 0, "cancelled": 0, "error": 0, "peak_batch": 0}
        self.thread = threading.Thread(target=self._run, name="pakar-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(_STOP)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.queued_rows + len(job.requests) > self.max_queue:
                raise APIError(429, f"the server is busy: {self.queued_rows} completions are waiting "
                                    f"(--max-queue {self.max_queue}); retry shortly", None, "server_busy",
                               "server_overloaded")
            self.queued_rows += len(job.requests)
        self.inbox.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self.inbox.put(None)  # wake the worker if it is idle

    def _run(self) -> None:
        batch = TextBatch(self.textgen)
        while True:
            idle = batch.active == 0 and not self.waiting
            try:
                item = self.inbox.get(block=idle)
                while True:
                    if item is _STOP:
                        for job in list(self.running.values()) + list(self.waiting):
                            job.send(("error", APIError(503, "the server is shutting down", None, None,
                                                        "server_error")))
                        return
                    if isinstance(item, Job):
                        self.waiting.append(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            try:
                self._admit(batch)
                for job in self.running.values():
                    if job.cancelled:
                        for index, (owner, _) in list(self.owner.items()):
                            if owner is job:
                                batch.cancel(index)
                if batch.active:
                    self._deliver(batch, batch.step())
            except Exception as e:  # a bug: fail the running requests, start over with a fresh batch
                traceback.print_exc(file=sys.stderr)
                err = _internal(e)
                for job in self.running.values():
                    job.send(("error", err))
                self.running.clear()
                self.owner.clear()
                batch = TextBatch(self.textgen)

    def _admit(self, batch) -> None:
        """Move waiting jobs into the batch, first come first served, while rows are free."""
        admitted = []
        while self.waiting and batch.active + sum(len(j.requests) for j in admitted) + \
                len(self.waiting[0].requests) <= self.max_batch:
            job = self.waiting.popleft()
            with self.lock:
                self.queued_rows -= len(job.requests)
            if not job.cancelled:
                admitted.append(job)
        if not admitted:
            return
        try:
            try:
                indices = batch.add([r for job in admitted for r in job.requests])
                groups = [(job, indices[k:k + len(job.requests)]) for k, job in
                          zip(_offsets(admitted), admitted)]
            except PakarError:  # validated already, so rare: add one by one to fail only the culprit
                groups = []
                for job in admitted:
                    try:
                        groups.append((job, batch.add(job.requests)))
                    except PakarError as e:
                        job.send(("error", APIError(400, str(e))))
        except Exception as e:  # a bug: these jobs are in no table yet, so answer them here
            for job in admitted:
                job.send(("error", _internal(e)))
            raise
        for job, idx in groups:
            self.running[id(job)] = job
            for choice, index in enumerate(idx):
                self.owner[index] = (job, choice)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], batch.active)

    def _deliver(self, batch, deltas) -> None:
        for d in deltas:
            job, choice = self.owner[d.index]
            completion = None
            if d.finish_reason is not None:
                completion = batch.completions.pop(d.index)
                self.stats[d.finish_reason] = self.stats.get(d.finish_reason, 0) + 1
                del self.owner[d.index]
                if not any(owner is job for owner, _ in self.owner.values()):
                    self.running.pop(id(job), None)
            if d.finish_reason == "error":  # this row alone failed (pakar/engine.py): fail its request
                job.cancelled = True  # its other choices stop at the next step
                job.send(("error", APIError(500, f"generating choice {choice} failed (its sampling distribution "
                                                 f"was not finite); other requests are unaffected", None, None,
                                            "server_error")))
            elif d.text or d.finish_reason is not None:
                job.send(("delta", choice, d.text, d.finish_reason, completion))


def _internal(e: Exception) -> APIError:
    return APIError(500, f"internal error while generating: {type(e).__name__}: {e}", None, None, "server_error")


def _offsets(jobs: list[Job]) -> list[int]:
    out, k = [], 0
    for job in jobs:
        out.append(k)
        k += len(job.requests)
    return out


# ----------------------------------------------------------------------------------------------
# the app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completions: list) -> dict:
    completion_tokens = sum(c.completion_tokens for c in completions if c is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _ErrorJSON(JSONResponse):
    """Errors are rendered ASCII-only: a message quoting client text can never fail to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error_response(exc: APIError) -> JSONResponse:
    return _ErrorJSON(exc.body(), status_code=exc.status)


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server (flags of `pakar serve`; see the module docstring)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # "*" allows any Host header


def _host_name(host: str) -> str:
    """The name part of a Host header or --allowed-hosts entry, lower case, port dropped; IPv6 keeps
    its brackets ("[::1]:8000" -> "[::1]", "::1" -> "[::1]")."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    if host.count(":") > 1:  # a bare IPv6 address (from --allowed-hosts)
        return f"[{host}]"
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


_SIMPLE_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


class _Guard:
    """ASGI middleware run before any route: the Host allow-list (DNS rebinding: a page on an
    attacker's name that resolves to 127.0.0.1 sends its own name as Host), and, when no API key
    guards the server, no cross-origin writes (a page elsewhere may POST to localhost without reading
    the answer, and form/text bodies need no CORS preflight)."""

    def __init__(self, app, allowed_hosts: tuple[str, ...], open_server: bool):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed = {_host_name(h) for h in allowed_hosts if h != "*"}
        self.open_server = open_server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.refuse(scope)
            if err is not None:
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refuse(self, scope) -> APIError | None:
        size = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) for k, v in scope["headers"])
        if size > MAX_HEADER_BYTES:  # h11 bounds only headers that arrive slowly; these came at once
            return APIError(431, f"the request line and headers are {size} bytes; this server accepts at most "
                                 f"{MAX_HEADER_BYTES}", None, "headers_too_large")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self.any_host and _host_name(host) not in self.allowed:
            return APIError(400, f"Host {host!r} is not allowed (this server answers "
                                 f"{', '.join(sorted(self.allowed))}; add names with --allowed-hosts)",
                            None, "host_not_allowed")
        if not self.open_server or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return None
        origin = headers.get("origin")
        own = f"{scope.get('scheme', 'http')}://{host}"
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if origin is not None and origin != own:
            return APIError(403, f"cross-origin request from {origin!r} refused: without --api-key only this "
                                 f"server's own page ({own}) may send requests", None, "cross_origin_refused")
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return APIError(403, "cross-site request refused (Sec-Fetch-Site); without --api-key only this "
                                 "server's own page may send requests", None, "cross_origin_refused")
        if ctype in _SIMPLE_TYPES:
            return APIError(403, f"Content-Type {ctype!r} refused (a web form could send it from any site): send "
                                 f"'Content-Type: application/json'", None, "cross_origin_refused")
        return None


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, at most limits.max_request_bytes (413 beyond), within limits.header_timeout
    seconds (408 for a client that sends it too slowly)."""
    cap = limits.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise APIError(413, f"the request body is {declared} bytes; this server accepts at most {cap} "
                            f"(--max-request-bytes)", None, "request_too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise APIError(413, f"the request body is over {cap} bytes, the most this server accepts "
                                    f"(--max-request-bytes)", None, "request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout=limits.header_timeout)
    except ClientDisconnect:  # nobody will read this answer; it only keeps the log free of tracebacks
        raise APIError(400, "the client left before sending the whole body") from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.header_timeout:g} s", None,
                       "request_timeout") from None


def create_app(textgen, model_name: str, api_key: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
               max_queue: int = DEFAULT_MAX_QUEUE, limits: Limits = Limits(), retriever=None):
    """The FastAPI app serving `textgen` (a pakar.generate.TextGenerator) as `model_name`. Serve it with
    uvicorn_config(app, limits) so that the connection limits apply too. With a pakar.rag.Retriever,
    chat requests are answered from retrieved sources."""
    worker = Worker(textgen, max_batch, max_queue)
    # JSON parsing and tokenization run here, off the event loop: a huge prompt must not stall other
    # clients or /health. Two threads: more would only compete with the worker for the GIL.
    parser = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pakar-serve-parse")
    key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            parser.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pakar", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(_Guard, allowed_hosts=limits.allowed_hosts, open_server=api_key is None)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        msg = (f"unknown request URL: {request.method} {request.url.path}" if exc.status_code == 404
               else f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405
               else str(exc.detail))
        return _ErrorJSON(APIError(exc.status_code, msg, None, code).body(), status_code=exc.status_code,
                          headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _error_response(APIError(400, f"invalid request: {exc.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        traceback.print_exception(exc, file=sys.stderr)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", None, None, "server_error"))

    def check_key(request: Request) -> None:
        if key_digest is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")
        # digests of equal length: the comparison's time says nothing about the key, not even its length
        if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), key_digest):
            raise APIError(401, "incorrect API key provided", None, "invalid_api_key")

    def web_file(path: str):
        name, ctype = WEB_FILES[path]
        data = (WEB_DIR / name).read_bytes()
        return Response(data, media_type=ctype, headers={
            "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"})

    for path in WEB_FILES:
        app.add_api_route(path, lambda path=path: web_file(path), methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": len(worker.owner), "queued": worker.queued_rows,
                "finished": {k: v for k, v in worker.stats.items() if k != "peak_batch"},
                "peak_batch": worker.stats["peak_batch"]}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        # "chat": whether the model was chat fine-tuned (its checkpoint's meta); the web page says when not
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pakar", "max_model_len": textgen.context_window,
                                            "chat": textgen.chat}]}

    def parse(raw: bytes, kind: str) -> Parsed:
        body = parse_json(raw)
        hits = _augment(body, textgen, retriever) if retriever is not None and kind == "chat" else None
        parsed = parse_request(body, kind, textgen, model_name, max_batch)
        if hits is not None:
            parsed.sources = sources_payload(hits)
        return parsed

    async def complete(request: Request, kind: str):
        check_key(request)
        raw = await read_body(request, limits)
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(parser, parse, raw, kind)
        job = Job(parsed.requests, loop)
        worker.submit(job)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if parsed.stream:
            return StreamingResponse(_stream(job, parsed, rid, worker), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(job, parsed, rid, request, worker)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    return app


async def _watch_disconnect(request: Request, job: Job, worker: Worker) -> None:
    """Once the body is read, the next ASGI message is the client leaving: cancel the job then."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    worker.cancel(job)
    job.events.put_nowait(("gone",))


def _augment(body, textgen, retriever) -> list | None:
    """Replace the last user message of a chat body by the RAG template; the hits used, or None when
    the body is not a valid chat request (parse_request then names the problem)."""
    try:
        msgs = _messages(body)
        max_tokens = _get_int(body, "max_tokens", _get_int(body, "max_completion_tokens", None, 1), 1)
    except APIError:
        return None
    if msgs[-1]["role"] != "user":
        return None
    W = textgen.context_window
    reserve = min(max_tokens or W, W // 4)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    try:
        prompt, hits = retriever.prompt(textgen, msgs[-1]["content"], msgs[1 if system else 0:-1], reserve, system)
    except ContextLengthError as e:
        raise APIError(400, str(e), "messages", "context_length_exceeded") from None
    body["messages"] = prompt if textgen.chat else msgs[:-1] + [{"role": "user", "content": prompt}]
    return hits


async def _collect(job: Job, parsed: Parsed, rid: str, request, worker: Worker):
    """Wait for every choice of a non-streaming request; cancel it as soon as the client goes away."""
    n = len(parsed.requests)
    texts, done = [""] * n, [None] * n
    watcher = asyncio.create_task(_watch_disconnect(request, job, worker))
    try:
        while any(c is None for c in done):
            ev = await job.events.get()
            if ev[0] == "gone":
                return Response(status_code=499)  # nobody is listening
            if ev[0] == "error":
                raise ev[1]
            _, choice, text, reason, completion = ev
            texts[choice] += text
            if reason is not None:
                done[choice] = completion
    except asyncio.CancelledError:
        worker.cancel(job)
        raise
    finally:
        watcher.cancel()
    created = int(time.time())
    if parsed.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": done[i].finish_reason} for i in range(n)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": done[i].finish_reason}
                   for i in range(n)]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": parsed.model, "system_fingerprint": None,
            "choices": choices, "usage": _usage(parsed.prompt_tokens, done),
            **({"sources": parsed.sources} if parsed.sources is not None else {})}


async def _stream(job: Job, parsed: Parsed, rid: str, worker: Worker):
    """Server-sent events in OpenAI's chunk format; cancels the job if the client disconnects."""
    created = int(time.time())
    chat = parsed.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    n = len(parsed.requests)
    extra = {"usage": None} if parsed.include_usage else {}

    def chunk(choice: int, text: str | None, reason: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            c = {"index": choice, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            c = {"index": choice, "text": text or "", "logprobs": None, "finish_reason": reason}
        sources = {"sources": parsed.sources} if first and choice == 0 and parsed.sources is not None else {}
        return _sse({"id": rid, "object": obj, "created": created, "model": parsed.model,
                     "system_fingerprint": None, "choices": [c], **extra, **sources})

    finished = [None] * n
    try:
        if chat:
            for i in range(n):
                yield chunk(i, None, None, first=True)
        while any(c is None for c in finished):
            ev = await job.events.get()
            if ev[0] == "error":
                yield _sse(ev[1].body())
                break
            _, choice, text, reason, completion = ev
            if text:
                yield chunk(choice, text, None)
            if reason is not None:
                finished[choice] = completion
                yield chunk(choice, None, reason)
        else:
            if parsed.include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": parsed.model,
                            "system_fingerprint": None, "choices": [],
                            "usage": _usage(parsed.prompt_tokens, finished)})
        yield "data: [DONE]\n\n"
    finally:
        if any(c is None for c in finished):
            worker.cancel(job)  # the client went away (or an error ended the stream)


# ----------------------------------------------------------------------------------------------
# connections: header timeout and a bound on open sockets


def guarded_protocol(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol, plus two guards uvicorn lacks: a connection must send a complete
    request line and headers within `header_timeout` seconds of opening (or of its previous answer),
    else it is closed, so sockets that never send a byte, or send one a minute, cannot pile up; and
    connections beyond `max_connections` are closed as soon as they are accepted, so a flood of
    sockets cannot use up the process's file descriptors. (uvicorn's limit_concurrency does not
    bound sockets: it answers 503 to requests, and only once a request arrives.)"""
    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request's headers get the same time (before: pipelined ones disarm)
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            answering = self.cycle is not None and not self.cycle.response_complete
            if not answering and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def fd_room(max_connections: int) -> int:
    """Raise the soft open-file limit (POSIX) so that max_connections sockets fit beside the model's
    files; returns the connections that fit."""
    try:
        import resource  # lazy: POSIX only (Windows has no resource module)
    except ImportError:  # Windows: the proactor loop has no select() limit; nothing to raise
        return max_connections
    spare = 64  # the checkpoint, the listening socket, logs, torch's own files
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < max_connections + spare:
        want = max_connections + spare if hard == resource.RLIM_INFINITY else min(hard, max_connections + spare)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
        return max(1, min(max_connections, soft - spare))
    return max_connections


def uvicorn_config(app, limits: Limits = Limits(), **kw):
    """uvicorn.Config for `app` with pakar's connection guards (used by pakar.commands.serve and the tests)."""
    return uvicorn.Config(app, http=guarded_protocol(limits.header_timeout, limits.max_connections),
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          **kw)


# ----------------------------------------------------------------------------------------------
# command line



def read_api_key(api_key: str | None, api_key_file: str | None, env=os.environ) -> str | None:
    """The key from --api-key, else --api-key-file (its first line), else $PAKAR_API_KEY; None = no key.
    The file and the variable keep the key out of the process list and the shell history."""
    if api_key is not None and api_key_file is not None:
        raise PakarError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PakarError(f"--api-key-file {api_key_file}: cannot read it ({e})") from None
        api_key = lines[0] if lines else ""
        if not api_key.strip():
            raise PakarError(f"--api-key-file {api_key_file}: the first line is empty")
        return api_key.strip()
    if api_key is None:
        api_key = env.get(API_KEY_ENV)
        if api_key is not None and not api_key.strip():
            raise PakarError(f"${API_KEY_ENV} is set but empty")
    elif not api_key.strip():
        raise PakarError("--api-key is empty")
    return None if api_key is None else api_key.strip()


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """Loopback names, plus the --host address when it names one interface (not 0.0.0.0 or ::)."""
    extra = () if host in ("0.0.0.0", "::", "") else (host,)
    return tuple(dict.fromkeys(LOOPBACK_NAMES + extra))


