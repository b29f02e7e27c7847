"""Evaluation against independent references: a window-by-window float64 log-softmax over the
model's logits, byte counts from the UTF-8 text itself, the union of rank shards, a real (one-process)
torch.distributed all-reduce, the whole-stream result for the streamed corpus reader, and the CLI."""

from __future__ import annotations

import json
import math
import unicodedata

import numpy as np
import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import save_model
from pakar.cli import main as cli
from pakar.config import get_config
from pakar.evaluate import evaluate_corpus, evaluate_tokens
from pakar.model import Transformer

DOCS = ["Jakarta adalah ibu kota Indonesia dan kota terbesar di Asia Tenggara.",
        "Kopi “tubruk” disajikan panas — harganya Rp 5.000, murah sekali! Naïve café 🙂",
        "Penelitian ini bertujuan untuk mengetahui pengaruh media sosial terhadap remaja.",
        "Gunung Merapi adalah salah satu gunung berapi paling aktif di pulau Jawa."] * 3


@pytest.fixture(scope="module")
def model(sample_tokenizer):
    torch.manual_seed(0)
    return Transformer(get_config("tiny", vocab_size=sample_tokenizer.vocab_size)).eval()


@pytest.fixture(scope="module")
def stream(sample_tokenizer):
    """<|endoftext|> doc <|endoftext|> doc ... : the shards' layout, led by a separator so that the
    targets are exactly the documents and their separators."""
    tok = sample_tokenizer
    ids = [tok.eot_id]
    for d in DOCS:
        ids += tok.encode(d) + [tok.eot_id]
    return np.asarray(ids, dtype=np.uint16)


@torch.no_grad()
def reference(model, tokens, seq_len, n_targets, mask=None):
    """Window by window (one row at a time), float64 log-softmax: (nats, targets, nats on non-special
    targets) over the first n_targets predictions."""
    tokens = torch.as_tensor(np.asarray(tokens[:n_targets + 1], dtype=np.int64))
    nats = nats_text = 0.0
    count = 0
    for s in range(0, n_targets, seq_len):
        w = tokens[s:s + seq_len + 1]
        logp = model(w[None, :-1]).logits[0].double().log_softmax(-1)
        for i, t in enumerate(w[1:].tolist()):
            if mask is not None and not mask[s + 1 + i]:
                continue
            nll = -logp[i, t].item()
            nats += nll
            count += 1
            nats_text += nll if t > 2 else 0.0  # ids 0-2 are the special tokens
    return nats, count, nats_text


def test_loss_and_bits_per_byte_against_reference(model, stream, sample_tokenizer):
    tok = sample_tokenizer
    n = len(stream) - 1
    assert n % 18, "the stream must end in a partial window, which evaluation keeps"
    res = evaluate_tokens(model, stream, batch_size=3, seq_len=18, token_bytes=tok.token_byte_lengths())
    nats, count, nats_text = reference(model, stream, 18, n)
    assert res["tokens"] == count == n  # every token after the first, once, the partial tail included
    assert res["windows"] == math.ceil(n / 18)
    assert res["loss"] == pytest.approx(nats / count, rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-6)
    # bytes from the text itself: the documents' UTF-8 (the tokenizer normalises to NFC)
    text_bytes = sum(len(unicodedata.normalize("NFC", d).encode("utf-8")) for d in DOCS)
    assert res["bytes"] == text_bytes
    assert res["bits_per_byte"] == pytest.approx(nats_text / math.log(2) / text_bytes, rel=1e-6)
    # expert loads: every input position routed to top-k experts in every layer
    counts = np.asarray(res["expert_counts"])
    assert counts.shape == (2, 4) and (counts.sum(axis=1) == n * model.config.num_experts_per_tok).all()
    assert np.allclose(np.asarray(res["expert_fraction"]).sum(axis=1), 1.0)
    # no token bytes: no bits per byte, same loss
    assert evaluate_tokens(model, stream, 3, 16)["bits_per_byte"] is None


@pytest.mark.parametrize("max_tokens", [1, 15, 16, 17, 100])
def test_max_tokens(model, stream, max_tokens):
    res = evaluate_tokens(model, stream, batch_size=2, seq_len=16, max_tokens=max_tokens)
    nats, count, _ = reference(model, stream, 16, max_tokens)
    assert res["tokens"] == count == max_tokens
    assert res["loss"] == pytest.approx(nats / count, rel=1e-6)


def test_loss_mask(model, stream):
    mask = np.random.default_rng(0).random(len(stream)) < 0.4
    res = evaluate_tokens(model, stream, batch_size=4, seq_len=16, loss_mask=mask)
    nats, count, _ = reference(model, stream, 16, len(stream) - 1, mask)
    assert res["tokens"] == count == int(mask[1:].sum())
    assert res["loss"] == pytest.approx(nats / count, rel=1e-6)
    with pytest.raises(PakarError, match="loss_mask has 3 entries"):
        evaluate_tokens(model, stream, 4, 16, loss_mask=mask[:3])


def test_ranks_split_the_work_and_stay_in_step(model, stream, sample_tokenizer):
    """Three ranks (simulated) evaluate disjoint windows that together are the single-process run, and
    each runs the same number of forward passes (FSDP needs that)."""
    tb = sample_tokenizer.token_byte_lengths()
    single = evaluate_tokens(model, stream, 2, 16, tb)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    parts = []
    try:
        for r in range(3):
            calls.clear()
            parts.append((evaluate_tokens(model, stream, 2, 16, tb, rank=r, world_size=3), len(calls)))
    finally:
        hook.remove()
    assert len({n for _, n in parts}) == 1
    assert sum(p["tokens"] for p, _ in parts) == single["tokens"]
    assert sum(p["windows"] for p, _ in parts) == single["windows"]
    assert sum(p["bytes"] for p, _ in parts) == single["bytes"]
    nats = sum(p["loss"] * p["tokens"] for p, _ in parts)
    assert nats / single["tokens"] == pytest.approx(single["loss"], rel=1e-9)
    assert (sum(np.asarray(p["expert_counts"]) for p, _ in parts) == np.asarray(single["expert_counts"])).all()


def test_torch_distributed_all_reduce(model, stream, tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    single = evaluate_tokens(model, stream, 2, 16)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        res = evaluate_tokens(model, stream, 2, 16)
    finally:
        dist.destroy_process_group()
    assert res["loss"] == single["loss"] and res["tokens"] == single["tokens"]


def test_mode_is_restored(model, stream):
    model.train()
    evaluate_tokens(model, stream, 2, 16, max_tokens=20)
    assert model.training
    model.eval()
    evaluate_tokens(model, stream, 2, 16, max_tokens=20)
    assert not model.training


def test_streamed_corpus_equals_the_whole_stream(model, sample_tokenizer, tmp_path, monkeypatch):
    import pakar.evaluate as ev

    monkeypatch.setattr(ev, "CHUNK_WINDOWS", 2)  # many chunks, so chunk boundaries are exercised
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    tok = sample_tokenizer
    ids = []
    for d in DOCS:
        ids += tok.encode(d) + [tok.eot_id]
    ids = np.asarray(ids)
    for max_tokens in (None, 50, 64, 65):
        a = evaluate_tokens(model, ids, 3, 16, tok.token_byte_lengths(), max_tokens=max_tokens)
        b = evaluate_corpus(model, tok, [str(corpus)], 3, 16, max_tokens=max_tokens)
        assert (a["tokens"], a["bytes"], a["windows"]) == (b["tokens"], b["bytes"], b["windows"])
        # the two paths put other windows side by side in a batch; BLAS kernels may block a batch of
        # another size differently (AVX2 ones do), so a token's float32 loss can differ in its last bits:
        # equal to float32 rounding (a few eps per token; the mean is summed in float64), not bit for bit
        assert a["loss"] == pytest.approx(b["loss"], rel=16 * torch.finfo(torch.float32).eps)
        assert a["expert_counts"] == b["expert_counts"]


def test_bad_sizes(model, stream):
    with pytest.raises(PakarError, match="batch size"):
        evaluate_tokens(model, stream, 0, 16)
    with pytest.raises(PakarError, match="nothing to evaluate"):
        evaluate_tokens(model, stream[:1], 2, 16)


# --- pakar eval ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, sample_tokenizer):
    path = tmp_path_factory.mktemp("ck") / "model_epoch1.pt"
    save_model(path, model.state_dict(), model.config, sample_tokenizer.to_json(), epoch=1)
    return path


def test_eval_cli_json_table_and_plot(checkpoint, tmp_path, capsys):
    corpus = tmp_path / "val.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    png = tmp_path / "experts.png"
    code = cli(["eval", "--checkpoint", str(checkpoint), "--data", str(corpus), "--seq-len", "32",
                "--json", "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "expert_fraction"):
        assert key in res
    assert res["seq_len"] == 32 and res["tokens"] > 0 and res["bits_per_byte"] > 0
    assert "bits per byte" in out and "expert load" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_chat_jsonl(checkpoint, tmp_path, capsys):
    pytest.importorskip("pakar.finetune")
    data = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": "Apa ibu kota Indonesia?"}, {"role": "assistant", "content": "Jakarta."}],
             [{"role": "user", "content": "Halo!"}, {"role": "assistant", "content": "Halo juga, apa kabar?"}]]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    code = cli(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    from pakar.tokenizer import Tokenizer, encode_chat

    tok = Tokenizer.from_json(torch.load(checkpoint, weights_only=True)["tokenizer"])
    assert res["chat"] is True and res["tokens"] == sum(sum(encode_chat(tok, c)[1]) for c in convs)


def test_eval_cli_bad_input(checkpoint, tmp_path, capsys):
    for args, msg in [(["--data", str(tmp_path / "missing.txt")], "no such file"),
                      (["--data", __file__, "--seq-len", "0"], "--seq-len 0"),
                      (["--data", __file__, "--max-tokens", "0"], "--max-tokens"),
                      (["--data", __file__, "--plot", "x.jpg"], ".png")]:
        code = cli(["eval", "--checkpoint", str(checkpoint), *args])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
