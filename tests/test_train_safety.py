"""Never losing a run (issue 17): non-finite steps skipped and a diverged run stopped without a
non-finite checkpoint, a run folder never taken over by a second run, SIGINT/SIGTERM saving a state
that resumes bit-exactly, stale temporary files removed, disk errors as one line with the previous
files intact, and runs stopped by --max-steps leaving a model and a final validation.

References: an uninterrupted run (exact replay), AdamW's own step counter, the bytes of files
written before a failure, and `math.isfinite` over every tensor of every file."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import atomic_save, latest_epoch_checkpoint, load_model, model_checkpoint, safe_load
from pakar.config import get_config
from pakar.model import Transformer
from pakar.train import MAX_BAD_STEPS, TrainArgs, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
DEAD_PID = 2**22 + 12345  # above Linux's largest pid_max: never a running process


def small_args(out: Path, **kw) -> TrainArgs:
    base = dict(config="tiny", batch=2, seq_len=32, epochs=1, out=str(out), device="cpu", log_every=1,
                eval_tokens=512, save_every=0, vocab_size=512)
    return TrainArgs(**{**base, **kw})


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = safe_load(a), safe_load(b)
    assert sa["loop"] == {**sb["loop"], "elapsed": sa["loop"]["elapsed"]}
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


# --- non-finite steps --------------------------------------------------------------------------------

def test_divergent_run_stops_with_one_line_and_no_nonfinite_file(tmp_path):
    """`--lr 1e3` on tiny: the loss turns NaN after a few steps. The run skips those updates, stops
    after MAX_BAD_STEPS with exit 2 and one line, and no file it leaves holds a NaN."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--batch", "2", "--seq-len", "32",
                          "--lr", "1e3", "--max-steps", "60", "--save-every", "4", "--device", "cpu", "--vocab-size",
                          "512", "--eval-tokens", "512", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    err = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "diverged" in err[0] and "--lr" in err[0]
    skips = records(out, "skip")
    assert len(skips) == MAX_BAD_STEPS and [s["in_a_row"] for s in skips] == list(range(1, MAX_BAD_STEPS + 1))
    files = list((out / "checkpoints").glob("*.pt"))
    assert files, "the periodic state before the divergence is kept"
    for path in files:
        for t in tensors(safe_load(path)):
            if t.is_floating_point():
                assert torch.isfinite(t).all(), path
    assert safe_load(out / "checkpoints" / "state.pt")["loop"]["step"] < skips[0]["step"]


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    """A single NaN step (one poisoned forward) is skipped: the run completes, AdamW stepped one time
    fewer than the loop (its own counter), the weights stay finite, and the skip is logged."""
    calls = [0]

    def poison_third_forward(model):
        def hook(module, inputs, output):
            calls[0] += 1
            return output * float("nan") if calls[0] == 3 else output
        model.embed_tokens.register_forward_hook(hook)
        return model

    summary = train(small_args(tmp_path, max_steps=6), customize_model=poison_third_forward)
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    state = safe_load(tmp_path / "checkpoints" / "state.pt")
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {5.0}
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [s["step"] for s in records(tmp_path, "skip")] == [3]
    assert 3 not in {r["step"] for r in records(tmp_path, "train")}
    assert "update skipped" in (tmp_path / "training.log").read_text()


def test_nonfinite_tensor_is_never_written(tmp_path):
    cfg = get_config("tiny", vocab_size=300)
    good = model_checkpoint(Transformer(cfg).state_dict(), cfg, "{}", epoch=1)
    path = tmp_path / "model_epoch1.pt"
    atomic_save(good, path)
    before = path.read_bytes()
    bad = model_checkpoint({**good["model"], "norm.weight": torch.full_like(good["model"]["norm.weight"], float("nan"))},
                           cfg, "{}", epoch=2)
    with pytest.raises(PakarError, match=r"refusing to write .*model_epoch1\.pt: tensor model\.norm\.weight"):
        atomic_save(bad, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model_epoch1.pt"]


# --- the run folder ----------------------------------------------------------------------------------

def test_a_second_run_never_overwrites_the_first(tmp_path):
    out = tmp_path / "run"
    train(small_args(out, max_steps=2))
    before = (out / "checkpoints" / "state.pt").read_bytes()
    with pytest.raises(PakarError, match=r"already holds a training run .* --resume .* --overwrite"):
        train(small_args(out, max_steps=3))
    # the seed's `train.py --init-from checkpoints/model_epoch1.pt` in the same folder
    with pytest.raises(PakarError, match="which this run writes"):
        train(small_args(out, max_steps=3, overwrite=True, init_from=str(out / "checkpoints" / "model_step2.pt")))
    assert (out / "checkpoints" / "state.pt").read_bytes() == before
    with pytest.raises(PakarError, match="pick one"):
        train(small_args(out, max_steps=3, resume=True, overwrite=True))
    summary = train(small_args(out, max_steps=3, overwrite=True))
    assert summary["steps"] == 3 and not (out / "checkpoints" / "model_step2.pt").exists()
    assert "--overwrite: deleted the previous run's model_step2.pt, state.pt" in (out / "training.log").read_text()


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    train(small_args(out, max_steps=1))
    shard_dir = next((out / "data").glob("*/"))
    stale = [out / "checkpoints" / f".state.pt.tmp{DEAD_PID}", out / "checkpoints" / f".model_epoch1.pt.tmp{DEAD_PID}",
             out / f"tokenizer.json.tmp-{DEAD_PID}", shard_dir / f"train.bin.tmp-{DEAD_PID}",
             shard_dir / f"train.bin.tmp-{DEAD_PID}-moved", shard_dir / f"manifest.json.tmp-{DEAD_PID}"]
    live = out / "checkpoints" / f".state.pt.tmp{os.getppid()}"  # a running process's file is left alone
    for p in [*stale, live]:
        p.write_bytes(b"partial")
    train(small_args(out, max_steps=2, resume=True))
    assert not any(p.exists() for p in stale) and live.exists()
    log = (out / "training.log").read_text()
    assert all(f"removed a temporary file left by an interrupted save: {p}" in log for p in stale)


# --- disk errors -------------------------------------------------------------------------------------

def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """The disk fills up after 1000 bytes of the new file: a PakarError naming the path and the
    reason, the previous state byte for byte, and no temporary file."""
    import builtins

    import pakar.checkpoint as ck

    out = tmp_path / "run"
    train(small_args(out, max_steps=2))
    state = out / "checkpoints" / "state.pt"
    before = state.read_bytes()

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ck, "open", lambda *a, **kw: FullDisk(builtins.open(*a, **kw)), raising=False)
    with pytest.raises(PakarError, match=r"cannot write .*state\.pt: no space left on device"):
        train(small_args(out, max_steps=6, save_every=3, resume=True))  # the periodic save at step 3
    assert state.read_bytes() == before
    assert not [p for p in state.parent.iterdir() if ".tmp" in p.name]


def test_disk_full_writing_the_tokenizer_is_one_line(tmp_path, monkeypatch, capsys):
    from pakar.cli import main as cli

    real = Path.write_text

    def full_disk(self, data, *a, **kw):
        if ".tmp-" in self.name:
            real(self, data[:100], *a, **kw)  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert cli(["prepare", "--out", str(tmp_path), "--vocab-size", "512"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "tokenizer.json.tmp-" in err[0]
    assert "no space left on device" in err[0]
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_run_folder_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--max-steps", "1",
                              "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    finally:
        out.chmod(0o755)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "permission denied" in res.stderr


# --- signals -----------------------------------------------------------------------------------------

def sigint_after_step(monkeypatch, step: int):
    """Make the next train() send itself SIGINT right after optimizer.step() of optimizer step `step`
    (a hook on the optimizer pakar.train builds). Returns the function that undoes the patch."""
    import pakar.train as T

    real_make, stepped = T.make_optimizer, [0]

    def make_optimizer(*a, **kw):
        opt = real_make(*a, **kw)

        def interrupt(*_):
            stepped[0] += 1
            if stepped[0] == step:
                os.kill(os.getpid(), signal.SIGINT)
        opt.register_step_post_hook(interrupt)
        return opt

    monkeypatch.setattr(T, "make_optimizer", make_optimizer)
    return lambda: monkeypatch.setattr(T, "make_optimizer", real_make)

def test_sigint_right_after_the_optimizer_step_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT delivered just after optimizer.step() of step 4, before the loop counts the step: the
    run finishes step 4, saves state.pt labelled step 4 and returns; resumed, it ends bit-identical to
    an uninterrupted run. The caller's SIGINT handler is back afterwards."""
    ref = train(small_args(tmp_path / "ref", max_steps=8))
    restore = sigint_after_step(monkeypatch, 4)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    stopped = train(small_args(out, max_steps=8))
    assert signal.getsignal(signal.SIGINT) is handler
    assert stopped["signal"] == signal.SIGINT and stopped["steps"] == 4
    assert safe_load(out / "checkpoints" / "state.pt")["loop"]["step"] == 4
    assert "continue with: " in (out / "training.log").read_text()
    restore()
    assert train(small_args(out, max_steps=8, resume=True))["steps"] == ref["steps"] == 8
    assert_same_weights(tmp_path / "ref" / "checkpoints" / "state.pt", out / "checkpoints" / "state.pt")


def test_sigterm_saves_and_the_printed_command_resumes_exactly(tmp_path):
    """A real process gets SIGTERM (docker stop, a scheduler's pre-emption) mid-run: it exits 128+15 with
    the resume command, which ends bit-identical to an uninterrupted run. (SIGINT in a real process at
    random moments: benchmarks/fault_matrix.py; at the worst moment: the test above.)"""
    import time

    common = ["--config", "tiny", "--batch", "2", "--seq-len", "32", "--max-steps", "40", "--log-every", "1",
              "--device", "cpu", "--vocab-size", "512", "--eval-tokens", "512"]
    train(small_args(tmp_path / "ref", max_steps=40))  # in-process: the same arithmetic at one thread
    for sig in (signal.SIGTERM,):
        out = tmp_path / sig.name
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and not (metrics.exists() and metrics.read_text().count('"train"') >= 5):
            time.sleep(0.01)
        proc.send_signal(sig)
        text = proc.communicate(timeout=300)[0]
        assert proc.returncode == 128 + sig, text[-2000:]
        line = next(l for l in text.splitlines() if "continue with: " in l)
        cmd = line.split("continue with: ", 1)[1].split()
        assert cmd[:2] == ["python", str(ROOT / "train.py")] and cmd[-1] == "--resume"
        assert 5 <= safe_load(out / "checkpoints" / "state.pt")["loop"]["step"] < 40
        subprocess.run([sys.executable, *cmd[1:]], check=True, capture_output=True, timeout=600, env=ENV)
        assert_same_weights(tmp_path / "ref" / "checkpoints" / "state.pt", out / "checkpoints" / "state.pt")


# --- runs that end early -----------------------------------------------------------------------------

def test_max_steps_leaves_a_model_and_raising_it_resumes(tmp_path):
    out = tmp_path / "run"
    summary = train(small_args(out, max_steps=3))
    assert summary["checkpoint"] == str(out / "checkpoints" / "model_step3.pt")
    assert latest_epoch_checkpoint(out) == out / "checkpoints" / "model_step3.pt"
    _, _, ckpt = load_model(summary["checkpoint"])
    assert ckpt["meta"]["step"] == 3 and ckpt["meta"]["val_loss"] == summary["val_loss"]
    assert "validation (step 3)" in (out / "training.log").read_text()
    again = train(small_args(out, max_steps=3, resume=True))  # the same flags: nothing to do, says how to go on
    assert again["steps"] == 3 and "raise --max-steps" in (out / "training.log").read_text()
    more = train(small_args(out, max_steps=5, resume=True))
    assert more["steps"] == 5 and latest_epoch_checkpoint(out) == out / "checkpoints" / "model_step5.pt"
    assert "the lr schedule is now fitted to 5 steps" in (out / "training.log").read_text()


def test_finetune_max_steps_leaves_a_model_and_validates(tmp_path, sample_tokenizer):
    """`pakar finetune --max-steps N` (which used to leave only state.pt): a loadable model_step{N}.pt,
    the "after" validation next to the "before" one, and the summary naming that file."""
    from pakar.checkpoint import save_model
    from pakar.corpus import embedded_sample_path
    from pakar.args import FinetuneArgs
    from pakar.finetune import finetune

    cfg = get_config("tiny", vocab_size=sample_tokenizer.vocab_size)
    base = tmp_path / "base.pt"
    save_model(base, Transformer(cfg).state_dict(), cfg, sample_tokenizer.to_json(), config_name="tiny")
    out = tmp_path / "ft"
    args = FinetuneArgs(init_from=str(base), data=[str(embedded_sample_path())], out=str(out), config="tiny",
                        batch=2, seq_len=32, device="cpu", save_every=0, eval_tokens=512, max_steps=3)
    summary = finetune(args, log=lambda m: None)
    assert summary["checkpoint"] == str(out / "checkpoints" / "model_step3.pt")
    _, tok, ckpt = load_model(summary["checkpoint"])
    assert ckpt["meta"]["step"] == 3 and tok.sha256() == sample_tokenizer.sha256()
    log = (out / "training.log").read_text()
    assert "before fine-tuning" in log and "validation (step 3)" in log
    assert summary["val_loss"] is not None and summary["val_loss_before"] is not None
    with pytest.raises(PakarError, match="already holds a training run"):  # the loop's rule, for finetune too
        finetune(args, log=lambda m: None)
