"""Data-parallel training through the real launchers, on the CPU with gloo.

Each distributed run is `python -m torch.distributed.run --standalone --nproc_per_node=2 train.py ...`,
compared with one plain process that sees the same rows in the same micro-batches: 2 ranks x --batch 4
against --batch 4 --grad-accum 2 (BatchLoader gives rank r of global batch s the same 4 windows as
micro-batch r of step s), and 2 ranks x --batch 2 --grad-accum 2 against --batch 2 --grad-accum 4.
Such a reference is exact, not just close: the Switch balancing loss is a statistic of each
micro-batch (a product of two batch means), so one batch of 8 computes a slightly different auxiliary
gradient than two batches of 4; test_one_batch_of_8_differs_only_by_the_balancing_statistic shows
that difference. We compare per-step losses and gradient norms (metrics.jsonl, every step logged),
the validation loss (aggregated over ranks), and the final weights and AdamW moments (state.pt; a
wrong gradient scale would hide from the weights, Adam being scale-invariant, but not from the
moments or the logged gradient norm).

Tolerances. DDP sums the same two per-rank gradients the reference accumulates (a + b is the same in
either order, and the scalings by the world size are powers of two), so it must match bit for bit.
FSDP and ZeRO sum the same terms in another order: float32 rounding (about eps * |x| per sum), which
training carries forward and amplifies (AdamW divides by sqrt(v), so a gradient element at rounding
level becomes an update of up to a learning rate). How far such runs drift depends on the CPU, its
BLAS kernels and the thread count, so no fixed tolerance holds everywhere. The yardstick is measured in
the same test instead: the reference run again with the rows of every micro-batch reversed
(tests/reordered_sums.py), the same arithmetic in another summation order. See `assert_same_training`.

The FSDP2 and DeepSpeed runs are killed with SIGKILL after their first periodic save and then
resumed, so each of those tests checks equivalence and resume together; the DDP run is killed and
resumed separately against an uninterrupted DDP run, which it must match bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import load_model, safe_load
from pakar.corpus import embedded_sample_path

ROOT = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED,
                                     reason="deepspeed is not installed (pip install 'pakar[deepspeed]')")
needs_posix = pytest.mark.skipif(os.name != "posix", reason="kills the launcher's process tree with SIGKILL")

# about 24 optimizer steps of 8 x 32 tokens per epoch: a whole epoch in a second or two per run
COMMON = ["--config", "tiny", "--seq-len", "32", "--epochs", "1", "--log-every", "1", "--save-every", "4",
          "--device", "cpu", "--vocab-size", "512", "--val-fraction", "0.05", "--eval-tokens", "4096"]
LR = 3e-3  # the tiny preset's default peak learning rate
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every tensor
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 130 documents of the embedded sample corpus (~24 steps of 8 x 32 tokens)."""
    lines = embedded_sample_path().read_text(encoding="utf-8").splitlines()[:130]
    path = tmp_path_factory.mktemp("corpus") / "teks.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Runs shared by the tests of this module, each started once: name -> run directory."""
    base, done = tmp_path_factory.mktemp("runs"), {}

    def get(name: str, nproc: int, *flags: str, kill_after_save: bool = False) -> Path:
        if name not in done:
            out = base / name
            if kill_after_save:
                launch(out, nproc, corpus, *flags, kill_after_save=True)
                launch(out, nproc, corpus, *flags, "--resume")
            else:
                launch(out, nproc, corpus, *flags)
            done[name] = out
        return done[name]

    return get


# one thread per rank unless the suite is run with OMP_NUM_THREADS set (e.g. to test with 2 threads)
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
EPS = torch.finfo(torch.float32).eps
NOISE_FACTOR = 10  # how many times the measured float32 noise a sharded run may drift (see assert_same_training)


def command(nproc: int, *args: str) -> list[str]:
    """python ARGS in one plain process, or under torchrun with nproc ranks; nproc 0: one process of
    the float32 noise reference (tests/reordered_sums.py, which takes a pakar command)."""
    if nproc == 0:
        if args[0] == str(ROOT / "train.py"):
            args = ("train", *args[1:])
        elif args[:2] == ("-m", "pakar"):
            args = args[2:]
        return [sys.executable, str(ROOT / "tests" / "reordered_sums.py"), *args]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run_ok(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


def launch(out: Path, nproc: int, corpus: Path, *flags: str, kill_after_save: bool = False) -> int:
    """Train (one plain process, or nproc ranks under torchrun); with kill_after_save, SIGKILL every
    process once the first periodic state (step 4) is on disk and step 6 is logged, so that the resumed
    run replays steps 5 and 6; returns the saved step."""
    cmd = command(nproc, str(ROOT / "train.py"), *COMMON, "--data", str(corpus), "--out", str(out), *flags)
    if not kill_after_save:
        run_ok(cmd)
        return -1
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and '"step": 6,' in metrics.read_text(encoding="utf-8"):
                kill_tree(proc.pid)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode != 0, "the run finished before it could be killed"
    step = safe_load(out / "checkpoints" / "state.pt")["loop"]["step"]
    assert step >= 4
    return step


def kill_tree(pid: int) -> None:
    """SIGKILL the launcher and its workers (torchrun starts each worker in a session of its own)."""
    proc_children = Path(f"/proc/{pid}/task/{pid}/children")
    children = (proc_children.read_text().split() if proc_children.exists() else
                subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                               text=True).stdout.split())
    for p in [*map(int, children), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def records(run: Path, kind: str = "train") -> dict[int, list[dict]]:
    """step -> records of that step in metrics.jsonl (a killed and resumed run logs some steps twice)."""
    out: dict[int, list[dict]] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind and not rec.get("base_model"):
            out.setdefault(rec["step"], []).append(rec)
    return out


def sum_floor(model: dict) -> float:
    """The relative rounding of a float32 sum of n terms in another order, for n the parameter count
    (the largest sum the step makes: the gradient norm): about log2(n) * eps for the blocked and
    pairwise sums of BLAS and torch's reductions."""
    return math.log2(sum(w.numel() for w in model.values())) * EPS


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def envelope(diffs: list[float]) -> list[float]:
    """The running maximum: how far the noise run had drifted by each step. One step of one noise run
    can agree with the reference by chance; the drift so far cannot."""
    out, m = [], 0.0
    for d in diffs:
        m = max(m, d)
        out.append(m)
    return out


def assert_same_training(ref: Path, run: Path, noise: Path | None = None) -> None:
    """`run` trained like `ref`: the same per-step losses and gradient norms (every record of a step,
    both records of a replayed step included), validation loss, final weights and AdamW moments.

    noise None (DDP): bit for bit. Otherwise (FSDP, ZeRO) `noise` is the reference re-run with reversed
    rows (tests/reordered_sums.py), and each quantity of `run` must stay within NOISE_FACTOR times
    noise's distance from `ref` (for per-step numbers, its running maximum up to that step), and never
    be held to less than a float32 sum in another order guarantees: log2(n) * eps relative for a sum of
    n terms (blocked and pairwise summation; n = the parameter count, the largest sum, the grad norm's).
    Measured here (2-core AMD EPYC, AVX-512): FSDP and ZeRO drift 0.1-2x the noise at each step, the
    noise itself grows from ~1e-7 at step 1 to ~1e-4 (grad norm) by step 24. The bugs these tests exist
    for (a wrong data split, a missing gradient reduction, a wrong loss scale) differ by 1e-2 to 1 from
    step 1 on: far outside."""
    sa, sb = safe_load(ref / "checkpoints" / "state.pt"), safe_load(run / "checkpoints" / "state.pt")
    n = sa["loop"]["step"]  # one epoch
    assert sb["loop"]["step"] == n >= 16 and sa["loop"]["epoch"] == sb["loop"]["epoch"] == 1
    a, b = records(ref), records(run)
    assert sorted(a) == sorted(b) == list(range(1, n + 1))
    va, vb = records(ref, "val"), records(run, "val")  # validation summed over both ranks' windows
    assert va.keys() == vb.keys() == {n} and vb[n][-1]["tokens"] == va[n][-1]["tokens"]
    assert sa["model"].keys() == sb["model"].keys()
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys() and len(oa) == len([k for k in sa["model"] if not k.endswith("expert_bias")])
    for name, st in oa.items():
        assert float(ob[name]["step"]) == float(st["step"]) == n

    if noise is None:  # DDP: the same arithmetic in the same order
        for step in a:
            for rec in b[step]:
                assert (rec["loss"], rec["grad_norm"]) == (a[step][-1]["loss"], a[step][-1]["grad_norm"]), step
        assert vb[n][-1]["loss"] == va[n][-1]["loss"]
        for name, w in sa["model"].items():
            assert torch.equal(sb["model"][name], w), name
        for name, st in oa.items():
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ob[name][k], st[k]), (name, k)
        return

    c = records(noise)
    floor = sum_floor(sa["model"])
    for key in ("loss", "grad_norm"):
        env = envelope([rel_diff(c[s][-1][key], a[s][-1][key]) for s in sorted(a)])
        for step, e in zip(sorted(a), env):
            tol = NOISE_FACTOR * max(e, floor)
            for rec in b[step]:
                d = rel_diff(rec[key], a[step][-1][key])
                assert d <= tol, f"step {step} {key}: {rec[key]} vs {a[step][-1][key]}: {d:.2e} > {tol:.2e}"
    vc = records(noise, "val")
    tol = NOISE_FACTOR * max(rel_diff(vc[n][-1]["loss"], va[n][-1]["loss"]), env[-1], floor)
    assert rel_diff(vb[n][-1]["loss"], va[n][-1]["loss"]) <= tol

    # final weights and moments: max |difference| over all tensors, against the same for the noise run
    # (relative to each tensor's largest entry for the moments, whose scales differ by orders of magnitude)
    sc = safe_load(noise / "checkpoints" / "state.pt")
    w_max = max(float(w.abs().max()) for w in sa["model"].values())

    def weight_diff(s: dict) -> float:
        return max(float((s["model"][k].double() - w.double()).abs().max()) for k, w in sa["model"].items())

    assert weight_diff(sb) <= NOISE_FACTOR * max(weight_diff(sc), floor * w_max), (weight_diff(sb), weight_diff(sc))
    for k in ("exp_avg", "exp_avg_sq"):
        def moment_diff(o: dict) -> float:
            return max(float((o[name][k].double() - st[k].double()).abs().max()) / max(float(st[k].abs().max()), 1e-30)
                       for name, st in oa.items())

        db, dc = moment_diff(ob), moment_diff(sc["optimizer"]["state"])
        assert db <= NOISE_FACTOR * max(dc, floor), (k, db, dc)


def assert_replay_consistent(run: Path) -> None:
    """A killed and resumed run logged the steps between its last save and the kill twice: the replay
    after resuming computed the same losses."""
    twice = {s: r for s, r in records(run).items() if len(r) > 1}
    assert twice, "no step was replayed: the kill came right after a save"
    for step, recs in twice.items():
        assert recs[0]["loss"] == recs[1]["loss"], step  # the same state, rows and order: bit for bit


def assert_epoch_checkpoint(run: Path) -> None:
    """model_epoch1.pt is the self-contained checkpoint chat and export read, with the master weights
    of the final state, and rank 0 wrote the epoch-end sample."""
    model, tok, ckpt = load_model(run / "checkpoints" / "model_epoch1.pt")
    state = safe_load(run / "checkpoints" / "state.pt")["model"]
    assert ckpt["meta"]["epoch"] == 1 and tok.vocab_size == model.config.vocab_size
    for k, v in ckpt["model"].items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    assert "sample (epoch 1):" in (run / "training.log").read_text(encoding="utf-8")


# ---- DDP ------------------------------------------------------------------------------------------
def test_ddp_two_ranks_equal_one_process(runs):
    ref = runs("ref", 1, "--batch", "4", "--grad-accum", "2")
    ddp = runs("ddp", 2, "--batch", "4")
    assert_same_training(ref, ddp)
    log = (ddp / "training.log").read_text(encoding="utf-8")
    assert "2 process(es) (ddp)" in log and "sample (epoch 1):" in log
    assert_epoch_checkpoint(ddp)


@needs_posix
def test_ddp_kill_and_resume_matches_uninterrupted_run(runs):
    ddp = runs("ddp", 2, "--batch", "4")
    killed = runs("ddp-killed", 2, "--batch", "4", kill_after_save=True)
    assert "resumed from" in (killed / "training.log").read_text(encoding="utf-8")
    assert_replay_consistent(killed)
    a, b = safe_load(ddp / "checkpoints" / "state.pt"), safe_load(killed / "checkpoints" / "state.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert {s: r[-1]["loss"] for s, r in records(ddp).items()} == {s: r[-1]["loss"] for s, r in records(killed).items()}


def test_resume_with_another_world_size_is_refused(runs):
    """The 2-rank state resumed by one process: a one-line error naming both world sizes."""
    import shutil

    from pakar.train import TrainArgs, train

    ddp = runs("ddp", 2, "--batch", "4")
    copy = ddp.parent / "ddp-copy"
    shutil.copytree(ddp, copy)
    saved = safe_load(copy / "checkpoints" / "state.pt")["train_args"]
    args = TrainArgs(**{**saved, "out": str(copy), "resume": True})
    with pytest.raises(PakarError, match=r"world size \(saved with 2 processes, now 1\)"):
        train(args)


def test_one_batch_of_8_differs_only_by_the_balancing_statistic(runs):
    """1 process x --batch 8 sees the same rows as 2 ranks x --batch 4: the first step's loss (same
    weights, same rows) agrees to float precision; afterwards the runs drift apart by the difference
    of the auxiliary gradient (the Switch loss of one batch of 8 versus the mean over two batches of
    4), which stays far below the progress of training."""
    ddp = runs("ddp", 2, "--batch", "4")
    big = runs("batch8", 1, "--batch", "8")
    noise = runs("ref-noise", 0, "--batch", "4", "--grad-accum", "2")
    a, b, c = records(ddp), records(big), records(noise)
    # the same weights and rows: only the summation order differs at step 1, as in the noise run
    tol = NOISE_FACTOR * max(rel_diff(c[1][-1]["loss"], a[1][-1]["loss"]),
                             sum_floor(safe_load(ddp / "checkpoints" / "state.pt")["model"]))
    assert rel_diff(a[1][-1]["loss"], b[1][-1]["loss"]) <= tol
    assert a[1][-1]["balance"] != b[1][-1]["balance"]  # computed over 4 rows per rank versus 8
    for s in a:
        assert a[s][-1]["loss"] == pytest.approx(b[s][-1]["loss"], rel=2e-3), s
    assert a[max(a)][-1]["loss"] < a[1][-1]["loss"] - 0.3


# ---- FSDP2 ----------------------------------------------------------------------------------------
@needs_posix
def test_fsdp_two_ranks_equal_one_process_and_resume(runs):
    """With gradient accumulation (a reduce-scatter after every micro-batch)."""
    ref = runs("ref-accum", 1, "--batch", "2", "--grad-accum", "4")
    noise = runs("ref-accum-noise", 0, "--batch", "2", "--grad-accum", "4")
    fsdp = runs("fsdp", 2, "--batch", "2", "--grad-accum", "2", "--fsdp", kill_after_save=True)
    assert "2 process(es) (fsdp)" in (fsdp / "training.log").read_text(encoding="utf-8")
    assert_replay_consistent(fsdp)
    assert_same_training(ref, fsdp, noise)
    assert_epoch_checkpoint(fsdp)


def test_dense_model_fsdp_two_ranks_equal_one_process(runs):
    """The dense twin (tiny-dense) through FSDP2's per-block wrapping: blocks of a dense MLP shard and
    train like the MoE's."""
    ref = runs("dense-ref", 1, "--config", "tiny-dense", "--batch", "2", "--grad-accum", "4")
    noise = runs("dense-noise", 0, "--config", "tiny-dense", "--batch", "2", "--grad-accum", "4")
    fsdp = runs("dense-fsdp", 2, "--config", "tiny-dense", "--batch", "2", "--grad-accum", "2", "--fsdp")
    assert "training tiny-dense" in (fsdp / "training.log").read_text(encoding="utf-8")
    assert_same_training(ref, fsdp, noise)
    assert_epoch_checkpoint(fsdp)


# ---- LoRA chat fine-tuning ------------------------------------------------------------------------
def finetune(out: Path, nproc: int, base: Path, chats: Path, *flags: str) -> Path:
    """`pakar finetune` with LoRA on the chats, in one process or nproc ranks under torchrun (0: the noise
    reference, one process with reversed rows)."""
    run_ok(command(nproc, "-m", "pakar", "finetune", "--checkpoint", str(base), "--data", str(chats),
                   "--out", str(out), "--lora-rank", "4", "--epochs", "1", "--log-every", "1", "--device", "cpu",
                   *flags))
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory, corpus) -> Path:
    """48 two-turn conversations made of the sample corpus's sentences."""
    lines = [ln for ln in corpus.read_text(encoding="utf-8").splitlines() if 20 < len(ln) < 300]
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for q, a in zip(lines[0:96:2], lines[1:96:2]):
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


@needs_posix
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_lora_finetune_two_ranks_equal_one_process(runs, chats, tmp_path, mode):
    """Chat LoRA fine-tuning (frozen base; adapters and the ChatML token rows train) on 2 ranks x
    --batch 2 takes the steps of one process with --batch 2 --grad-accum 2: the same per-step losses
    and gradient norms, and the same adapters. DDP bit for bit; FSDP shards the frozen base and the
    adapters alike and agrees to rounding: within NOISE_FACTOR times the drift of the one-process run
    with reversed rows (see assert_same_training)."""
    base = runs("ref", 1, "--batch", "4", "--grad-accum", "2") / "checkpoints" / "model_epoch1.pt"
    one = finetune(tmp_path / "one", 1, base, chats, "--batch", "2", "--grad-accum", "2")
    two = finetune(tmp_path / mode, 2, base, chats, "--batch", "2", *(["--fsdp"] if mode == "fsdp" else []))
    a, b = records(one), records(two)
    assert sorted(a) == sorted(b) and len(a) >= 10
    la, lb = (safe_load(run / "checkpoints" / "lora_epoch1.pt", fmt="pakar-lora-v1") for run in (one, two))
    assert la["adapters"].keys() == lb["adapters"].keys()
    val_a, val_b = (records(run, "val")[len(a)][-1]["loss"] for run in (one, two))
    if mode == "ddp":
        for step in a:
            assert (b[step][-1]["loss"], b[step][-1]["grad_norm"]) == (a[step][-1]["loss"], a[step][-1]["grad_norm"])
        assert val_b == val_a
        for name, parts in la["adapters"].items():
            for k, t in parts.items():
                assert torch.equal(lb["adapters"][name][k], t), f"{name}.{k}"
        return
    noise = finetune(tmp_path / "noise", 0, base, chats, "--batch", "2", "--grad-accum", "2")
    c = records(noise)
    floor = sum_floor({f"{n}.{k}": t for n, parts in la["adapters"].items() for k, t in parts.items()})
    for key in ("loss", "grad_norm"):
        env = envelope([rel_diff(c[s][-1][key], a[s][-1][key]) for s in sorted(a)])
        for step, e in zip(sorted(a), env):
            assert rel_diff(b[step][-1][key], a[step][-1][key]) <= NOISE_FACTOR * max(e, floor), (step, key)
    val_c = records(noise, "val")[len(a)][-1]["loss"]
    assert rel_diff(val_b, val_a) <= NOISE_FACTOR * max(rel_diff(val_c, val_a), env[-1], floor)
    lc = safe_load(noise / "checkpoints" / "lora_epoch1.pt", fmt="pakar-lora-v1")

    def adapter_diff(other: dict) -> float:
        return max(float((other["adapters"][n][k].double() - t.double()).abs().max())
                   for n, parts in la["adapters"].items() for k, t in parts.items())

    t_max = max(float(t.abs().max()) for parts in la["adapters"].values() for t in parts.values())
    assert adapter_diff(lb) <= NOISE_FACTOR * max(adapter_diff(lc), floor * t_max), (adapter_diff(lb), adapter_diff(lc))


# ---- DeepSpeed ------------------------------------------------------------------------------------
@needs_deepspeed
@needs_posix
def test_deepspeed_zero2_equal_one_process_and_resume(runs):
    """The built-in config (ZeRO-2, float32 on a CPU)."""
    ref = runs("ref", 1, "--batch", "4", "--grad-accum", "2")
    noise = runs("ref-noise", 0, "--batch", "4", "--grad-accum", "2")
    ds = runs("zero2", 2, "--batch", "4", "--deepspeed", kill_after_save=True)
    assert "2 process(es) (deepspeed)" in (ds / "training.log").read_text(encoding="utf-8")
    assert_replay_consistent(ds)
    assert_same_training(ref, ds, noise)
    assert_epoch_checkpoint(ds)


@needs_deepspeed
@needs_posix
def test_deepspeed_zero3_equal_one_process_and_resume(runs, tmp_path_factory):
    """ZeRO-3 from a config file with "auto" batch fields and every tensor partitioned, with gradient
    accumulation (DeepSpeed's own division by the accumulation steps switched off)."""
    cfg = tmp_path_factory.mktemp("ds") / "zero3.json"
    cfg.write_text(json.dumps(ZERO3))
    ref = runs("ref-accum", 1, "--batch", "2", "--grad-accum", "4")
    noise = runs("ref-accum-noise", 0, "--batch", "2", "--grad-accum", "4")
    ds = runs("zero3", 2, "--batch", "2", "--grad-accum", "2", "--deepspeed", "--deepspeed-config", str(cfg),
              kill_after_save=True)
    assert_replay_consistent(ds)
    assert_same_training(ref, ds, noise)
    assert_epoch_checkpoint(ds)


# ---- configuration errors (in process, no launcher) -----------------------------------------------
def test_deepspeed_config_takes_batch_accumulation_and_clipping_from_the_flags(tmp_path):
    from pakar.train import TrainArgs
    from pakar.zero import DeepSpeedSettings
    from pakar.zero import deepspeed_config as from_settings

    def deepspeed_config(args, world_size, amp):
        return from_settings(DeepSpeedSettings.from_args(args), world_size, amp)

    args = TrainArgs(config="tiny", batch=4, grad_accum=3, grad_clip=0.5, device="cpu")
    cfg = deepspeed_config(args, world_size=2, amp=None)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] is False
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"],
            cfg["gradient_clipping"]) == (4, 3, 24, 0.5)
    assert deepspeed_config(args, 1, torch.bfloat16)["bf16"]["enabled"] is True

    bad = tmp_path / "ds.json"
    for content, culprit in [({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
                             ({"gradient_clipping": 0.3}, "gradient_clipping"),
                             ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
                             ({"fp16": {"enabled": True}}, "fp16"),
                             ({"bf16": {"enabled": True}}, "bf16"),
                             ({"zero_optimization": {"stage": 4}}, "stage")]:
        bad.write_text(json.dumps(content))
        args = TrainArgs(config="tiny", batch=4, device="cpu", deepspeed=True, deepspeed_config=str(bad))
        with pytest.raises(PakarError, match=culprit):
            deepspeed_config(args, world_size=2, amp=None)
    bad.write_text("{not json")
    with pytest.raises(PakarError, match="not valid JSON"):
        deepspeed_config(TrainArgs(config="tiny", deepspeed=True, deepspeed_config=str(bad)), 2, None)


def test_launcher_flags_and_mode_errors(tmp_path, monkeypatch):
    import argparse

    from pakar import distributed
    from pakar.args import TrainArgs
    from pakar.commands.train import add_train_args, args_from_namespace

    p = argparse.ArgumentParser()
    add_train_args(p)
    ns = p.parse_args(["--local_rank=1", "--config", "tiny"])  # what `deepspeed train.py` passes
    assert args_from_namespace(ns).config == "tiny"
    with pytest.raises(PakarError, match="alternatives"):
        distributed.setup(TrainArgs(config="tiny", fsdp=True, deepspeed=True))
    with pytest.raises(PakarError, match="needs --deepspeed"):
        distributed.setup(TrainArgs(config="tiny", deepspeed_config="x.json"))
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    with pytest.raises(PakarError, match=r"pip install 'pakar\[deepspeed\]'"):
        distributed.import_deepspeed(torch.device("cpu"))
    # and through the command line: one line on stderr, exit status 2, no traceback
    res = subprocess.run([sys.executable, "-c", "import sys; sys.modules['deepspeed'] = None; "
                          "from pakar.cli import main; sys.exit(main(sys.argv[1:]))", "train", "--config", "tiny",
                          "--deepspeed", "--device", "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "WORLD_SIZE": "2"})
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr
