"""Memory plans on real text: `lowmem` and `offload` against `full`, same seed, same data (issue 12's
acceptance: final validation bits per byte within 1% of full's).

    python benchmarks/bench_plans.py [--config small] [--steps 300] [--batch 8] [--seq-len 256]
                                     [--data ../shared/data/id_general] [--plans full lowmem offload]

Each plan trains in a fresh `python -m pakar train` process on the CPU in float32 (--device cpu
--dtype float32, so the plans differ only in their optimizer: on a CPU lowmem keeps float32 weights
and 8-bit AdamW moments, offload a float32 master copy and moments on the host). The first plan's run
trains the tokenizer and tokenizes the data; the others start from a copy of its tokenizer.json and
token cache, so all of them see the same tokens in the same order. Printed per plan: final validation
loss and bits per byte (the run's own final validation, --eval-tokens), wall seconds, training
tokens/s, the process's peak RSS where the OS reports it, and the bits-per-byte difference from full;
the last line is one JSON object with "within_1pct" per plan. Timings are only comparable within one
run and are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_plan(plan: str, out: Path, a) -> dict:
    cmd = [sys.executable, "-m", "pakar", "train", "--config", a.config, "--data", a.data, "--out", str(out),
           "--max-steps", str(a.steps), "--batch", str(a.batch), "--seq-len", str(a.seq_len),
           "--memory-plan", plan, "--device", "cpu", "--dtype", "float32", "--seed", str(a.seed),
           "--eval-tokens", str(a.eval_tokens), "--save-every", "0", "--log-every", "50", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak_rss = None
    if hasattr(os, "wait4"):  # POSIX: this process's own peak RSS from its rusage
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak_rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    else:
        stdout = proc.communicate()[0]
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{plan}: training failed (exit {proc.returncode}):\n{stdout[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    plan_line = next((ln for ln in (out / "training.log").read_text().splitlines() if "memory plan" in ln), "")
    return {"val_loss": summary["val_loss"], "val_bpb": summary["val_bpb"], "seconds": round(wall, 1),
            "tokens_per_s": round(summary["tokens_per_s"], 1), "peak_rss_bytes": peak_rss, "plan_line": plan_line}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--steps", type=int, default=300)  # optimizer steps of --batch x --seq-len tokens
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-tokens", type=int, default=2**18)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "id_general"))
    p.add_argument("--plans", nargs="+", default=["full", "lowmem", "offload"])
    a = p.parse_args(argv)
    if not Path(a.data).exists():
        raise SystemExit(f"{a.data} not found (the shared Indonesian text; see ../shared/data/README.md)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_plans_") as tmp:
        first = None
        for plan in a.plans:
            out = Path(tmp) / plan
            if first is not None:  # the same tokenizer and token cache: the same batches in the same order
                out.mkdir()
                shutil.copy2(first / "tokenizer.json", out / "tokenizer.json")
                shutil.copytree(first / "data", out / "data")
            results[plan] = r = run_plan(plan, out, a)
            first = first or out
            print(f"{plan:8s} val loss {r['val_loss']:.4f} | bpb {r['val_bpb']:.4f} | {r['seconds']:.0f} s | "
                  f"{r['tokens_per_s']:,.0f} tok/s | {r['plan_line'].split('| ', 1)[-1]}", flush=True)
    ref = results.get("full")
    for plan, r in results.items():
        if ref is not None:
            r["bpb_vs_full"] = r["val_bpb"] / ref["val_bpb"] - 1
            r["within_1pct"] = abs(r["bpb_vs_full"]) <= 0.01
            verdict = "within" if r["within_1pct"] else "NOT within"
            print(f"{plan:8s} bpb vs full: {100 * r['bpb_vs_full']:+.2f}% ({verdict} 1%)")
    print(json.dumps({"config": a.config, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "plans": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
