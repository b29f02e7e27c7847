"""The OpenAI-compatible server, tested with the official `openai` client against a live uvicorn on
127.0.0.1 serving a real (tiny, briefly trained) pakar model.

The reference for every answer is pakar.generate.TextGenerator run in-process on the same checkpoint
(no HTTP, no batching with other clients): the server must return exactly its text, finish reason and
token counts, alone and with 16 clients streaming at once.

The test model is the tiny preset trained for a few dozen steps to memorise a handful of chat answers
(CHAT_PAIRS) and two sentences of plain text, so that greedy answers are known strings with wide
logit margins: equality under different batch compositions tests the server, not float rounding.
`tiny_chat_checkpoint` is shared with tests/test_web.py and tests/test_hf.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pakar import PakarError

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
HTML_ANSWER = "<b>tebal</b> <img src=x onerror=alert(1)>"
COUNTING = "satu dua tiga empat lima enam tujuh delapan sembilan sepuluh "
CHAT_PAIRS = [
    ("Halo", "Halo juga! Apa kabar hari ini?"),
    ("Siapa kamu?", "Saya pakar, model bahasa kecil dari Indonesia."),
    ("Apa ibu kota Indonesia?", "Jakarta adalah ibu kota Indonesia."),
    ("Tulis HTML", HTML_ANSWER),
]
COUNT_PROMPT = "Hitung terus"  # trained on a repeating answer with no end: it counts until max_tokens
TEXTS = ["Saya suka makan nasi goreng di Jakarta setiap pagi bersama keluarga.",
         "Bahasa Indonesia adalah bahasa resmi Republik Indonesia."]
MODEL_NAME = "tiny-chat"


def tiny_chat_checkpoint(base: Path) -> Path:
    """Train (once per session folder) and save the tiny chat model; returns the checkpoint path."""
    path = base / "tiny_chat.pt"
    if path.exists():
        return path
    from pakar.checkpoint import save_model
    from pakar.config import get_config
    from pakar.model import Transformer
    from pakar.tokenizer import encode_chat, train_tokenizer

    corpus = [q + "\n" + a for q, a in CHAT_PAIRS] * 20 + TEXTS * 20 + [COUNT_PROMPT + " " + COUNTING] * 20
    tok = train_tokenizer(corpus + ["system user assistant"] * 10, 400)
    cfg = get_config("tiny", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    seqs = []
    for q, a in CHAT_PAIRS:
        seqs.append(encode_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
    ids, mask = encode_chat(tok, [{"role": "user", "content": COUNT_PROMPT},
                                  {"role": "assistant", "content": COUNTING * 4}])
    end = len(ids) - 2  # leave out <|im_end|> and the newline: the answer never ends
    seqs.append((ids[:end], mask[:end]))
    for t in TEXTS:
        ids = [tok.eot_id, *tok.encode(t), tok.eot_id]
        seqs.append((ids, [True] * len(ids)))
    T = max(len(ids) for ids, _ in seqs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for r, (ids, mask) in enumerate(seqs):
        x[r, :len(ids)] = torch.tensor(ids)
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                y[r, t] = ids[t + 1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention on a busy machine
    try:
        for _ in range(70):
            out = model(x, y)
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    save_model(path, model.state_dict(), cfg, tok.to_json(), chat=True)
    return path


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """uvicorn serving create_app(...) in a background thread on an already bound loopback socket."""

    def __init__(self, checkpoint: Path | None, api_key: str | None = None, max_batch: int = 16,
                 max_queue: int = 256, device: str = "cpu", model_name: str = MODEL_NAME, textgen=None,
                 retriever=None, **limits):
        """Serves `checkpoint`, or an already loaded `textgen` (a TextGenerator), with an optional
        pakar.rag.Retriever."""
        import uvicorn

        from pakar.chat import load_generator
        from pakar.serve import Limits, create_app, uvicorn_config

        self.gen = textgen if textgen is not None else load_generator(str(checkpoint), device=device)[0]
        self.model_name = model_name
        self.limits = Limits(**limits)
        self.app = create_app(self.gen, model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                              limits=self.limits, retriever=retriever)
        self.sock = free_socket()
        host, port = self.sock.getsockname()
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, self.limits, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "none", **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_chat_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(checkpoint):
    s = LiveServer(checkpoint)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """In-process generation on the same checkpoint: the independent reference."""
    from pakar.generate import TextGenerator

    return TextGenerator.from_checkpoint(checkpoint)


def ref_complete(reference, prompt, **params):
    from pakar.generate import Request, SamplingParams

    stop = params.pop("stop", ())
    return reference.generate([Request(prompt, SamplingParams(**params), stop)])[0]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------------------------


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    h = server.health()
    assert h["status"] == "ok" and h["model"] == MODEL_NAME


def test_chat_completion_matches_in_process_generation(server, reference):
    for question, answer in CHAT_PAIRS:
        r = server.client().chat.completions.create(model=MODEL_NAME, messages=user(question), temperature=0,
                                                    max_tokens=64)
        ref = ref_complete(reference, user(question), temperature=0, max_new_tokens=64)
        assert ref.text == answer  # the model did memorise its answers
        c = r.choices[0]
        assert c.message.role == "assistant" and c.message.content == ref.text
        assert c.finish_reason == "stop" == ref.finish_reason
        assert r.usage.prompt_tokens == ref.prompt_tokens
        assert r.usage.completion_tokens == ref.completion_tokens  # the <|im_end|> counts
        assert r.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens
        assert r.model == MODEL_NAME and r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_streaming_chunks(server, reference):
    stream = server.client().chat.completions.create(
        model=MODEL_NAME, messages=user("Siapa kamu?"), temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # streamed in many pieces, not one
    ref = ref_complete(reference, user("Siapa kamu?"), temperature=0, max_new_tokens=512)
    assert "".join(pieces) == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.completion_tokens
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_plain_text(server, reference):
    prompt = "Saya suka makan"
    ref = ref_complete(reference, prompt, temperature=0, max_new_tokens=8)
    r = server.client().completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=8)
    assert r.choices[0].text == ref.text and ref.text.startswith(" nasi goreng")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == ref.prompt_tokens
    streamed = server.client().completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=8,
                                                  stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # the legacy endpoint's default is 16 tokens, and a list of prompts gives one choice each
    r = server.client().completions.create(model=MODEL_NAME, prompt=[prompt, "Bahasa"], temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == ref_complete(reference, prompt, temperature=0, max_new_tokens=16).text
    assert r.choices[1].text == ref_complete(reference, "Bahasa", temperature=0, max_new_tokens=16).text


def test_stop_strings_and_seeded_sampling(server, reference):
    client = server.client()
    r = client.chat.completions.create(model=MODEL_NAME, messages=user("Apa ibu kota Indonesia?"),
                                       temperature=0, stop=["ibu"])
    assert r.choices[0].message.content == "Jakarta adalah " and r.choices[0].finish_reason == "stop"
    # temperature 2 flattens the memorised distribution, so the seed really matters
    kw = dict(model=MODEL_NAME, messages=user("Halo"), temperature=2.0, top_p=0.95, max_tokens=24)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    ref = ref_complete(reference, user("Halo"), temperature=2.0, top_p=0.95, max_new_tokens=24, seed=7).text
    assert a == b == ref
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (8, 9, 10)}
    assert others - {a}, "different seeds should give some different answers at temperature 2"
    n3 = client.chat.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in n3.choices] == [0, 1, 2] and n3.choices[0].message.content == a


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, param, code", [
    ({"messages": [{"role": "user", "content": "Halo"}], "temperature": 3}, "temperature", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "top_p": 1.5}, "top_p", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "max_tokens": 0}, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "max_tokens": 10**6}, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "max_tokens": "many"}, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "n": 0}, "n", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "stream": "yes"}, "stream", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "stop": 5}, "stop", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "presence_penalty": 0.5}, "presence_penalty", None),
    ({"messages": [{"role": "user", "content": "Halo"}], "logprobs": True}, "logprobs", None),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", None),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", None),
    ({"messages": [{"role": "user", "content": "kata " * 600}]}, "messages", "context_length_exceeded"),
])
def test_bad_chat_requests_get_400_in_openai_shape(server, body, param, code):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL_NAME, **body})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code


def test_other_errors_use_openai_shape(server):
    url = server.url
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = httpx.post(url + "/v1/chat/completions", json=[1, 2])
    assert r.status_code == 400 and error_of(r)["message"]
    r = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": [1, 2, 3]})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "kata " * 600, "stream": True})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": user("Halo")})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["code"] == "unknown_url"
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    # the official client raises its typed error with the server's message
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=MODEL_NAME, messages=user("Halo"), temperature=-1)
    assert e.value.status_code == 400 and "temperature" in str(e.value)


def test_api_key(checkpoint):
    s = LiveServer(checkpoint, api_key="rahasia-123")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="salah").chat.completions.create(model=MODEL_NAME, messages=user("Halo"))
        assert e.value.status_code == 401
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": user("Halo")})  # no header at all
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer salah"})
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        ok = s.client(api_key="rahasia-123").chat.completions.create(model=MODEL_NAME, messages=user("Halo"),
                                                                      temperature=0)
        assert ok.choices[0].message.content == CHAT_PAIRS[0][1]
        assert httpx.get(s.url + "/health").status_code == 200  # health probes need no key
    finally:
        s.close()


def test_sixteen_concurrent_streaming_clients(server):
    """16 clients stream at once (greedy and seeded sampling, different prompts and lengths); each
    gets exactly what it gets when it is the only client, and the server did batch them."""
    kinds = []
    for i in range(16):
        question = (CHAT_PAIRS + [(COUNT_PROMPT, None)])[i % 5][0]
        params = dict(temperature=0) if i % 2 == 0 else dict(temperature=1.0, top_p=0.9, seed=100 + i)
        kinds.append((question, dict(max_tokens=20 + 3 * i, **params)))

    def run(question, params):
        stream = server.client().chat.completions.create(model=MODEL_NAME, messages=user(question), stream=True,
                                                         **params)
        text, reasons = "", []
        for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        return text, reasons

    alone = [run(q, p) for q, p in kinds]
    results: list = [None] * 16
    barrier = threading.Barrier(16)

    def client(i):
        barrier.wait()
        results[i] = run(*kinds[i])

    peak_before = server.health()["peak_batch"]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == alone
    assert all(len(r) == 1 for _, r in results)
    assert CHAT_PAIRS[0][1] in [t for t, _ in results]
    assert server.health()["peak_batch"] >= max(peak_before, 4)  # they were decoded together


def test_disconnect_cancels_generation(server):
    before = server.health()["finished"]["cancelled"]
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"model": MODEL_NAME, "messages": user(COUNT_PROMPT), "temperature": 0,
                            "max_tokens": 450, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or line == "" for line in seen)
    deadline = time.time() + 30
    while server.health()["finished"]["cancelled"] == before:
        assert time.time() < deadline, "the abandoned stream was never cancelled"
        time.sleep(0.05)
    assert server.health()["active"] == 0


def test_queue_waits_in_order_and_refuses_beyond_its_limit(checkpoint):
    """--max-batch 1 --max-queue 1: a second request waits for the first, a third gets 429."""
    s = LiveServer(checkpoint, max_batch=1, max_queue=1)
    # 20 ms per forward, as for a bigger model: the first answer then outlasts the queue checks below
    s.gen.engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    try:
        with httpx.stream("POST", s.url + "/v1/chat/completions",
                          json={"messages": user(COUNT_PROMPT), "temperature": 0, "max_tokens": 450,
                                "stream": True}) as first:
            lines = first.iter_lines()  # (kept: dropping the iterator would close the stream)
            next(lines)  # generating: it holds the only batch row
            waiting = {}
            t = threading.Thread(target=lambda: waiting.update(r=s.client().chat.completions.create(
                model=MODEL_NAME, messages=user("Halo"), temperature=0)))
            t.start()
            deadline = time.time() + 30
            while s.health()["queued"] != 1:
                assert time.time() < deadline, "the second request never queued"
                time.sleep(0.02)
            r = httpx.post(s.url + "/v1/chat/completions", json={"messages": user("Halo")})
            assert r.status_code == 429 and error_of(r)["code"] == "server_busy"
        t.join(timeout=60)  # closing the first stream cancelled it, and the waiting request ran
        assert waiting["r"].choices[0].message.content == CHAT_PAIRS[0][1]
        assert s.health()["finished"] == {"stop": 1, "length": 0, "cancelled": 1, "error": 0}
    finally:
        s.close()


def test_a_failing_model_answers_500_and_the_server_recovers(checkpoint):
    s = LiveServer(checkpoint)

    def broken(*_):
        raise RuntimeError("simulated device failure")

    try:
        hook = s.gen.engine.model.register_forward_pre_hook(broken)
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": user("Halo")})
        assert r.status_code == 500 and error_of(r)["type"] == "server_error"
        with httpx.stream("POST", s.url + "/v1/chat/completions",
                          json={"messages": user("Halo"), "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        assert '"server_error"' in events[-2] and events[-1] == "data: [DONE]"
        hook.remove()
        ok = s.client().chat.completions.create(model=MODEL_NAME, messages=user("Halo"), temperature=0)
        assert ok.choices[0].message.content == CHAT_PAIRS[0][1]
    finally:
        s.close()


def test_cli_serve_binds_loopback(checkpoint, tmp_path):
    """`pakar serve` as a user runs it: a subprocess on the default host, answering the client."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    (tmp_path / "key.txt").write_text("kunci-rahasia\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "pakar.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--device", "cpu", "--api-key-file", "key.txt"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "pakar serve did not come up"
            time.sleep(0.2)
        if Path("/proc/net/tcp").exists():  # Linux: the listening socket's address is loopback only
            listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                         if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
            assert listening == ["0100007F:%04X" % port]
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="kunci-rahasia", max_retries=0)
        r = c.chat.completions.create(model="tiny_chat", messages=user("Halo"), temperature=0)
        assert r.choices[0].message.content == CHAT_PAIRS[0][1]  # default model name: the file's stem
        with pytest.raises(openai.AuthenticationError):  # the key from --api-key-file is required
            openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key="x", max_retries=0).models.list()
        r = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": "attacker.example"})
        assert r.status_code == 400  # the default Host allow-list: loopback names only
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("argv, message", [
    (["serve"], "no checkpoints/model_epoch*.pt"),  # like chat and eval: the newest checkpoint here
    (["serve", "--checkpoint", "missing.pt"], "checkpoint not found"),
    (["serve", "--model", "no-such-folder"], "not a folder"),
])
def test_cli_serve_user_mistakes(argv, message, tmp_path, monkeypatch, capsys):
    from pakar.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# one client cannot hurt another (issue 17)


@pytest.fixture(scope="module")
def slow_server(checkpoint):
    """A server whose forwards take 10 ms, as a bigger model's would: a long answer then lasts
    seconds, so other requests certainly overlap it."""
    s = LiveServer(checkpoint)
    # every step through the model's forward (not the lean decode paths, which bypass it), so that the
    # hook slows every step whatever the machine's speed
    s.gen.engine.lean, s.gen.engine.row_decoder = False, None
    s.gen.engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    yield s
    s.close()


class Bystander:
    """A greedy streaming client counting to `max_tokens` in a thread: its text must be exactly the
    in-process reference, whatever other clients do meanwhile."""

    def __init__(self, server: LiveServer, max_tokens: int = 150):
        self.server, self.max_tokens = server, max_tokens
        self.text, self.reasons, self.error = "", [], None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(60), "the bystander stream did not start"

    def _run(self):
        try:
            stream = self.server.client().chat.completions.create(
                model=MODEL_NAME, messages=user(COUNT_PROMPT), temperature=0, max_tokens=self.max_tokens,
                stream=True)
            for chunk in stream:
                for c in chunk.choices:
                    self.text += c.delta.content or ""
                    if self.text:
                        self.started.set()
                    if c.finish_reason:
                        self.reasons.append(c.finish_reason)
        except Exception as e:  # noqa: BLE001 - reported by finish()
            self.error = e
        finally:
            self.started.set()

    def finish(self, reference) -> None:
        self.thread.join(timeout=120)
        assert self.error is None, f"the bystander's stream broke: {self.error!r}"
        ref = ref_complete(reference, user(COUNT_PROMPT), temperature=0, max_new_tokens=self.max_tokens)
        assert self.reasons == ["length"] and self.text == ref.text


def raw_post(server: LiveServer, body: bytes, path: str = "/v1/chat/completions", **headers) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json", **headers},
                      timeout=60)


def test_extreme_sampling_values_are_validated_and_spare_a_bystander(slow_server, reference):
    """temperature 1e-300 (0 in float32) is clamped to 0.01 and answers; repetition_penalty 1e-300 is
    a 400 naming it; a concurrent stream is untouched (both used to 500 and end it)."""
    before = slow_server.health()["finished"]
    b = Bystander(slow_server)
    r = slow_server.client().chat.completions.create(model=MODEL_NAME, messages=user("Halo"), temperature=1e-300,
                                                     max_tokens=32)
    assert r.choices[0].message.content == CHAT_PAIRS[0][1]  # 0.01 is as good as greedy on this model
    r = httpx.post(slow_server.url + "/v1/chat/completions",
                   json={"messages": user("Halo"), "repetition_penalty": 1e-300})
    assert r.status_code == 400 and error_of(r)["param"] == "repetition_penalty"
    assert "repetition_penalty" in error_of(r)["message"]
    b.finish(reference)
    assert slow_server.health()["finished"]["error"] == before["error"]


def test_a_failing_row_fails_only_its_own_request(slow_server, reference, monkeypatch):
    """A row whose sampling breaks (settings that bypassed validation: temperature 1e-300 reaches the
    engine) ends that request with a 500; the other rows of the same batch go on."""
    import dataclasses

    import pakar.serve as serve

    validated = serve.parse_request

    def poisoned(body, *args, **kw):
        parsed = validated(body, *args, **kw)
        if body.get("poison"):
            parsed.requests = [dataclasses.replace(r, params=dataclasses.replace(r.params, temperature=1e-300))
                               for r in parsed.requests]
        return parsed

    monkeypatch.setattr(serve, "parse_request", poisoned)
    before = slow_server.health()["finished"].get("error", 0)
    b = Bystander(slow_server)
    r = httpx.post(slow_server.url + "/v1/chat/completions", json={"messages": user("Halo"), "poison": True},
                   timeout=60)
    assert r.status_code == 500 and error_of(r)["type"] == "server_error"
    with httpx.stream("POST", slow_server.url + "/v1/chat/completions",
                      json={"messages": user("Halo"), "poison": True, "stream": True, "n": 2}, timeout=60) as r:
        events = [line for line in r.iter_lines() if line]
    assert '"server_error"' in events[-2] and events[-1] == "data: [DONE]"
    b.finish(reference)
    assert slow_server.health()["finished"]["error"] >= before + 2
    ok = slow_server.client().chat.completions.create(model=MODEL_NAME, messages=user("Halo"), temperature=0)
    assert ok.choices[0].message.content == CHAT_PAIRS[0][1]


HALO = '"messages":[{"role":"user","content":"Halo"}]'


@pytest.mark.parametrize("body, param", [
    ('{' + HALO + ',"max_tokens":' + "9" * 5000 + '}', "max_tokens"),
    ('{' + HALO + ',"temperature":' + "1" * 5000 + '}', "temperature"),
    ('{' + HALO + ',"seed":-' + "1" * 5000 + '}', "seed"),
    ('{' + HALO + ',"n":' + "2" * 5000 + '}', "n"),
    ('{' + HALO + ',"temperature":NaN}', None),
    ('{' + HALO + ',"top_p":Infinity}', None),
    ('{' + HALO + ',"x":' + "[" * 100_000 + "]" * 100_000 + '}', None),
    ('{' + HALO + ',"x":' + "[" * 40 + "]" * 40 + '}', None),
    ('{"messages":[{"role":"user","content":"\\ud800"}]}', "messages"),
    ('{"messages":[{"role":"user","content":[{"type":"text","text":"a\\udfff"}]}]}', "messages"),
    ('{' + HALO + ',"stop":["\\ud800"]}', "stop"),
    ('{' + HALO + ',"stop":["' + "x" * 1000 + '"]}', "stop"),
    ('{' + HALO + ',"model":["tiny-chat"]}', "model"),
    ('{' + HALO + ',"top_k":' + "7" * 40 + '}', "top_k"),
])
def test_hostile_json_gets_400_never_500(server, body, param):
    r = raw_post(server, body.encode())
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param
    r = raw_post(server, b'{"prompt":"\\ud800 x"}', "/v1/completions")
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"


def test_request_size_limit(checkpoint):
    s = LiveServer(checkpoint, max_request_bytes=64 * 1024)
    try:
        big = b'{"messages":[{"role":"user","content":"' + b"a" * 100_000 + b'"}]}'
        r = raw_post(s, big)
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 10_000
            yield b'{"messages":[]}'

        r = httpx.post(s.url + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        r = httpx.get(s.url + "/health", headers={"X-Big": "a" * 20_000})  # arrives at once, past h11's bound
        assert r.status_code == 431 and error_of(r)["code"] == "headers_too_large"
        ok = s.client().chat.completions.create(model=MODEL_NAME, messages=user("Halo"), temperature=0)
        assert ok.choices[0].message.content == CHAT_PAIRS[0][1]
    finally:
        s.close()


def test_huge_prompt_is_refused_without_tokenizing(server, monkeypatch):
    """4 MB of prompt cannot fit any window: refused with the lengths, and the tokenizer never runs."""
    calls = []
    encode = server.gen.tokenizer.encode
    monkeypatch.setattr(server.gen.tokenizer, "encode", lambda text: calls.append(len(text)) or encode(text))
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "kata " * 800_000}, timeout=120)
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    msg = error_of(r)["message"]
    assert "4000000 bytes" in msg and f"context window is {server.gen.context_window} tokens" in msg
    assert calls == []
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "kata " * 600}, timeout=120)  # tokenized
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded" and calls


def test_tokenization_runs_off_the_event_loop(server, monkeypatch):
    """While one request's prompt is being tokenized (3 s here), /health and other clients answer."""
    encode = server.gen.tokenizer.encode

    def slow(text):
        if "lambat" in text:
            time.sleep(3)
        return encode(text)

    monkeypatch.setattr(server.gen.tokenizer, "encode", slow)
    slow_answer = {}
    t = threading.Thread(target=lambda: slow_answer.update(r=httpx.post(
        server.url + "/v1/chat/completions", json={"messages": user("lambat"), "max_tokens": 2}, timeout=60)))
    t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    assert httpx.get(server.url + "/health", timeout=2.5).status_code == 200
    assert time.perf_counter() - t0 < 1.5
    ok = server.client().chat.completions.create(model=MODEL_NAME, messages=user("Halo"), temperature=0)
    assert ok.choices[0].message.content == CHAT_PAIRS[0][1]
    assert t.is_alive()  # the slow one was still tokenizing all along
    t.join(timeout=60)
    assert slow_answer["r"].status_code == 200


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (EOF or reset) within `seconds` (data before the end is read
    and ignored: the rest of an answer may still be on its way)."""
    deadline = time.time() + seconds
    while True:
        sock.settimeout(max(0.001, deadline - time.time()))
        try:
            if sock.recv(4096) == b"":
                return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def test_silent_and_slow_connections_are_closed_and_bounded(checkpoint):
    """Sockets that never send a byte, or send headers a byte at a time, are closed after
    --header-timeout; beyond --max-connections new sockets are closed at once; /health answers
    throughout (1,100 such sockets used to exhaust the file descriptors)."""
    s = LiveServer(checkpoint, header_timeout=3.0, max_connections=24)
    socks: list[socket.socket] = []
    try:
        silent = [socket.create_connection((s.host, s.port)) for _ in range(10)]
        socks += silent
        slow = socket.create_connection((s.host, s.port))
        socks.append(slow)
        t0 = time.time()
        assert httpx.get(s.url + "/health", timeout=2).status_code == 200
        for ch in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n":  # slowloris: never finishes its headers
            try:
                slow.send(bytes([ch]))
            except OSError:
                break
            time.sleep(0.05)
        assert all(closed_within(c, 8) for c in silent + [slow])
        assert time.time() - t0 < 12
        # a flood: the first ones fill the limit, the rest are closed on arrival
        flood = [socket.create_connection((s.host, s.port)) for _ in range(60)]
        socks += flood
        t0 = time.time()
        closed_at_once = sum(closed_within(c, 1.5) for c in flood[30:])
        assert closed_at_once == 30 and time.time() - t0 < 2.5  # well before the 3 s timeout
        assert all(closed_within(c, 8) for c in flood[:30])  # then the header timeout frees the rest
        assert httpx.get(s.url + "/health", timeout=2).status_code == 200
        # a keep-alive client that sends a request, then lingers without a second one, is closed too
        keep = socket.create_connection((s.host, s.port))
        socks.append(keep)
        keep.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n\r\n".encode())
        keep.settimeout(5)
        assert keep.recv(4096).startswith(b"HTTP/1.1 200")
        keep.send(b"GET /he")
        assert closed_within(keep, 8)
    finally:
        for c in socks:
            c.close()
        s.close()


def test_non_streaming_request_is_cancelled_when_the_client_leaves(slow_server):
    """A non-streaming client that gives up (timeout, closed tab) stops costing compute: its row is
    cancelled within a step or two, not generated to max_tokens."""
    before = slow_server.health()["finished"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/chat/completions",
                   json={"messages": user(COUNT_PROMPT), "temperature": 0, "max_tokens": 450}, timeout=1.0)
    deadline = time.time() + 3.4  # 450 tokens take at least 4.5 s on this server
    while slow_server.health()["finished"]["cancelled"] == before["cancelled"]:
        assert time.time() < deadline, "the abandoned request kept generating"
        time.sleep(0.05)
    h = slow_server.health()
    assert h["active"] == 0 and h["finished"]["length"] == before["length"]


def test_host_allow_list_and_cross_origin_writes(server, checkpoint):
    body = {"messages": user("Halo"), "temperature": 0, "max_tokens": 32}
    url = server.url + "/v1/chat/completions"
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", ""):
        r = httpx.post(url, json=body, headers={"Host": host})
        assert r.status_code == 400 and error_of(r)["code"] == "host_not_allowed", host
    assert httpx.get(server.url + "/", headers={"Host": "rebind.example"}).status_code == 400
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "LOCALHOST"):
        r = httpx.post(url, json=body, headers={"Host": host})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == CHAT_PAIRS[0][1]
    # no API key: other origins may not write, and form/text bodies (no CORS preflight) are refused
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": f"http://localhost:{server.port}"}):  # a different origin than the Host
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 403 and error_of(r)["code"] == "cross_origin_refused", headers
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = httpx.post(url, content=json.dumps(body).encode(), headers={"Content-Type": ctype})
        assert r.status_code == 403 and error_of(r)["code"] == "cross_origin_refused", ctype
    same = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}  # the page's own fetch (pakar/web/app.js)
    assert httpx.post(url, json=body, headers=same).status_code == 200
    assert httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200
    # configurable: extra names, or any
    s = LiveServer(checkpoint, api_key="k", allowed_hosts=("pakar.lan", "::1"))
    try:
        ok = {"Authorization": "Bearer k"}
        assert httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Host": "pakar.lan:80", **ok}
                          ).status_code == 200
        assert httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Host": "[::1]:9", **ok}
                          ).status_code == 200
        assert httpx.post(s.url + "/v1/chat/completions", json=body, headers=ok).status_code == 400  # 127.0.0.1
        # with a key, a cross-origin caller that holds it may write (the key is the guard)
        r = httpx.post(s.url + "/v1/chat/completions", json=body,
                       headers={"Host": "pakar.lan", "Origin": "http://app.example", **ok})
        assert r.status_code == 200
    finally:
        s.close()


def test_api_key_from_file_or_environment(tmp_path):
    from pakar.serve import read_api_key

    f = tmp_path / "key.txt"
    f.write_text("rahasia-dari-file\n", encoding="utf-8")
    assert read_api_key(None, str(f), env={}) == "rahasia-dari-file"
    assert read_api_key(None, None, env={"PAKAR_API_KEY": " rahasia-env "}) == "rahasia-env"
    assert read_api_key("cli", None, env={"PAKAR_API_KEY": "env"}) == "cli"  # the flag wins
    assert read_api_key(None, None, env={}) is None
    for args, env, message in [(("a", str(f)), {}, "not both"), ((None, str(tmp_path / "none")), {}, "cannot read"),
                               ((None, None), {"PAKAR_API_KEY": " "}, "empty"), (("",  None), {}, "empty")]:
        with pytest.raises(PakarError, match=message):
            read_api_key(*args, env=env)
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(PakarError, match="--api-key-file .*empty"):
        read_api_key(None, str(tmp_path / "empty.txt"), env={})
