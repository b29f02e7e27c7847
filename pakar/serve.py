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
  key when --api-key is set; 404 for an unknown model name or URL; 429 when the queue is full.
  500 is left for bugs. Unknown fields are ignored, as clients send many.
- max_tokens larger than the context window is refused; a prompt plus max_tokens that overflows the
  window is not: the answer stops at the window with finish_reason "length" (pakar/engine.py's
  policy), which lets chat UIs with a fixed max_tokens keep working as a conversation grows.
- Defaults follow OpenAI: temperature 1, top_p 1, max_tokens 16 on /v1/completions and "the rest of
  the window" on chat; `model` may be omitted. Extensions (vLLM's names): top_k, repetition_penalty.
  Waiting requests are admitted first come, first served; /health reports active and queued rows,
  finished rows by reason and the largest batch so far.
- Security: binds to 127.0.0.1 unless --host says otherwise; keys are compared in constant time;
  the page is served with a Content-Security-Policy that allows only its own script and style, on top
  of the page rendering model output as text only. FastAPI's /docs pages are off (they load
  JavaScript from a CDN).
- Streaming is plain Server-Sent Events written by hand (`data: {...}` lines, then `data: [DONE]`):
  no extra dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pakar import PakarError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 256
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_STOP_STRINGS = 16
MAX_N = 16
WEB_DIR = Path(__file__).with_name("web")
WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
             "/app.js": ("app.js", "text/javascript; charset=utf-8"),
             "/style.css": ("style.css", "text/css; charset=utf-8")}
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


def _get_int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise APIError(400, f"'{name}' must be an integer, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise APIError(400, f"'{name}' must be {rng}, got {v}", name)
    return v


def _get_float(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise APIError(400, f"'{name}' must be a number, got {v!r}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise APIError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
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
        out.append({"role": role, "content": content})
    return out


def _prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    prompts = [p] if isinstance(p, str) else p
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) for x in prompts):
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings (token-id prompts are "
                            "not supported)", "prompt")
    return prompts


@dataclass
class Parsed:
    """A validated request: one pakar.generate.Request per choice."""

    kind: str  # "chat" or "completion"
    model: str
    requests: list  # pakar.generate.Request, in choice order
    prompt_tokens: int  # usage: tokens of the distinct prompts
    stream: bool
    include_usage: bool


def parse_request(body, kind: str, gen, model_name: str, max_batch: int) -> Parsed:
    """Validate an OpenAI request body against the served model; raise APIError naming the culprit."""
    from pakar.generate import ContextLengthError, Request, SamplingParams

    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    _refuse_unsupported(body)
    W = gen.context_window
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
    top_p = _get_float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # the nucleus shrinks to the single most likely token: greedy
        temperature, top_p = 0.0, 1.0
    top_k = _get_int(body, "top_k", 0, -1)  # vLLM's extension; -1 or 0 = off
    repetition_penalty = _get_float(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
    seed = _get_int(body, "seed", None, -(2**63), 2**63 - 1)
    stream = _get_bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    include_usage = bool(stream and opts and _get_bool(opts, "include_usage", False))
    stop = _stop_strings(body)

    requests, prompt_tokens = [], 0
    for prompt in prompts:
        for i in range(n):
            params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    top_k=max(top_k, 0), repetition_penalty=repetition_penalty,
                                    seed=None if seed is None else (seed + i) % 2**63)
            requests.append(Request(prompt, params, stop))
        try:
            prompt_tokens += gen.check(requests[-1])
        except ContextLengthError as e:
            raise APIError(400, str(e), param, "context_length_exceeded") from None
        except PakarError as e:
            raise APIError(400, str(e), param) from None
    return Parsed(kind, model_name, requests, prompt_tokens, stream, include_usage)


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

    def __init__(self, gen, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE):
        self.gen, self.max_batch, self.max_queue = gen, max_batch, max_queue
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.owner: dict[int, tuple[Job, int]] = {}  # batch index -> (job, choice)
        self.running: dict[int, Job] = {}  # id(job) -> job, jobs with rows in the batch
        self.queued_rows = 0  # rows submitted but not yet admitted
        self.lock = threading.Lock()  # guards queued_rows (handlers add, the worker subtracts)
        # for /health: finished completions by reason, and the most rows ever decoded together
        self.stats = {"stop": 0, "length": 0, "cancelled": 0, "peak_batch": 0}
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
        from pakar.generate import TextBatch

        batch = TextBatch(self.gen)
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
                batch = TextBatch(self.gen)

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
            if d.text or d.finish_reason is not None:
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


def create_app(gen, model_name: str, api_key: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
               max_queue: int = DEFAULT_MAX_QUEUE):
    """The FastAPI app serving `gen` (a pakar.generate.TextGenerator) as `model_name`."""
    worker = Worker(gen, max_batch, max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="pakar", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        msg = (f"unknown request URL: {request.method} {request.url.path}" if exc.status_code == 404
               else f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405
               else str(exc.detail))
        return JSONResponse(APIError(exc.status_code, msg, None, code).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(APIError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", None, None,
                                     "server_error").body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", None, "invalid_api_key")

    async def read_json(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

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
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pakar", "max_model_len": gen.context_window}]}

    async def complete(request: Request, kind: str):
        check_key(request)
        parsed = parse_request(await read_json(request), kind, gen, model_name, max_batch)
        job = Job(parsed.requests, asyncio.get_running_loop())
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


async def _collect(job: Job, parsed: Parsed, rid: str, request, worker: Worker):
    """Wait for every choice of a non-streaming request; cancel it if the client goes away."""
    n = len(parsed.requests)
    texts, done = [""] * n, [None] * n
    try:
        while any(c is None for c in done):
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    worker.cancel(job)
                    return JSONResponse({}, status_code=499)
                continue
            if ev[0] == "error":
                raise ev[1]
            _, choice, text, reason, completion = ev
            texts[choice] += text
            if reason is not None:
                done[choice] = completion
    except asyncio.CancelledError:
        worker.cancel(job)
        raise
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
            "choices": choices, "usage": _usage(parsed.prompt_tokens, done)}


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
        return _sse({"id": rid, "object": obj, "created": created, "model": parsed.model,
                     "system_fingerprint": None, "choices": [c], **extra})

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
# command line


def load_generator(checkpoint: str | None = None, model_dir: str | None = None, device: str = "auto",
                   dtype: str = "auto", quantize: str | None = None):
    """(TextGenerator, default model name) from a pakar checkpoint or a Hugging Face Qwen3-MoE folder."""
    from pakar.chat import pick_dtype
    from pakar.checkpoint import safe_load
    from pakar.generate import TextGenerator
    from pakar.train import resolve_device

    if (checkpoint is None) == (model_dir is None):
        raise PakarError("give exactly one of --checkpoint PATH or --model DIR")
    device = resolve_device(device)
    if checkpoint is not None:
        ckpt, name = safe_load(checkpoint), Path(checkpoint).stem
    else:
        from pakar.hf import import_folder

        ckpt, name = import_folder(model_dir), Path(model_dir).resolve().name
    return TextGenerator.from_ckpt(ckpt, device, pick_dtype(dtype, device), quantize=quantize), name


def main(argv: list[str], prog: str = "pakar serve") -> int:
    from pakar.chat import add_quantize_arg

    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible HTTP server (/v1/chat/completions, "
                                "/v1/completions, /v1/models, /health) with a web chat page at /.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="pakar model checkpoint (.pt), e.g. checkpoints/model_epoch5.pt")
    src.add_argument("--model", dest="model_dir", help="Hugging Face Qwen3-MoE folder (e.g. from pakar export)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 opens it "
                        f"to the network: set --api-key then)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    p.add_argument("--model-name", default=None,
                   help="model id reported by /v1/models and expected in requests (default: the checkpoint's "
                        "file name or the folder's name)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: auto, cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and cache dtype (default: auto, bfloat16 on a GPU that supports it, else float32)")
    add_quantize_arg(p)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"completions generated together; more wait in a queue (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"waiting completions before new requests get 429 (default: {DEFAULT_MAX_QUEUE})")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise PakarError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 1:
        raise PakarError("--max-batch and --max-queue must be at least 1")
    if args.api_key is not None and not args.api_key.strip():
        raise PakarError("--api-key is empty")

    import uvicorn

    gen, name = load_generator(args.checkpoint, args.model_dir, args.device, args.dtype, args.quantize)
    name = args.model_name or name
    app = create_app(gen, name, args.api_key, args.max_batch, args.max_queue)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"WARNING: listening on {args.host} without --api-key: anyone who can reach this machine can "
              f"use the model", file=sys.stderr)
    print(f"serving {name!r} ({'chat' if gen.chat else 'text'} model, context {gen.context_window} tokens) on "
          f"http://{args.host}:{args.port}/  (OpenAI base URL: http://{args.host}:{args.port}/v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
