"""Fine-tuning (pakar.finetune): chat rows and their loss mask, bad records counted, the held-out split,
no attention across conversations, and end-to-end runs through the training loop (full, LoRA, text,
resume), checked against independent references (decoded text, per-conversation forward passes,
the base checkpoint's bytes, exact replay)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pakar import PakarError
from pakar.checkpoint import load_model, safe_load, save_model
from pakar.config import get_config
from pakar.corpus import embedded_sample_path
from pakar.args import FinetuneArgs
from pakar.chat_data import ChatData, collate, evaluate_chat, evaluate_conversations, load_chat
from pakar.finetune import finetune, train_chat
from pakar.args import LoraSpec
from pakar.checkpoint import split_state
from pakar.lora import apply_lora, load_adapter
from pakar.model import Transformer
from pakar.tokenizer import encode_chat
from pakar.args import TrainArgs


def sample_lines() -> list[str]:
    return [l.strip() for l in embedded_sample_path().read_text(encoding="utf-8").splitlines() if l.strip()]


def conversations(n: int) -> list[dict]:
    """Hermetic chat data from the embedded Indonesian sample: questions from one line's opening,
    answers the whole line; every third one has a system prompt and a second exchange."""
    lines = sample_lines()
    out = []
    for i in range(n):
        a, b = lines[i % len(lines)], lines[(i + 1) % len(lines)]
        msgs = [{"role": "user", "content": f"Tolong jelaskan: {' '.join(a.split()[:5])}?"},
                {"role": "assistant", "content": a}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Jawablah dengan singkat."}, *msgs,
                    {"role": "user", "content": "Lalu?"}, {"role": "assistant", "content": b}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def base_ckpt(tmp_path, sample_tokenizer) -> Path:
    """A tiny model checkpoint (random weights: these tests check the plumbing, not the quality)."""
    cfg = get_config("tiny", vocab_size=sample_tokenizer.vocab_size)
    torch.manual_seed(0)
    path = tmp_path / "base.pt"
    save_model(path, Transformer(cfg).state_dict(), cfg, sample_tokenizer.to_json(), config_name="tiny")
    return path


def ft_args(base: Path, data: Path, out: Path, **kw) -> FinetuneArgs:
    common = dict(init_from=str(base), data=[str(data)], out=str(out), config="tiny", batch=4, seq_len=256,
                  device="cpu", log_every=1, save_every=0, eval_tokens=4096, max_steps=4)
    return FinetuneArgs(**{**common, **kw})


# --- rows and masks ----------------------------------------------------------------------------------

def test_targets_are_exactly_assistant_content_and_end_marker(sample_tokenizer):
    """Decoding each run of counted targets gives back an assistant message followed by <|im_end|>,
    in order, and nothing else is counted; padding is -100; x is the conversation shifted."""
    convs = [c["messages"] for c in conversations(4)]
    encoded = [tuple(map(np.asarray, encode_chat(sample_tokenizer, m))) for m in convs]
    x, y = collate(encoded, sample_tokenizer.eot_id, max_len=512)
    assert x.shape[1] % 8 == 0
    for row, (msgs, (ids, _)) in enumerate(zip(convs, encoded)):
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1].tolist() and (x[row, n:] == sample_tokenizer.eot_id).all()
        assert (y[row, n:] == -100).all()
        counted = (y[row] != -100).tolist()
        runs, cur = [], []
        for t, c in zip(y[row].tolist(), counted):
            if c:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        runs += [cur] if cur else []
        expected = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
        assert [sample_tokenizer.decode(r) for r in runs] == expected
        # each counted target is the next token of the conversation
        pos = torch.nonzero(y[row] != -100).flatten()
        assert (y[row, pos] == torch.as_tensor(ids)[pos + 1]).all()


def test_bad_records_are_counted_and_reported(tmp_path, sample_tokenizer):
    good = conversations(6)
    long_answer = {"messages": [{"role": "user", "content": "Ceritakan."},
                                {"role": "assistant", "content": " ".join(sample_lines()[:20])}]}
    bad = ["{not json", {"messages": [{"role": "bot", "content": "halo"}]},
           {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "ya"}]},
           {"messages": [{"role": "user", "content": "halo saja"}]}, long_answer, {"text": "dokumen biasa"},
           {"foo": 1}]
    path = write_jsonl(tmp_path / "chat.jsonl", bad[:3] + good + bad[3:])
    train, val, stats = load_chat([path], sample_tokenizer, max_len=600, val_fraction=0.2)
    assert len(train) + len(val) == stats.used == 6 and val  # the smallest hash is held out at least
    assert (stats.invalid, stats.too_long, stats.no_assistant, stats.text_records) == (2, 1, 1, 1)
    assert (stats.corpus.bad_json, stats.corpus.missing_field) == (1, 1)
    warnings = " | ".join(stats.warnings(600))
    assert "role 'bot'" in warnings and "longer than 600 tokens" in warnings and "no assistant" in warnings

    only_bad = write_jsonl(tmp_path / "bad.jsonl", bad[1:4])
    with pytest.raises(PakarError, match="no usable conversation.*invalid messages"):
        load_chat([only_bad], sample_tokenizer, max_len=600)


def test_held_out_split_depends_on_content_only(tmp_path, sample_tokenizer):
    records = conversations(60)
    a = write_jsonl(tmp_path / "a.jsonl", records)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    b = write_jsonl(tmp_path / "b.jsonl", shuffled)
    (_, va, _), (_, vb, _) = (load_chat([p], sample_tokenizer, 512, val_fraction=0.2) for p in (a, b))
    key = lambda convs: sorted(ids.tobytes() for ids, _ in convs)
    assert va and key(va) == key(vb) and len(va) < 30


def test_batches_cover_every_conversation_and_split_across_ranks(sample_tokenizer):
    convs = [tuple(map(np.asarray, encode_chat(sample_tokenizer, c["messages"]))) for c in conversations(45)]
    one = ChatData(convs, [], batch_size=8, max_len=512, seed=7, pad_id=0, key="k")
    assert one.steps_per_epoch == 6  # ceil(45 / 8): the last batch wraps around
    for epoch in (0, 1):
        seen = one.plan(epoch).flatten()
        assert set(seen.tolist()) == set(range(45)) and len(seen) == 48
    assert not np.array_equal(one.plan(0), one.plan(1))
    # batches are a pure function of (seed, epoch, step); ranks and accumulation micro-steps take
    # slices of the same global batch, so every split of an optimizer step's 8 rows sees the same rows
    splits = {"2 ranks": [ChatData(convs, [], 4, 512, 7, 0, "k", rank=r, world_size=2) for r in (0, 1)],
              "accum 2": [ChatData(convs, [], 4, 512, 7, 0, "k", grad_accum=2)],
              "2 ranks x accum 2": [ChatData(convs, [], 2, 512, 7, 0, "k", rank=r, world_size=2, grad_accum=2)
                                    for r in (0, 1)]}
    for name, parts in splits.items():
        assert all(p.steps_per_epoch // p.grad_accum == one.steps_per_epoch for p in parts), name
        for step in (0, 3, 5):
            x1, y1 = one.get(1, step)
            got = [p.get(1, step * p.grad_accum + m) for m in range(parts[0].grad_accum) for p in parts]
            x = torch.cat([torch.nn.functional.pad(x, (0, x1.shape[1] - x.shape[1])) for x, _ in got])
            y = torch.cat([torch.nn.functional.pad(y, (0, y1.shape[1] - y.shape[1]), value=-100) for _, y in got])
            key = lambda t: sorted(map(tuple, t.tolist()))
            assert key(x) == key(x1) and key(y) == key(y1), (name, step)
    # length bucketing: rows of a batch are much more alike than random rows
    lengths = np.array([len(ids) for ids, _ in convs])
    spread = np.mean([np.ptp(lengths[b]) for b in one.plan(0)])
    assert spread < np.ptp(lengths)


def test_padded_batch_equals_each_conversation_alone(sample_tokenizer):
    """One conversation per right-padded row: the summed assistant-token loss of a batch equals the sum
    of each conversation evaluated alone at its own length (no attention across rows or to padding)."""
    torch.manual_seed(0)
    model = Transformer(get_config("tiny", vocab_size=sample_tokenizer.vocab_size)).eval()
    convs = [tuple(map(np.asarray, encode_chat(sample_tokenizer, c["messages"]))) for c in conversations(5)]
    alone, loads = 0.0, 0
    with torch.no_grad():
        for ids, mask in convs:
            x = torch.as_tensor(ids[:-1], dtype=torch.long)[None]
            y = torch.as_tensor(np.where(mask[1:], ids[1:], -100), dtype=torch.long)[None]
            out = model(x)
            alone += F.cross_entropy(out.logits[0].double(), y[0], ignore_index=-100, reduction="sum").item()
            loads = loads + out.expert_counts
        x, y = collate(convs, sample_tokenizer.eot_id, 512)
        batched = F.cross_entropy(model(x).logits.flatten(0, 1).double(), y.flatten(), ignore_index=-100,
                                  reduction="sum").item()
    n = sum(int(m[1:].sum()) for _, m in convs)
    assert batched == pytest.approx(alone, rel=1e-5)
    res = evaluate_conversations(model, convs, batch_size=2, token_bytes=sample_tokenizer.token_byte_lengths())
    assert res["tokens"] == n and res["loss"] == pytest.approx(alone / n, rel=1e-5)
    assert res["expert_counts"] == loads.tolist()  # padding positions are not counted as routed tokens


# --- end to end through the training loop ------------------------------------------------------------

def test_full_chat_finetune(tmp_path, base_ckpt, sample_tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(48))
    out = tmp_path / "ft"
    summary = finetune(ft_args(base_ckpt, data, out, lr=3e-3, max_steps=None, epochs=1, batch=8), log=lambda m: None)
    assert summary["kind"] == "chat" and summary["val_loss"] < summary["val_loss_before"]
    model, tok, ckpt = load_model(summary["checkpoint"])
    assert ckpt["meta"]["chat"] is True and tok.sha256() == sample_tokenizer.sha256()  # never retrained
    assert not (out / "tokenizer.json").exists()
    log = (out / "training.log").read_text()
    assert "before fine-tuning" in log and "validation (epoch 1)" in log
    # the epoch-end validation is the assistant-token loss of the held-out slice: `pakar eval`'s chat
    # function on the same file with split "val" gives the same number
    res = evaluate_chat(model, tok, [data], batch_size=8, max_len=256, split="val")
    assert res["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_lora_finetune_changes_only_adapters_and_merges(tmp_path, sample_tokenizer):
    """LoRA on every target of a base that balances its experts with router biases (aux-loss-free):
    the base weights stay bit-identical, the adapters and the router biases move, and both merges (the
    --merge checkpoint and `pakar lora-merge` on the adapter file) compute what the adapted model does."""
    from pakar.cli import main as cli

    cfg = get_config("tiny", vocab_size=sample_tokenizer.vocab_size, expert_bias_update_rate=0.01)
    torch.manual_seed(0)
    base_ckpt = tmp_path / "base.pt"
    save_model(base_ckpt, Transformer(cfg).state_dict(), cfg, sample_tokenizer.to_json(), config_name="tiny")
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    summary = finetune(ft_args(base_ckpt, data, tmp_path / "ft", lora_rank=4, lora_targets=["all"], merge=True,
                               lr=1e-2, max_steps=None), log=lambda m: None)
    ck = tmp_path / "ft" / "checkpoints"
    base = safe_load(base_ckpt)
    state = safe_load(ck / "state.pt")
    base_state, adapters = split_state(state["model"])
    # after training, every base weight is bit-identical to the checkpoint's; adapters and biases moved
    assert base_state.keys() == base["model"].keys()
    biases = {k for k in base_state if k.endswith("expert_bias")}
    assert all(torch.equal(base_state[k], v) for k, v in base["model"].items() if k not in biases)
    assert all(base_state[k].abs().max() > 0 for k in biases)
    assert adapters and all(ab["lora_B" if "lora_B" in ab else "delta"].abs().max() > 0 for ab in adapters.values())
    assert {k for k, ab in adapters.items() if "delta" in ab} == {"embed_tokens.weight", "lm_head.weight"}
    adapter = load_adapter(summary["checkpoint"])
    assert adapter["base"]["sha256"] and adapter["meta"]["chat"] is True
    assert all(torch.equal(adapter["buffers"][k], base_state[k]) for k in biases)
    assert (ck / "lora_epoch1.pt").stat().st_size < 0.15 * base_ckpt.stat().st_size
    chat_rows = (1, 2)  # <|im_start|>, <|im_end|>: LoRA on chat data trains their embedding/output rows
    assert adapter["lora"]["token_ids"] == list(chat_rows)
    adapted = apply_lora(Transformer(cfg), LoraSpec(4, 8.0, ("all",), token_ids=chat_rows))
    adapted.load_state_dict(state["model"])
    x = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    expected = adapted.eval()(x).logits
    assert cli(["lora-merge", "--adapter", summary["checkpoint"], "--out", str(tmp_path / "merged.pt")]) == 0
    for path in (summary["merged_checkpoint"], tmp_path / "merged.pt"):
        merged, _, ckpt = load_model(path)
        torch.testing.assert_close(merged(x).logits, expected, atol=2e-5, rtol=1e-5)
        assert ckpt["meta"]["chat"] is True


def test_lora_resume_is_exact_and_refuses_other_lora_settings(tmp_path, base_ckpt):
    """Stop after 2 steps and resume to 5 == 5 steps straight (constant lr after warmup, so the schedule
    does not depend on --max-steps; the LoRA lr default is resolved the same way both times); a
    different --lora-rank is refused with a one-line error."""
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    kw = dict(lora_rank=4, lora_targets=["attention", "down_proj"], warmup=1, schedule="wsd", min_lr_ratio=1.0)
    quiet = lambda m: None
    finetune(ft_args(base_ckpt, data, tmp_path / "straight", max_steps=5, **kw), log=quiet)
    finetune(ft_args(base_ckpt, data, tmp_path / "resumed", max_steps=2, **kw), log=quiet)
    with pytest.raises(PakarError, match="--lora-rank"):
        finetune(ft_args(base_ckpt, data, tmp_path / "resumed", max_steps=5, resume=True, **{**kw, "lora_rank": 8}),
                 log=quiet)
    finetune(ft_args(base_ckpt, data, tmp_path / "resumed", max_steps=5, resume=True, **kw), log=quiet)
    a, b = (safe_load(tmp_path / d / "checkpoints" / "state.pt") for d in ("straight", "resumed"))
    assert a["loop"]["step"] == b["loop"]["step"] == 5
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_continued_pretraining_on_text(tmp_path, base_ckpt, sample_tokenizer):
    summary = finetune(ft_args(base_ckpt, embedded_sample_path(), tmp_path / "ft", seq_len=32, max_steps=3),
                       log=lambda m: None)
    assert summary["kind"] == "text" and summary["val_loss_before"] is not None
    manifest = next((tmp_path / "ft" / "data").glob("*/manifest.json"))
    assert json.loads(manifest.read_text())["tokenizer"]["sha256"] == sample_tokenizer.sha256()
    assert not (tmp_path / "ft" / "tokenizer.json").exists()


def test_default_learning_rates(tmp_path, base_ckpt):
    """Without --lr (pakar.train.default_lr, the one rule): full fine-tuning trains at a tenth of the
    preset's pretraining rate, LoRA adapters (which start from zero) at the pretraining rate itself.
    With warmup 1 the first step runs at the peak rate."""
    from pakar.args import DEFAULT_LR

    def first_lr(out: str, **kw) -> float:
        finetune(ft_args(base_ckpt, embedded_sample_path(), tmp_path / out, seq_len=32, max_steps=1, warmup=1, **kw),
                 log=lambda m: None)
        records = [json.loads(l) for l in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return next(r["lr"] for r in records if r["kind"] == "train")

    assert first_lr("full") == pytest.approx(DEFAULT_LR["tiny"] / 10)
    assert first_lr("lora", lora_rank=4) == pytest.approx(DEFAULT_LR["tiny"])


def test_refusals(tmp_path, base_ckpt, capsys):
    from pakar.cli import main as cli

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(10))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "state.pt").write_bytes(b"")
    with pytest.raises(PakarError, match="already holds a training run"):
        finetune(ft_args(base_ckpt, data, run))
    common = ["finetune", "--checkpoint", str(base_ckpt), "--data", str(data), "--out", str(tmp_path / "x")]
    for extra, message in ((["--config", "small"], "--config does not apply"),
                           (["--merge"], "--merge folds LoRA"),
                           (["--lora-rank", "4", "--lora-targets", "router"], "unknown target 'router'"),
                           (["--seq-len", "4096"], "exceeds the checkpoint's context")):
        assert cli(common + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    with pytest.raises(PakarError, match="--init-from"):
        train_chat(TrainArgs(config="tiny", data=[str(data)], out=str(tmp_path / "y")))


def test_train_py_form_with_chat_data(tmp_path, base_ckpt):
    """`train.py --init-from CHECKPOINT --data chat.jsonl` (pakar.finetune.train_chat): the same chat SFT,
    the preset taken from the checkpoint, not from train.py's --config default."""
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(20))
    summary = train_chat(TrainArgs(init_from=str(base_ckpt), data=[str(data)], out=str(tmp_path / "run"),
                                   batch=4, seq_len=256, max_steps=2, device="cpu", save_every=0,
                                   eval_tokens=512))
    assert summary["kind"] == "chat" and summary["steps"] == 2 and summary["val_loss_before"] is not None
    state = safe_load(tmp_path / "run" / "checkpoints" / "state.pt")
    assert state["train_args"]["config"] == "tiny" and state["meta"]["chat"] is True
