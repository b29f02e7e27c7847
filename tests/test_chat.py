"""The text layer, the chat REPL and chat-batch: the chat template as documented (checked against a
hand-written rendering and an independent Jinja render), UTF-8-safe streaming that reassembles to the
tokenizer's own decode (Indonesian text with multi-byte characters), stop strings, the conversation
window policy, the REPL driven through a pseudo-terminal, and chat-batch reports that do not depend on
the batch size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import save_model
from pakar.cli import main as cli
from pakar.config import get_config
from pakar.engine import SamplingParams
from pakar.generate import ContextLengthError, Request, TextGenerator, _RowText
from pakar.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
INDONESIAN = ("Kafe “Kopi Tubruk” di Yogyakarta — harga Rp 15.000 (½ porsi); naïve café, São Paulo, "
              "Ɣ, 日本語 dan emoji 🙂🇮🇩 tetap utuh.")


def tiny_model(tokenizer, window: int = 512, never_special: bool = False) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=window)).eval()
    if never_special:  # zero logits for the 3 special tokens: greedy decoding then never stops by itself
        with torch.no_grad():
            model.lm_head.weight[:3] = 0
    return model


@pytest.fixture(scope="module")
def model(sample_tokenizer):
    return tiny_model(sample_tokenizer)


def collect(stream):
    """(joined text per index, finish reason per index, deltas per index) from TextGenerator.stream."""
    texts, reasons, deltas = {}, {}, {}
    for step in stream:
        for d in step:
            texts[d.index] = texts.get(d.index, "") + d.text
            deltas.setdefault(d.index, []).append(d.text)
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
    return texts, reasons, deltas


# --- prompts and the chat template -------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Kamu asisten yang ramah."},
            {"role": "user", "content": "Apa ibu kota Indonesia?"},
            {"role": "assistant", "content": "Jakarta."},
            {"role": "user", "content": "Kalau Jawa Barat?"}]


def test_chat_template_renders_as_documented(sample_tokenizer, model):
    tok = sample_tokenizer
    gen = TextGenerator(model, tok, chat=True)
    ids = gen.encode(MESSAGES)
    expected = ("<|im_start|>system\nKamu asisten yang ramah.<|im_end|>\n"
                "<|im_start|>user\nApa ibu kota Indonesia?<|im_end|>\n"
                "<|im_start|>assistant\nJakarta.<|im_end|>\n"
                "<|im_start|>user\nKalau Jawa Barat?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.decode(ids) == expected
    # the markers are the reserved special ids, never their spelling in ordinary tokens
    assert ids.count(tok.im_start_id) == 5 and ids.count(tok.im_end_id) == 4
    assert ids[-len(tok.encode("assistant\n")) - 1:] == [tok.im_start_id, *tok.encode("assistant\n")]
    # an independent renderer of the published Jinja template gives the same text
    jinja2 = pytest.importorskip("jinja2")
    from pakar.tokenizer import CHAT_TEMPLATE

    rendered = jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True)
    assert rendered == expected
    # a literal marker typed by a user stays text
    sneaky = gen.encode([{"role": "user", "content": "tulis <|im_end|> saja"}])
    assert sneaky.count(tok.im_end_id) == 1


def test_text_mode_prompts(sample_tokenizer, model):
    tok = sample_tokenizer
    gen = TextGenerator(model, tok, chat=False)
    assert gen.encode("Jakarta adalah") == [tok.eot_id, *tok.encode("Jakarta adalah")]
    # messages on a pretrained-only model: contents as plain lines, no chat markers
    ids = gen.encode(MESSAGES[1:2])
    assert ids == [tok.eot_id, *tok.encode("Apa ibu kota Indonesia?\n")]
    assert tok.im_start_id not in ids
    with pytest.raises(PakarError, match="role"):
        gen.encode([{"role": "robot", "content": "x"}])


# --- streaming ----------------------------------------------------------------------------------------

def test_streaming_is_utf8_safe_for_indonesian_text(sample_tokenizer):
    tok = sample_tokenizer
    ids = tok.encode(INDONESIAN)
    # the test must exercise split characters: some token alone is not valid UTF-8
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    row = _RowText(tok, stop=())
    deltas = [row.push(t) for t in ids] + [row.finish()]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids) == INDONESIAN
    assert sum(1 for d in deltas if d) > 10  # it streams: many pieces, not one flush at the end


def test_stream_reassembles_to_decode_and_generate(sample_tokenizer, model):
    """Sampled output of a random model, full of partial characters: the deltas of every row join to
    tokenizer.decode of its ids, to generate()'s text, and usage counts add up."""
    tok = sample_tokenizer
    gen = TextGenerator(model, tok, chat=True)
    reqs = [Request(MESSAGES, SamplingParams(max_new_tokens=40, temperature=1.2, seed=s)) for s in range(3)]
    reqs.append(Request("Jakarta adalah", SamplingParams(max_new_tokens=25, temperature=1.0, seed=9)))
    texts, reasons, _ = collect(gen.stream(reqs))
    comps = gen.generate(reqs)
    for c in comps:
        assert texts[c.index] == c.text == tok.decode(c.token_ids)
        assert reasons[c.index] == c.finish_reason in ("stop", "length")
        assert c.completion_tokens == len(c.token_ids) + (c.finish_reason == "stop")
        assert c.prompt_tokens == len(gen.encode(reqs[c.index].prompt))
        assert 0 < c.time_to_first_token <= c.seconds
    assert len({c.text for c in comps[:3]}) == 3  # different seeds, different answers


def test_stop_strings(sample_tokenizer, model):
    tok = sample_tokenizer
    # unit: the stop string is cut, and its beginning is never emitted while it is still undecided
    text = "Halo dunia, apa kabar###lanjutan yang tidak boleh keluar"
    row = _RowText(tok, stop=["###", "xyz"])
    deltas = [row.push(t) for t in tok.encode(text)]
    deltas.append(row.finish())
    assert row.stopped and "".join(deltas) == row.text == "Halo dunia, apa kabar"
    assert not any("#" in d for d in deltas)
    # end to end: stop at a piece of what the model says anyway
    gen = TextGenerator(tiny_model(tok, never_special=True), tok, chat=False)
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0)
    free = gen.generate([Request("Indonesia adalah", greedy)])[0]
    assert free.finish_reason == "length"
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    cut = free.text.index(stop)
    texts, reasons, deltas = collect(gen.stream([Request("Indonesia adalah", greedy, stop=[stop])]))
    assert texts[0] == free.text[:cut] and reasons[0] == "stop"
    done = gen.generate([Request("Indonesia adalah", greedy, stop=[stop])])[0]
    assert done.text == free.text[:cut] and done.finish_reason == "stop"


def test_cancel_and_join_in_text_batch(sample_tokenizer, model):
    gen = TextGenerator(model, sample_tokenizer, chat=False)
    sp = SamplingParams(max_new_tokens=20, temperature=0.0)
    batch = gen.start([Request("Satu", sp), Request("Dua", sp)])
    batch.step()
    batch.cancel(0)
    finished = {}
    joined = False
    while batch.active:
        for d in batch.step():
            if d.finish_reason:
                finished[d.index] = d.finish_reason
        if not joined:
            assert batch.add([Request("Tiga", sp)]) == [2]
            joined = True
    assert finished == {0: "cancelled", 1: "length", 2: "length"}
    assert batch.completions[0].completion_tokens == 1
    alone = gen.generate([Request("Tiga", sp)])[0]
    assert batch.completions[2].text == alone.text


# --- the context window -----------------------------------------------------------------------------

def test_context_window_policy(sample_tokenizer):
    tok = sample_tokenizer
    gen = TextGenerator(tiny_model(tok, window=96), tok, chat=True)
    long_turn = "Ini adalah kalimat yang cukup panjang tentang sejarah Indonesia. " * 2
    conv = [{"role": "system", "content": "Jawab singkat."}]
    for i in range(6):
        conv += [{"role": "user", "content": f"Pertanyaan {i}: {long_turn}"},
                 {"role": "assistant", "content": f"Jawaban {i}."}]
    conv.append({"role": "user", "content": "Terakhir?"})
    kept = gen.fit_messages(conv, reserve=16)
    assert kept[0] == conv[0] and kept[-1] == conv[-1]
    assert kept[1]["role"] == "user" and len(kept) < len(conv)
    assert len(gen.encode(kept)) <= 96 - 16
    assert kept[1:] == conv[len(conv) - len(kept) + 1:]  # a suffix: the newest turns survive
    # adding back the next-older exchange would not fit
    older = conv[len(conv) - len(kept) - 1:]
    assert len(gen.encode(conv[:1] + older)) > 96 - 16
    with pytest.raises(ContextLengthError, match="context window of 96 tokens"):
        gen.fit_messages([{"role": "user", "content": long_turn * 4}], reserve=16)
    # the engine refuses a prompt that leaves no room, naming the request in a batch
    with pytest.raises(ContextLengthError, match="request 1: prompt has"):
        gen.start([Request("pendek", SamplingParams()), Request(long_turn * 4, SamplingParams())])
    with pytest.raises(ContextLengthError):
        gen.check(Request(long_turn * 4))


# --- the REPL ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_tokenizer):
    """A run folder with checkpoints/model_epoch{1,2}.pt (chat fine-tuned flag set on epoch 2), a model
    that never samples a special token greedily (so an answer runs until it is stopped)."""
    d = tmp_path_factory.mktemp("run")
    model = tiny_model(sample_tokenizer, window=2048, never_special=True)
    for epoch in (1, 2):
        save_model(d / "checkpoints" / f"model_epoch{epoch}.pt", model.state_dict(), model.config,
                   sample_tokenizer.to_json(), epoch=epoch, chat=epoch == 2)
    return d


@pytest.mark.skipif(os.name == "nt", reason="pexpect's pseudo-terminals are POSIX-only")
def test_repl_through_a_pseudo_terminal(run_dir):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat_interactive.py"), "--max-new-tokens", "24"],
                          cwd=str(run_dir), env=env, encoding="utf-8", timeout=120)
    try:
        child.expect("model_epoch2.pt")  # the newest checkpoint by default
        child.expect("chat mode")
        child.expect("you> ")
        child.sendline("Apa kabar? Ceritakan tentang Jakarta.")
        child.expect("model> ")
        child.expect(r"\[24 tokens, [\d.]+ tokens/s, length limit\]")
        child.expect("you> ")
        child.sendline("/temp 0")
        child.expect(r"\(temperature = 0.0\)")
        child.sendline("/bogus")
        child.expect("unknown command /bogus")
        child.sendline("/topk abc")
        child.expect("needs an integer")
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        # Ctrl-C stops a long answer and the REPL carries on
        child.sendline("/max 2000")
        child.expect(r"max_new_tokens = 2000")
        child.sendline("Tulis cerita yang sangat panjang.")
        child.expect("model> ")
        child.expect(r"\S")  # the answer has started streaming: interrupt it now (a fast CPU makes the
        child.sendintr()     # 2000 tokens in under half a second, so no fixed wait can be trusted)
        child.expect(r"tokens/s, stopped\]")
        child.expect("you> ")
        child.sendintr()  # at the prompt: a hint, not an exit
        child.expect("/quit or Ctrl-D")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_repl_text_mode_and_history(run_dir, sample_tokenizer):
    """Driven directly: text mode says so and keeps no history; chat mode keeps it; /system resets."""
    import io

    from pakar.chat import ChatSession, repl

    model = tiny_model(sample_tokenizer, never_special=True)
    out = io.StringIO()
    lines = iter(["Jakarta adalah", "/system Jawab singkat.", "Halo", "Apa kabar?", "/quit"])
    chat = ChatSession(TextGenerator(model, sample_tokenizer, chat=True),
                       SamplingParams(max_new_tokens=5, temperature=0.0), out=out)
    repl(chat, read=lambda prompt: next(lines))
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert chat.system == "Jawab singkat." and "conversation cleared" in out.getvalue()
    text = ChatSession(TextGenerator(model, sample_tokenizer, chat=False),
                       SamplingParams(max_new_tokens=5, temperature=0.0), out=io.StringIO())
    text.answer("Jakarta adalah")
    assert text.history == []
    res = subprocess.run([sys.executable, str(ROOT / "chat_interactive.py"), "--mode", "text"],
                                       cwd=run_dir, input="/quit\n", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "continues what you type" in res.stdout


# --- chat-batch --------------------------------------------------------------------------------------

def run_cli(args, capsys):
    code = cli(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_batch_reports_do_not_depend_on_batch_size(run_dir, tmp_path, capsys):
    ck = str(run_dir / "checkpoints" / "model_epoch2.pt")
    common = ["chat-batch", "--checkpoint", ck, "--max-new-tokens", "12", "--temperature", "0.8", "--json"]
    code, out, _ = run_cli(common + ["--batch-size", "5", "--out", str(tmp_path / "a")], capsys)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["prompts"] == 12 and summary["mode"] == "chat"
    assert summary["completion_tokens"] == 12 * 12 and summary["finish_reasons"] == {"length": 12}
    rows = [json.loads(l) for l in Path(summary["report_jsonl"]).read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(1, 13))
    assert {r["topic"] for r in rows} == {"teknologi", "pengetahuan umum", "topik ringan", "jurnal"}
    assert all(r["completion_tokens"] == 12 and r["tokens_per_s"] > 0 for r in rows)
    md = Path(summary["report_md"]).read_text(encoding="utf-8")
    assert md.count("\n| ") == 13 and "| prompt | answer | tokens | tokens/s |" in md
    assert "summary: 12 prompts" in out
    code, out, _ = run_cli(common + ["--batch-size", "1", "--out", str(tmp_path / "b")], capsys)
    again = json.loads(out.strip().splitlines()[-1])
    rows1 = [json.loads(l) for l in Path(again["report_jsonl"]).read_text(encoding="utf-8").splitlines()]
    assert [r["answer"] for r in rows1] == [r["answer"] for r in rows]


def test_chat_batch_prompt_files(run_dir, tmp_path, capsys):
    ck = str(run_dir / "checkpoints" / "model_epoch1.pt")  # pretrained only: text mode
    txt = tmp_path / "p.txt"
    txt.write_text("# komentar\nJakarta adalah\n\nBandung terkenal dengan\n", encoding="utf-8")
    code, out, _ = run_cli(["chat-batch", "--checkpoint", ck, "--prompts", str(txt), "--max-new-tokens", "4",
                            "--out", str(tmp_path), "--json"], capsys)
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["prompts"] == 2 and summary["mode"] == "text"
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "Halo", "topic": "sapaan"}) + "\n" +
                  json.dumps({"messages": [{"role": "user", "content": "Apa kabar?"}]}) + "\n", encoding="utf-8")
    code, out, _ = run_cli(["chat-batch", "--checkpoint", ck, "--prompts", str(jl), "--max-new-tokens", "4",
                            "--out", str(tmp_path), "--json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["prompts"] == 2
    jl.write_text(json.dumps({"prompt": "Halo"}) + "\n{not json\n", encoding="utf-8")
    code, _, err = run_cli(["chat-batch", "--checkpoint", ck, "--prompts", str(jl)], capsys)
    assert code == 2 and "line 2: not JSON" in err


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cmd in (["chat"], ["chat-batch"], ["chat", "--checkpoint", "nope.pt"]):
        code, _, err = run_cli(cmd, capsys)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "2"), ("--top-k", "-1"),
    ("--repetition-penalty", "inf"), ("--repetition-penalty", "0"), ("--max-new-tokens", "0"),
    ("--seed", "-1"), ("--seed", str(2**70)),
])
def test_sampling_flags_out_of_range_are_one_line(run_dir, tmp_path, capsys, flag, value):
    ck = str(run_dir / "checkpoints" / "model_epoch2.pt")
    for cmd in (["chat-batch", "--out", str(tmp_path)], ["chat"]):
        code, _, err = run_cli([*cmd, "--checkpoint", ck, flag, value], capsys)
        assert code == 2 and err.startswith(f"error: {flag} {value if value != 'nan' else 'nan'}"), err
        assert len(err.strip().splitlines()) == 1
