"""Training speed with and without a competing CPU-bound process: torch's default threads against
pakar's choice (pakar.runtime), in the same run.

    python benchmarks/bench_threads.py [--steps 40] [--rounds 1] [--busy 1] [--config tiny] [--spin N ...]

Each measurement is a fresh `tiny` training process (threads and the OpenMP wait policy are fixed when
torch loads, so they cannot change inside one process) on the embedded sample corpus, tokenized once
beforehand into a template folder that every run copies. Variants:
- before: the old start-up, `pakar.commands.train.main` called directly, so neither OMP_NUM_THREADS nor
  OMP_WAIT_POLICY is set: torch's default of one thread per core, libgomp's default spin-waiting.
- after:  `python -m pakar train`: pakar's choice of threads and wait policy (printed).
- 1 thread: `python -m pakar train --threads 1`, the reference the tests use.
- spin N (with --spin N ...): `python -m pakar train` with GOMP_SPINCOUNT=N in the environment (pakar
  then leaves the wait policy alone): libgomp spins N times before it sleeps, a middle way between
  its default (300,000 spins) and PASSIVE (none).
each alone and beside --busy processes that spin on a core (`while True: pass`) for the whole run.
The figure is the median tokens/s of the logged intervals after the first (metrics.jsonl), so
start-up, tokenization and the final validation do not count. Figures are only comparable within
one run; on a machine shared with other work they are noisy (use --rounds to interleave repeats and
keep each variant's best). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD_START = "import sys; from pakar.commands.train import main; sys.exit(main(sys.argv[1:]))"  # no pakar.runtime
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE")


def clean_env() -> dict:
    """The environment without any thread setting, as on a user's fresh shell."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_flags(steps: int, out: Path, config: str) -> list[str]:
    return ["--config", config, "--seq-len", "64", "--batch", "4", "--max-steps", str(steps), "--log-every", "5",
            "--vocab-size", "512", "--device", "cpu", "--eval-tokens", "256", "--save-every", "0", "--out", str(out)]


def run(variant: str, steps: int, template: Path, work: Path, config: str) -> tuple[float, str]:
    """(median tokens/s over the logged intervals, the first training log line's thread part)."""
    out = work / variant.replace(" ", "-")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(template, out)  # tokenizer.json and the token cache, no run files
    flags, env = train_flags(steps, out, config), clean_env()
    if variant.startswith("spin "):
        env["GOMP_SPINCOUNT"] = variant.split()[1]
    cmd = {"before": [sys.executable, "-c", OLD_START, *flags],
           "1 thread": [sys.executable, "-m", "pakar", "train", "--threads", "1", *flags]}.get(
        variant, [sys.executable, "-m", "pakar", "train", *flags])  # after, spin N
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if res.returncode != 0:
        sys.exit(f"{variant}: training failed\n{res.stderr[-3000:]}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    rates = [r["tokens_per_s"] for r in recs if r.get("kind") == "train" and r.get("tokens_per_s")][1:]
    log = (out / "training.log").read_text(encoding="utf-8").splitlines()
    head = next((ln for ln in log if "| training " in ln), "")
    threads = head.rsplit(" | ", 1)[-1] if "thread" in head.rsplit(" | ", 1)[-1] else "torch default"
    return statistics.median(rates), threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of 4 x 64 tokens per run (default 40)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repeats; the best of each variant is kept")
    p.add_argument("--busy", type=int, default=1, help="competing busy-loop processes (default 1)")
    p.add_argument("--config", default="tiny", help="model preset (default tiny)")
    p.add_argument("--spin", type=int, nargs="*", default=[], help="also GOMP_SPINCOUNT=N variants")
    args = p.parse_args()
    variants = ["before", "after", "1 thread"] + [f"spin {n}" for n in args.spin]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} usable cores; {args.config}, 4 x 64 tokens per step, {args.steps} steps; {args.busy} busy process(es)")

    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        work, template = Path(tmp), Path(tmp) / "template"
        subprocess.run([sys.executable, "-m", "pakar", "prepare", "--out", str(template), "--vocab-size", "512",
                        "--val-fraction", "0.05"],  # train's split for the sample corpus: a cache hit
                       check=True, env=clean_env(), cwd=REPO, capture_output=True)
        best: dict[tuple[str, bool], float] = {}
        labels: dict[str, str] = {}
        for _ in range(args.rounds):
            for busy in (False, True):
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(args.busy if busy else 0)]
                try:
                    for variant in variants:
                        tps, labels[variant] = run(variant, args.steps, template, work, args.config)
                        best[variant, busy] = max(tps, best.get((variant, busy), 0.0))
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()

    print(f"{'variant':<10} {'threads':<44} {'alone tok/s':>12} {'busy tok/s':>12} {'busy/alone':>10}")
    for v in variants:
        a, b = best[v, False], best[v, True]
        print(f"{v:<10} {labels[v]:<44} {a:>12,.0f} {b:>12,.0f} {b / a:>10.2f}")
    after_vs_before_busy = best["after", True] / best["before", True]
    after_vs_before_alone = best["after", False] / best["before", False]
    print(f"after / before: {after_vs_before_alone:.2f}x alone, "
          f"{after_vs_before_busy:.2f}x beside the busy process(es)")
    print(json.dumps({"benchmark": "threads", "cores": cores, "busy_processes": args.busy, "steps": args.steps,
                      "tokens_per_s": {f"{v}{' busy' if b else ''}": round(t, 1) for (v, b), t in best.items()},
                      "after_threads": labels["after"], "after_vs_before_alone": round(after_vs_before_alone, 3),
                      "after_vs_before_busy": round(after_vs_before_busy, 3)}))


if __name__ == "__main__":
    main()
