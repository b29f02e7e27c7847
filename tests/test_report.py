"""Curves, TensorBoard and the report card (issue 15, item 4): a real short run writes valid PNG curves
and a report.md stating the numbers of its own metrics.jsonl; `pakar report` rebuilds it for a run
killed midway (SIGKILL, a cut last line, no model checkpoint); --tensorboard's event files read back
with TensorBoard's own EventAccumulator equal metrics.jsonl; a missing matplotlib is said once and
report.md is written without images.

References: the records of metrics.jsonl recomputed here (means, minima, token counts as
steps x batch x seq-len), the loop's own training.log (samples), a fresh evaluation of the saved
checkpoint (expert loads), matplotlib's PNG reader, TensorBoard's reader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pakar import PakarError
from pakar.cli import main as cli
import pakar.report as report
from pakar.report import CURVE_FILES, draw_curves, read_metrics, write_report
from pakar.train import TrainArgs, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
BATCH, SEQ = 8, 32


def lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = imread(path)  # decodes the whole file: a truncated or corrupt PNG raises
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """A real two-epoch tiny run on the embedded sample, validating every 40 steps, with --tensorboard;
    the curves are redrawn during training too (no wait for the first drawing)."""
    out = tmp_path_factory.mktemp("report") / "run"
    draws = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "FIRST_DRAW_GUESS", 0.0)
        mp.setattr(report, "draw_curves", lambda *a, **kw: draws.append(1) or draw_curves(*a, **kw))
        summary = train(TrainArgs(config="tiny", batch=BATCH, seq_len=SEQ, epochs=2, out=str(out), device="cpu",
                                  log_every=5, eval_every=40, eval_tokens=1024, save_every=0, vocab_size=512,
                                  tensorboard=True))
    assert len(draws) >= 2  # at the first evaluation and at the end
    return out, summary


def test_a_real_run_writes_curves_and_a_report_of_its_own_numbers(run):
    out, summary = run
    recs = lines(out)
    train_r = [r for r in recs if r["kind"] == "train"]
    vals = [r for r in recs if r["kind"] == "val"]
    start = next(r for r in recs if r["kind"] == "start")
    spe = start["steps_per_epoch"]
    assert [r["step"] for r in train_r] == list(range(1, 2 * spe + 1))
    for name in CURVE_FILES:  # a MoE run has every curve, expert load included
        assert_png(out / "curves" / name)
    text = (out / "report.md").read_text()
    for name in CURVE_FILES:
        assert f"](curves/{name})" in text
    final = max(vals, key=lambda v: v["step"])
    best = min(vals, key=lambda v: v["loss"])
    assert final["loss"] == summary["val_loss"] and final["step"] == 2 * spe
    assert f"| final | {final['step']:,} | {final['loss']:.4f} | {final['bits_per_byte']:.4f} | " \
           f"{final['perplexity']:.2f} |" in text
    assert f"| best (loss) | {best['step']:,} | {best['loss']:.4f} | {best['bits_per_byte']:.4f} |" in text
    # text data: every position of every sequence is a target
    assert f"Tokens seen: {len(train_r) * BATCH * SEQ:,}; optimizer steps: {len(train_r):,}; epochs completed: 2" in text
    assert "Status: **finished**" in text and "What is missing" not in text
    # the seed's promise against this run, per epoch: the mean training loss and the epoch-end validation
    for epoch, promise in ((1, "~5-10 | ~0.99-1.98"), (2, "– | –")):
        mean = sum(r["loss"] for r in train_r if r["epoch"] == epoch) / spe
        end = next(v for v in vals if v["step"] == epoch * spe)
        assert f"| {epoch} | {promise} | {mean:.4f} | {end['loss']:.4f} | {end['bits_per_byte']:.4f} |" in text
    assert "| 3 | ~2-3 | ~0.40-0.59 | not reached |" in text and "| 5 | ~1-2 | ~0.20-0.40 | not reached |" in text
    # the samples are the ones the loop printed to training.log
    log = (out / "training.log").read_text()
    for epoch in (1, 2):
        logged = log.split(f"sample (epoch {epoch}): ", 1)[1].splitlines()[0]
        assert f"```\n{eval(logged)}\n```" in text  # the log shows the repr of the text


def test_recorded_expert_loads_are_the_checkpoints_own(run):
    """The expert table comes from the last validation's loads; evaluating the saved final model on the
    same held-out tokens gives the same loss and the same loads."""
    import numpy as np

    from pakar.checkpoint import load_model
    from pakar.evaluate import evaluate_tokens

    out, _ = run
    last = [r for r in lines(out) if r["kind"] == "val"][-1]
    model, tok, _ = load_model(out / "checkpoints" / "model_epoch2.pt", "cpu")
    (key,) = [p for p in (out / "data").iterdir() if p.is_dir()]
    val = np.fromfile(key / "val.bin", dtype=np.uint16)
    res = evaluate_tokens(model, val, BATCH, SEQ, tok.token_byte_lengths(), 1024)
    assert res["loss"] == last["loss"]
    assert [[round(x, 6) for x in row] for row in res["expert_fraction"]] == last["expert_fraction"]
    text = (out / "report.md").read_text()
    for layer, row in enumerate(res["expert_fraction"]):
        assert f"| {layer} | {100 * min(row):.1f}% | {100 * max(row):.1f}% | " in text


def test_tensorboard_events_read_back_equal_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import numpy as np

    out, _ = run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    recs = lines(out)
    for kind, key in (("train", "loss"), ("train", "lr"), ("train", "tokens_per_s"), ("val", "loss"),
                      ("val", "bits_per_byte")):
        want = [(r["step"], np.float32(r[key])) for r in recs if r["kind"] == kind and r.get(key) is not None]
        got = [(e.step, np.float32(e.value)) for e in acc.Scalars(f"{kind}/{key}")]
        assert got == want and len(want) > 0, (kind, key)


def test_report_of_a_run_killed_midway(tmp_path):
    """SIGKILL (no chance to save or log anything) after a few validations and before any epoch end; a
    cut last line added as a write interrupted by the kill would leave it."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--batch", "2",
                             "--seq-len", "32", "--eval-every", "5", "--log-every", "1", "--save-every", "0",
                             "--device", "cpu", "--vocab-size", "512", "--eval-tokens", "256", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    metrics = out / "metrics.jsonl"
    try:
        while proc.poll() is None and not (metrics.exists() and metrics.read_text().count('"val"') >= 3):
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode != 0, "the run ended before it was killed"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 99999, "lo')
    whole = [json.loads(l) for l in metrics.read_text().splitlines()[:-1]]
    vals = [r for r in whole if r["kind"] == "val"]
    steps = [r["step"] for r in whole if r["kind"] == "train"]
    assert cli(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "no end record" in text and "last line of `metrics.jsonl` is cut" in text
    assert "No model checkpoint in `checkpoints/`" in text
    final = max(vals, key=lambda v: v["step"])
    assert f"| final | {final['step']:,} | {final['loss']:.4f} | {final['bits_per_byte']:.4f} |" in text
    assert f"step {max(steps):,}" in text
    assert_png(out / "curves" / "loss.png")


def test_missing_matplotlib_is_said_once_and_the_report_has_no_images(tmp_path, monkeypatch, run):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(report, "FIRST_DRAW_GUESS", 0.0)  # the loop tries at its first evaluation
    out = tmp_path / "run"
    summary = train(TrainArgs(config="tiny", batch=BATCH, seq_len=SEQ, max_steps=12, eval_every=4, out=str(out),
                              device="cpu", eval_tokens=256, save_every=0, vocab_size=512))
    log = (out / "training.log").read_text()
    assert log.count("matplotlib is not installed") == 1 and "pip install matplotlib" in log
    assert summary["steps"] == 12 and not (out / "curves").exists()
    text = (out / "report.md").read_text()
    assert "Curves not drawn: matplotlib is not installed (pip install matplotlib" in text and "![" not in text
    sample = log.split("sample (step 12): ", 1)[1].splitlines()[0]  # a stop by --max-steps draws a sample too
    assert "Step 12 (epoch 1)" in text and f"```\n{eval(sample)}\n```" in text
    # `pakar report` too: the report of the earlier run, without images, and no crash
    copy = tmp_path / "copy"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("curves", "data", "checkpoints", "tensorboard"))
    assert cli(["report", str(copy)]) == 0 and "![" not in (copy / "report.md").read_text()


def test_resume_and_overwrite_records(tmp_path):
    """How records of several processes are told apart: a resumed start at step S drops what the killed
    process wrote after S; a start without resume begins a new run (--overwrite); the "before
    fine-tuning" validation written just before the loop's start belongs to the new run; a dense model
    (no experts) says so."""
    def rec(**r):
        return json.dumps(r) + "\n"

    dense = {"expert_fraction": []}
    old = [rec(kind="start", resume=False, step=0, steps_per_epoch=10), rec(kind="train", step=1, epoch=1, loss=9.0)]
    new = [rec(kind="val", step=0, epoch=0, loss=7.0, bits_per_byte=5.0, perplexity=1.0, base_model=True),
           rec(kind="start", resume=False, step=0, steps_per_epoch=10, model_config={"num_experts": 0}),
           *[rec(kind="train", step=s, epoch=1, loss=6.0 - s / 10, lr=1e-3) for s in range(1, 8)],
           rec(kind="val", step=5, epoch=1, loss=5.5, bits_per_byte=3.0, perplexity=2.0, **dense),
           rec(kind="val", step=7, epoch=1, loss=1.0, bits_per_byte=0.5, perplexity=2.0, **dense),  # lost to the kill
           rec(kind="start", resume=True, step=5, steps_per_epoch=10),
           *[rec(kind="train", step=s, epoch=1, loss=5.0 - s / 10, lr=1e-3) for s in range(6, 11)],
           rec(kind="val", step=10, epoch=1, loss=4.5, bits_per_byte=2.5, perplexity=90.0, **dense),
           # the next epoch's first --eval-every at the same step: the same numbers, the epoch end's kept
           rec(kind="val", step=10, epoch=2, loss=4.5, bits_per_byte=2.5, perplexity=90.0, **dense),
           rec(kind="end", steps=10, epochs_completed=1, tokens_seen=640, seconds=3.0, stopped=None)]
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(old + new))
    r = read_metrics(out / "metrics.jsonl")
    assert r.earlier_runs == 1 and r.processes == 2 and r.end is not None
    assert sorted(r.train) == list(range(1, 11)) and r.train[6]["loss"] == 5.0 - 0.6 and r.train[5]["loss"] == 5.5
    assert [v["step"] for v in r.vals] == [5, 10] and r.base_val["loss"] == 7.0
    res = write_report(out, say=lambda m: None)
    text = (out / "report.md").read_text()
    assert res["status"] == "finished" and res["final_val"]["loss"] == 4.5 and res["best_val"]["loss"] == 4.5
    assert "| base model, before fine-tuning | 0 | 7.0000 |" in text
    assert "holds 1 earlier run(s)" in text and "A dense model: no experts." in text
    mean = (sum(6.0 - s / 10 for s in range(1, 6)) + sum(5.0 - s / 10 for s in range(6, 11))) / 10
    assert f"| 1 | ~5-10 | ~0.99-1.98 | {mean:.4f} | 4.5000 | 2.5000 |" in text
    assert not (out / "curves" / "experts.png").exists() and (out / "curves" / "loss.png").exists()


def test_one_line_errors(tmp_path, capsys, monkeypatch):
    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli(["report", str(tmp_path)]) == 2
    assert "is not a run folder: it has no metrics.jsonl" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(PakarError, match=r"--tensorboard needs the tensorboard package: pip install tensorboard"):
        TrainArgs(tensorboard=True)
