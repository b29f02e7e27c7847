"""CPU threads and the OpenMP wait policy (pakar.runtime), chosen before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pakar import PakarError
from pakar.runtime import choose_threads, pop_threads_flag

ROOT = Path(__file__).resolve().parents[1]
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                                "GOMP_SPINCOUNT", "LOCAL_WORLD_SIZE")}


def test_threads_flag_is_taken_out_anywhere_and_checked():
    assert pop_threads_flag(["train", "--threads", "3", "--batch", "2"]) == (["train", "--batch", "2"], 3)
    assert pop_threads_flag(["--threads=2", "info", "--config", "tiny"]) == (["info", "--config", "tiny"], 2)
    assert pop_threads_flag(["eval", "--data", "x"]) == (["eval", "--data", "x"], None)
    for bad in (["--threads"], ["--threads", "0"], ["--threads=-1"], ["--threads", "many"]):
        with pytest.raises(PakarError, match="--threads must be a positive"):
            pop_threads_flag(bad)


def test_choice_order_flag_then_environment_then_cores_per_local_rank(monkeypatch):
    from pakar import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 16)
    assert choose_threads(None, {}) == runtime.ThreadChoice(16, "cores", "PASSIVE")
    assert choose_threads(None, {"LOCAL_WORLD_SIZE": "4"}).threads == 4  # torchrun: cores shared by 4 ranks
    assert choose_threads(None, {"LOCAL_WORLD_SIZE": "32"}).threads == 1
    assert choose_threads(None, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}).threads == 3  # the user's
    assert choose_threads(5, {"OMP_NUM_THREADS": "3"}) == runtime.ThreadChoice(5, "--threads", "PASSIVE")
    assert choose_threads(None, {"OMP_WAIT_POLICY": "active"}).wait_policy == "ACTIVE"  # the user's policy


def probe(*args: str, env: dict | None = None) -> str:
    """configure_threads(args) in a fresh interpreter, then import torch: what torch and the
    environment say."""
    code = ("import os, sys; from pakar.runtime import configure_threads; rest = configure_threads(sys.argv[1:]); "
            "import torch; print(rest, torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env={**CLEAN_ENV, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_set_before_torch_loads_and_the_users_environment_is_kept():
    assert probe("train", "--threads", "2", "--x") == "['train', '--x'] 2 PASSIVE"
    assert probe("train", env={"OMP_NUM_THREADS": "1"}) == "['train'] 1 PASSIVE"
    assert probe("train", "--threads", "1", env={"OMP_WAIT_POLICY": "ACTIVE"}) == "['train'] 1 ACTIVE"
    assert probe("train", "--threads", "1", env={"GOMP_SPINCOUNT": "1000"}) == "['train'] 1 None"


def test_train_logs_its_threads_and_rejects_a_bad_count(tmp_path):
    """`python train.py --threads 1`: the first training line names the threads and the wait policy;
    a bad count is one line and exit status 2."""
    base = [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--seq-len", "32", "--batch", "2",
            "--max-steps", "1", "--vocab-size", "300", "--device", "cpu", "--eval-tokens", "256",
            "--out", str(tmp_path)]
    res = subprocess.run([*base, "--threads", "1"], capture_output=True, text=True, timeout=300, env=CLEAN_ENV,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in (tmp_path / "training.log").read_text(encoding="utf-8").splitlines()
                if "| training tiny" in ln)
    assert line.endswith("| 1 CPU thread(s), OpenMP wait policy PASSIVE"), line
    res = subprocess.run([*base, "--threads", "none"], capture_output=True, text=True, timeout=120, env=CLEAN_ENV,
                         cwd=ROOT)
    assert res.returncode == 2 and res.stderr.startswith("error: --threads") and "Traceback" not in res.stderr
