"""The server half of issue 17's fault matrix: hostile and malformed clients against a real
`pakar serve`, while a bystander streams. Target: zero 5xx answers, zero server tracebacks, and every
bystander stream complete and exact.

What it does: trains the test suite's tiny chat model (tests/test_serve.py, a few seconds), starts
`python -m pakar.cli serve` on it on 127.0.0.1 as a user would (a subprocess; --header-timeout 2 and
--max-connections 64 so the connection cases finish quickly), and runs a background bystander that
streams the model's endless counting answer (greedy, 300 tokens) over and over, comparing each
stream with in-process generation. Meanwhile it sends each case in CASES: wrong types, missing and
out-of-range fields (the issue's temperature / repetition_penalty 1e-300, a 5000-digit max_tokens,
huge n, negative max_tokens, NaN), invalid and deeply nested JSON, lone surrogates, unknown models
and URLs, wrong methods, oversized headers and bodies, foreign Host and Origin headers, prompts far
beyond the context window, clients that leave mid-answer, and raw sockets (garbage bytes, bad
Content-Length, slowloris, silent sockets, a flood past --max-connections).

Counts: each case's status (a raw-socket case that the server closes without an answer counts as
"closed"), the 5xx among them, "Traceback" lines in the server's output, bystander streams that
completed exactly, that broke mid-stream (a failure), and that could not connect while a flood held
every connection slot (expected while the flood lasts: reported, not a failure). The last line is
one JSON object; main() returns 0 when there are no 5xx, no tracebacks and no broken streams.

    python benchmarks/fault_server.py            # about a minute on a busy 2-core machine
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BYSTANDER_TOKENS = 300
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 64


def _halo(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "Halo"}], "max_tokens": 8, **extra}


def _raw_halo(extra: str) -> bytes:
    return ('{"messages":[{"role":"user","content":"Halo"}],"max_tokens":8,' + extra + "}").encode()


# (name, path, body): dict bodies are sent as JSON, bytes as they are (Content-Type application/json)
JSON_CASES: list[tuple[str, str, object]] = [
    ("invalid json", "/v1/chat/completions", b"{not json"),
    ("empty body", "/v1/chat/completions", b""),
    ("json array", "/v1/chat/completions", [1, 2]),
    ("json string", "/v1/chat/completions", "hello"),
    ("json null", "/v1/chat/completions", None),
    ("missing messages", "/v1/chat/completions", {"max_tokens": 4}),
    ("messages not a list", "/v1/chat/completions", {"messages": "Halo"}),
    ("message not an object", "/v1/chat/completions", {"messages": [5]}),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}),
    ("content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("content an image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("temperature 1e-300", "/v1/chat/completions", _halo(temperature=1e-300)),
    ("temperature 1e-300 streamed", "/v1/chat/completions", _halo(temperature=1e-300, stream=True)),
    ("temperature -1", "/v1/chat/completions", _halo(temperature=-1)),
    ("temperature a string", "/v1/chat/completions", _halo(temperature="hot")),
    ("temperature 1e308", "/v1/chat/completions", _halo(temperature=1e308)),
    ("temperature NaN", "/v1/chat/completions", _raw_halo('"temperature":NaN')),
    ("temperature Infinity", "/v1/chat/completions", _raw_halo('"temperature":Infinity')),
    ("temperature 5000 digits", "/v1/chat/completions", _raw_halo('"temperature":' + "9" * 5000)),
    ("top_p 1e-300", "/v1/chat/completions", _halo(top_p=1e-300)),
    ("top_p 2", "/v1/chat/completions", _halo(top_p=2)),
    ("top_k -5", "/v1/chat/completions", _halo(top_k=-5)),
    ("top_k 10**40", "/v1/chat/completions", _halo(top_k=10**40)),
    ("top_k 1.5", "/v1/chat/completions", _halo(top_k=1.5)),
    ("repetition_penalty 1e-300", "/v1/chat/completions", _halo(repetition_penalty=1e-300)),
    ("repetition_penalty 1e-300 streamed", "/v1/chat/completions", _halo(repetition_penalty=1e-300, stream=True)),
    ("repetition_penalty 0", "/v1/chat/completions", _halo(repetition_penalty=0)),
    ("repetition_penalty 1e300", "/v1/chat/completions", _halo(repetition_penalty=1e300)),
    ("presence_penalty 2", "/v1/chat/completions", _halo(presence_penalty=2)),
    ("frequency_penalty a string", "/v1/chat/completions", _halo(frequency_penalty="x")),
    ("max_tokens -1", "/v1/chat/completions", _halo(max_tokens=-1)),
    ("max_tokens 0", "/v1/chat/completions", _halo(max_tokens=0)),
    ("max_tokens 5000 digits", "/v1/chat/completions", _raw_halo('"max_tokens":' + "9" * 5000).replace(
        b'"max_tokens":8,', b"")),
    ("max_tokens 1e308", "/v1/chat/completions", _halo(max_tokens=1e308)),
    ("max_tokens true", "/v1/chat/completions", _halo(max_tokens=True)),
    ("n 0", "/v1/chat/completions", _halo(n=0)),
    ("n 10**6", "/v1/chat/completions", _halo(n=10**6)),
    ("n 2.5", "/v1/chat/completions", _halo(n=2.5)),
    ("n 5000 digits", "/v1/chat/completions", _raw_halo('"n":' + "7" * 5000)),
    ("seed 2**64", "/v1/chat/completions", _halo(seed=2**64)),
    ("seed a string", "/v1/chat/completions", _halo(seed="x")),
    ("stop a number", "/v1/chat/completions", _halo(stop=5)),
    ("stop 1000 strings", "/v1/chat/completions", _halo(stop=["x"] * 1000)),
    ("stop 100 kB string", "/v1/chat/completions", _halo(stop=["x" * 100_000])),
    ("stop lone surrogate", "/v1/chat/completions", _raw_halo('"stop":["\\ud800"]')),
    ("stream a string", "/v1/chat/completions", _halo(stream="yes")),
    ("stream_options a string", "/v1/chat/completions", _halo(stream=True, stream_options="x")),
    ("logprobs", "/v1/chat/completions", _halo(logprobs=True)),
    ("tools", "/v1/chat/completions", _halo(tools=[{"type": "function"}])),
    ("response_format json_schema", "/v1/chat/completions", _halo(response_format={"type": "json_schema"})),
    ("lone surrogate content", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\\ud800"}]}'),
    ("nested 100000 deep", "/v1/chat/completions", b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("nested 40 deep", "/v1/chat/completions", _raw_halo('"x":' + "[" * 40 + "]" * 40)),
    ("unknown model", "/v1/chat/completions", _halo(model="gpt-4o")),
    ("model a list", "/v1/chat/completions", _halo(model=["x"])),
    ("prompt beyond the window", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "kata " * 2000}]}),
    ("4 MB prompt", "/v1/completions", {"prompt": "kata " * 800_000}),
    ("completions token ids", "/v1/completions", {"prompt": [1, 2, 3]}),
    ("completions empty list", "/v1/completions", {"prompt": []}),
    ("completions 1000 prompts", "/v1/completions", {"prompt": ["a"] * 1000}),
    ("completions lone surrogate", "/v1/completions", b'{"prompt":"\\udfff"}'),
    ("completions suffix", "/v1/completions", {"prompt": "a", "suffix": "b"}),
]


def _count_case(results: Counter, fives: list, name: str, status) -> None:
    results[status] += 1
    if isinstance(status, int) and status >= 500:
        fives.append((name, status))


def http_cases(url: str, port: int) -> list[tuple[str, object]]:
    """(name, status) for every request-level case."""
    import httpx

    out = []
    with httpx.Client(timeout=60) as c:
        for name, path, body in JSON_CASES:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = c.post(url + path, content=content, headers={"Content-Type": "application/json"})
            out.append((name, r.status_code))
        for name, method, path in [("GET chat", "GET", "/v1/chat/completions"), ("PUT chat", "PUT", "/v1/chat/completions"),
                                   ("DELETE health", "DELETE", "/health"), ("PATCH models", "PATCH", "/v1/models"),
                                   ("POST health", "POST", "/health"), ("unknown url", "GET", "/v1/nothing"),
                                   ("dot-dot path", "GET", "/../../etc/passwd"), ("percent path", "GET", "/%ff%00"),
                                   ("OPTIONS chat", "OPTIONS", "/v1/chat/completions")]:
            out.append((name, c.request(method, url + path).status_code))
        good = json.dumps(_halo()).encode()
        headers_cases = [
            ("foreign Host", {"Host": "rebind.example"}),
            ("foreign Origin", {"Origin": "http://evil.example"}),
            ("null Origin", {"Origin": "null"}),
            ("cross-site fetch", {"Sec-Fetch-Site": "cross-site"}),
            ("text/plain body", {"Content-Type": "text/plain"}),
            ("form body", {"Content-Type": "application/x-www-form-urlencoded"}),
            ("wrong bearer", {"Authorization": "Bearer nope"}),  # no key is set: ignored, answered
            ("100 kB header", {"X-Big": "a" * 100_000}),
        ]
        for name, h in headers_cases:
            try:
                r = c.post(url + "/v1/chat/completions", content=good,
                           headers={"Content-Type": "application/json", **h})
                out.append((name, r.status_code))
            except httpx.TransportError:
                out.append((name, "closed"))
        try:
            r = c.post(url + "/v1/chat/completions", content=b"x" * (9 * 2**20),
                       headers={"Content-Type": "application/json"})
            out.append(("9 MB body", r.status_code))
        except httpx.TransportError:
            out.append(("9 MB body", "closed"))

        def chunked():
            for _ in range(1000):
                yield b" " * 10_000

        try:
            r = c.post(url + "/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
            out.append(("10 MB chunked body", r.status_code))
        except httpx.TransportError:
            out.append(("10 MB chunked body", "closed"))
    # clients that leave: a stream closed after a few events, a non-streaming request that times out
    with httpx.stream("POST", url + "/v1/chat/completions", json={**_halo(max_tokens=200), "stream": True,
                      "messages": [{"role": "user", "content": "Hitung terus"}]}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        out.append(("stream abandoned", r.status_code))
    try:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hitung terus"}],
                                                            "max_tokens": 400}, timeout=0.05)
        out.append(("non-stream abandoned", r.status_code))
    except httpx.TimeoutException:
        out.append(("non-stream abandoned", "left"))
    return out


def _raw(port: int, payload: bytes, wait: float = 3.0):
    """Send raw bytes; the status code of the answer, or "closed" if the server closed without one."""
    s = socket.create_connection(("127.0.0.1", port))
    try:
        try:
            s.sendall(payload)
        except OSError:
            return "closed"
        s.settimeout(wait)
        try:
            data = s.recv(64)
        except ConnectionResetError:
            return "closed"
        except socket.timeout:
            return "no answer"
        if data.startswith(b"HTTP/1."):
            return int(data.split()[1])
        return "closed"
    finally:
        s.close()


def socket_cases(port: int) -> list[tuple[str, object]]:
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    cases = [
        ("garbage bytes", b"\x00\xff\x13\x37" * 64),
        ("HTTP/9.9", b"GET /health HTTP/9.9\r\n" + host + b"\r\n"),
        ("100 kB request line", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n" + host + b"\r\n"),
        ("invalid header name", b"GET /health HTTP/1.1\r\n" + host + b"Bad Header: x\r\n\r\n"),
        ("no Host header", b"GET /health HTTP/1.1\r\n\r\n"),
        ("negative Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\n" + host + b"Content-Length: -1\r\n\r\n"),
        ("two Content-Lengths", b"POST /v1/chat/completions HTTP/1.1\r\n" + host +
         b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n{}"),
        ("bad chunk size", b"POST /v1/chat/completions HTTP/1.1\r\n" + host +
         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
        ("body shorter than Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\n" + host +
         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}"),
    ]
    out = [(name, _raw(port, payload, wait=HEADER_TIMEOUT * 3)) for name, payload in cases]
    # slowloris and silent sockets: closed after --header-timeout; a flood past --max-connections
    socks = []
    try:
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        socks += slow + silent
        for i in range(int(HEADER_TIMEOUT * 3 / 0.2)):
            for s in slow:
                try:
                    s.send(b"GET /health HTTP/1.1\r\nX-a: b\r\n"[i % 20:i % 20 + 1])
                except OSError:
                    pass
            time.sleep(0.2)
        closed = 0
        for s in slow + silent:
            s.settimeout(HEADER_TIMEOUT * 2)
            try:
                closed += s.recv(64) == b""
            except ConnectionResetError:
                closed += 1
            except socket.timeout:
                pass
        out.append(("slowloris and silent sockets", "closed" if closed == len(slow + silent) else f"{closed} closed"))
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS * 3)]
        socks += flood
        time.sleep(HEADER_TIMEOUT * 2)
        alive = 0
        for s in flood:
            s.settimeout(0.01)
            try:
                alive += s.recv(64) != b""
            except socket.timeout:
                alive += 1
            except ConnectionResetError:
                pass
        out.append((f"flood of {len(flood)} sockets", "closed" if alive == 0 else f"{alive} still open"))
    finally:
        for s in socks:
            s.close()
    return out


class Bystander:
    """Streams the counting answer again and again; each stream must equal in-process generation."""

    def __init__(self, url: str, reference: str):
        self.url, self.reference = url, reference
        self.ok = self.broken = self.refused = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import httpx

        body = {"messages": [{"role": "user", "content": "Hitung terus"}], "temperature": 0,
                "max_tokens": BYSTANDER_TOKENS, "stream": True}
        while not self.stop.is_set():
            text, reason, started = "", None, False
            try:
                with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as r:
                    started = True
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            obj = json.loads(line[6:])
                            if "error" in obj:
                                raise RuntimeError(obj["error"]["message"])
                            c = obj["choices"][0]
                            text += c["delta"].get("content") or ""
                            reason = c["finish_reason"] or reason
                if reason == "length" and text == self.reference:
                    self.ok += 1
                else:
                    self.broken += 1
                    self.errors.append(f"finish {reason!r}, text differs: {text[:60]!r}")
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                if started:
                    self.broken += 1
                    self.errors.append(repr(e))
                else:  # no connection slot free (a flood holds them): retry shortly
                    self.refused += 1
                    time.sleep(0.2)
            except Exception as e:  # noqa: BLE001 - every other failure is a broken stream
                self.broken += 1
                self.errors.append(repr(e))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _traceback_ends(log: str) -> list[str]:
    """The exception line ending each traceback in the server's output (first five)."""
    ends, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("Traceback")):
                j += 1
            ends.append(lines[j] if j < len(lines) else lines[-1])
    return ends[:5]


def run_matrix() -> dict:
    """Run the whole matrix; returns the counts (see the module docstring)."""
    import httpx
    import torch

    from test_serve import COUNT_PROMPT, tiny_chat_checkpoint

    from pakar.generate import Request, SamplingParams, TextGenerator

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_chat_checkpoint(Path(tmp))
        reference = TextGenerator.from_checkpoint(ckpt).generate(
            [Request([{"role": "user", "content": COUNT_PROMPT}],
                     SamplingParams(max_new_tokens=BYSTANDER_TOKENS, temperature=0))])[0].text
        port = _free_port()
        log = Path(tmp) / "server.log"
        with open(log, "w") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "pakar.cli", "serve", "--checkpoint", str(ckpt),
                                     "--port", str(port), "--device", "cpu", "--header-timeout", str(HEADER_TIMEOUT),
                                     "--max-connections", str(MAX_CONNECTIONS)],
                                    cwd=tmp, stdout=logf, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.time() + 120
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError("the server exited:\n" + log.read_text())
                    try:
                        if httpx.get(url + "/health", timeout=1).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.time() > deadline:
                        raise RuntimeError("the server did not come up:\n" + log.read_text())
                    time.sleep(0.2)
                bystander = Bystander(url, reference)
                bystander.thread.start()
                t0 = time.perf_counter()
                cases = http_cases(url, port) + socket_cases(port)
                time.sleep(HEADER_TIMEOUT * 2)  # let the flood's sockets time out
                health = httpx.get(url + "/health", timeout=10).json()
                bystander.stop.set()
                bystander.thread.join(timeout=120)
                seconds = time.perf_counter() - t0
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        server_log = log.read_text(errors="replace")
    statuses, fives = Counter(), []
    for name, status in cases:
        _count_case(statuses, fives, name, status)
    return {"cases": len(cases), "status_counts": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "count_5xx": len(fives), "cases_5xx": fives, "server_tracebacks": server_log.count("Traceback"),
            "server_traceback_excerpts": _traceback_ends(server_log),
            "bystander_streams_ok": bystander.ok, "bystander_streams_broken": bystander.broken,
            "bystander_connects_refused_during_flood": bystander.refused, "bystander_errors": bystander.errors[:5],
            "finished_after": health["finished"], "seconds": round(seconds, 1),
            "per_case": {name: status for name, status in cases}}


def main(argv: list[str] | None = None) -> int:
    out = run_matrix()
    for name, status in out["per_case"].items():
        print(f"{status!s:>10}  {name}")
    print(f"cases {out['cases']}: {out['status_counts']}; 5xx: {out['count_5xx']}; server tracebacks: "
          f"{out['server_tracebacks']}; bystander streams ok {out['bystander_streams_ok']}, broken "
          f"{out['bystander_streams_broken']}, refused during the flood {out['bystander_connects_refused_during_flood']}")
    summary = {k: v for k, v in out.items() if k != "per_case"}
    print(json.dumps(summary))
    ok = out["count_5xx"] == 0 and out["server_tracebacks"] == 0 and out["bystander_streams_broken"] == 0
    return 0 if ok and out["bystander_streams_ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
