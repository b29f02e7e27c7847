"""Fault matrix: what a run survives off the happy path (issue 17). Counts, never timings.

    python benchmarks/fault_matrix.py [--trials 10] [--steps 40] [--only kill signals divergence inputs server]

Matrices (each a function returning a dict of counts; `MATRICES` maps a name to it):

- kill        a tiny training run (--save-every 3, so many kills land inside a save) is SIGKILLed at a
              random moment of its training, then continued with --resume; its final weights must be
              bit-identical to an uninterrupted run's, and no temporary file may be left in the folder.
- signals     the same with SIGINT and with SIGTERM (--trials each): the process must exit 128+signal
              after saving, and the resume command it prints must end bit-identical.
- divergence  --lr 1e3: exit status 2, one "error:" line, no traceback, no NaN/inf in any file.
- inputs      benchmarks/fault_inputs.py: bad checkpoints, states, corpora and flags through the real
              CLI; tracebacks and accepted bad inputs counted (target 0).
- server      benchmarks/fault_server.py: hostile requests and sockets against a real server while a
              bystander streams; 5xx answers, server tracebacks and broken bystander streams (target 0).

Every child runs with OMP_NUM_THREADS=1 (CPU arithmetic is then the same in every run). The random
moments are uniform over the reference run's training time, from its first to its last logged step.
The last line is one JSON object: {"matrices": {name: counts}, "failures": N, "seconds": S}; the exit
status is 1 when any trial failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train_cmd(out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--batch", "2", "--seq-len", "32",
            "--max-steps", str(steps), "--save-every", "3", "--log-every", "1", "--device", "cpu",
            "--vocab-size", "512", "--eval-tokens", "512", "--out", str(out), *extra]


def seed_folder(ref: Path, out: Path) -> None:
    """A fresh run folder holding the reference's tokenizer and token cache (the data step is not what
    is tested, and skipping it keeps the matrix short)."""
    out.mkdir(parents=True)
    shutil.copy(ref / "tokenizer.json", out / "tokenizer.json")
    shutil.copytree(ref / "data", out / "data")


def first_step_seen(out: Path, proc: subprocess.Popen) -> float:
    """Wait for the run's first logged step; returns the time it was seen."""
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.005)
    return time.perf_counter()


def same_final_weights(a: Path, b: Path) -> bool:
    import torch

    from pakar.checkpoint import safe_load

    sa, sb = safe_load(a / "checkpoints" / "state.pt"), safe_load(b / "checkpoints" / "state.pt")
    return (sa["loop"]["step"] == sb["loop"]["step"] and sa["model"].keys() == sb["model"].keys()
            and all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]))


def temp_files(out: Path) -> list[Path]:
    from pakar.checkpoint import TEMP_FILES

    return [p for p in out.rglob("*") if TEMP_FILES.match(p.name)]


def last_step_seen(out: Path, proc: subprocess.Popen, steps: int) -> float:
    """Wait for the run's record of optimizer step `steps`; returns the time it was seen."""
    metrics, last = out / "metrics.jsonl", f'"step": {steps},'
    while proc.poll() is None and not any('"kind": "train"' in l and last in l
                                          for l in metrics.read_text().splitlines()):
        time.sleep(0.005)
    return time.perf_counter()


def reference(work: Path, steps: int) -> tuple[Path, float]:
    """The uninterrupted run, and its training time: first to last logged optimizer step, so that the
    random moments fall while it trains (not in the final validation and save after it)."""
    ref = work / "ref"
    proc = subprocess.Popen(train_cmd(ref, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    t0 = first_step_seen(ref, proc)
    t1 = last_step_seen(ref, proc, steps)
    if proc.wait() != 0:
        raise SystemExit("the reference run failed")
    return ref, t1 - t0


def interrupt_and_resume(ref: Path, out: Path, steps: int, sig: signal.Signals, delay: float) -> dict:
    """One trial: start, wait `delay` seconds after the first step, send `sig`, resume, compare."""
    seed_folder(ref, out)
    proc = subprocess.Popen(train_cmd(out, steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    t0 = first_step_seen(out, proc)
    while proc.poll() is None and time.perf_counter() - t0 < delay:
        time.sleep(0.002)
    finished_first = proc.poll() is not None
    if not finished_first:
        proc.send_signal(sig)
    text = proc.communicate()[0]
    trial = {"finished_before_signal": finished_first, "rc": proc.returncode}
    if proc.returncode == 0 or (sig != signal.SIGKILL and proc.returncode == -sig):
        # the process ended before the signal reached it, or the signal came after train() had returned
        # and restored the default handlers (killed by it): nothing was left to save
        finished_first = trial["finished_before_signal"] = True
    if finished_first:
        trial["ok"] = proc.returncode in (0, -sig) and same_final_weights(ref, out)
        return trial
    if sig == signal.SIGKILL:
        trial["status_ok"] = proc.returncode == -signal.SIGKILL
        resume = train_cmd(out, steps, "--resume") if (out / "checkpoints" / "state.pt").exists() else None
        if resume is None:  # killed before the first save: nothing to resume, start again (same folder)
            resume = train_cmd(out, steps)
    else:
        trial["status_ok"] = proc.returncode == 128 + sig and "Traceback" not in text
        if not trial["status_ok"]:
            trial["output"] = text[-400:]
        line = next((l for l in text.splitlines() if "continue with: " in l), None)
        if line is None:
            trial.update(ok=False, error="no resume command printed: " + text[-300:])
            return trial
        resume = [sys.executable, *line.split("continue with: ", 1)[1].split()[1:]]
    res = subprocess.run(resume, capture_output=True, text=True, env=ENV)
    trial["resumed_rc"] = res.returncode
    trial["identical"] = res.returncode == 0 and same_final_weights(ref, out)
    trial["temps_left"] = len(temp_files(out))
    trial["ok"] = trial["status_ok"] and trial["identical"] and trial["temps_left"] == 0
    return trial


def count(trials: list[dict]) -> dict:
    for t in trials:
        if not t["ok"]:
            print(f"  failed trial: {json.dumps(t)[:600]}", flush=True)
    return {"trials": len(trials), "ok": sum(t["ok"] for t in trials),
            "finished_before_signal": sum(t["finished_before_signal"] for t in trials),
            "bit_identical": sum(bool(t.get("identical")) for t in trials),
            "temps_left": sum(t.get("temps_left", 0) for t in trials),
            "bad_exit_status": sum(not t.get("status_ok", True) for t in trials)}


def matrix_kill(opts, work: Path, ref: Path, train_s: float) -> dict:
    rng = random.Random(opts.seed)
    trials = [interrupt_and_resume(ref, work / f"kill{i}", opts.steps, signal.SIGKILL, rng.uniform(0, train_s))
              for i in range(opts.trials)]
    return count(trials)


def matrix_signals(opts, work: Path, ref: Path, train_s: float) -> dict:
    rng = random.Random(opts.seed + 1)
    out = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        trials = [interrupt_and_resume(ref, work / f"{sig.name}{i}", opts.steps, sig, rng.uniform(0, train_s))
                  for i in range(opts.trials)]
        out[sig.name] = count(trials)
    return out


def matrix_divergence(opts, work: Path, ref: Path, train_s: float) -> dict:
    from pakar.checkpoint import first_nonfinite, safe_load

    out = work / "diverge"
    seed_folder(ref, out)
    res = subprocess.run(train_cmd(out, 200, "--lr", "1e3"), capture_output=True, text=True, env=ENV)
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    files = [p for p in out.rglob("*.pt")]
    nonfinite = [str(p) for p in files if first_nonfinite(safe_load(p)) is not None]
    skips = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"skip"' in l]
    ok = res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr and not nonfinite and bool(files)
    return {"ok": int(ok), "exit_status": res.returncode, "error_lines": len(errors),
            "tracebacks": res.stderr.count("Traceback"), "checkpoint_files": len(files),
            "nonfinite_files": len(nonfinite), "skipped_steps": len(skips),
            "message": errors[0][:160] if errors else None}


def _script(name: str) -> dict:
    """Run a sibling matrix script (its own process, its own temp folders); its last line's JSON."""
    res = subprocess.run([sys.executable, str(Path(__file__).with_name(name))], capture_output=True, text=True,
                         env=ENV)
    lines = res.stdout.strip().splitlines()
    try:
        return {**json.loads(lines[-1]), "rc": res.returncode}
    except (IndexError, json.JSONDecodeError):
        return {"rc": res.returncode, "error": (res.stdout + res.stderr)[-600:]}


def matrix_inputs(opts, work: Path, ref: Path, train_s: float) -> dict:
    """benchmarks/fault_inputs.py: bad checkpoints, states, corpora and flags through the real CLI."""
    return _script("fault_inputs.py")


def matrix_server(opts, work: Path, ref: Path, train_s: float) -> dict:
    """benchmarks/fault_server.py: hostile clients against a real server while a bystander streams."""
    return _script("fault_server.py")


MATRICES = {"kill": matrix_kill, "signals": matrix_signals, "divergence": matrix_divergence,
            "inputs": matrix_inputs, "server": matrix_server}


def failures(name: str, counts: dict) -> int:
    if name == "divergence":
        return 1 - counts["ok"]
    if name == "signals":
        return sum(c["trials"] - c["ok"] for c in counts.values())
    if name == "inputs":  # a traceback, a bad input accepted, a timeout, or the script itself failing
        return (counts.get("tracebacks", 1) + counts.get("accepted_bad_input", 0) + counts.get("timeouts", 0)
                + (counts["rc"] != 0))
    if name == "server":
        return (counts.get("count_5xx", 1) + counts.get("server_tracebacks", 0)
                + counts.get("bystander_streams_broken", 0) + (counts["rc"] != 0))
    return counts["trials"] - counts["ok"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10, help="trials per fault (default 10)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each tiny run (default 40)")
    p.add_argument("--only", nargs="+", choices=list(MATRICES), default=list(MATRICES), help="matrices to run")
    p.add_argument("--seed", type=int, default=0, help="seed of the random moments (default 0)")
    opts = p.parse_args(argv)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="pakar-faults-") as tmp:
        work = Path(tmp)
        ref, train_s = reference(work, opts.steps)
        print(f"reference: {opts.steps} steps, {train_s:.1f} s of training")
        for name in opts.only:
            results[name] = MATRICES[name](opts, work, ref, train_s)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    n_fail = sum(failures(name, c) for name, c in results.items())
    print(f"failures: {n_fail}")
    print(json.dumps({"matrices": results, "failures": n_fail, "seconds": round(time.perf_counter() - t0, 1)}))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
