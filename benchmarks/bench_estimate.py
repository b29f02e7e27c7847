"""`pakar estimate` against the run it estimates (issue 12's acceptance): wall time within 15%, memory
within 20%, on this CPU.

1. `pakar estimate --config small --data ../shared/data/id_general/ --seq-len 256 --batch 8
   --max-steps 200 --json` in a fresh run folder (so the token count is the sampled estimate, as a
   user's first call would be), in its own process.
2. The same run for real, in its own process: `pakar prepare`'s work first (pakar.data.prepare with
   train's settings: the tokenizer and the token cache train would make; not what is compared), then
   pakar.train.train with --max-steps 200, the peak resident-set increase measured around it
   (pakar.runtime.PeakMemory, from before the model is built: at the end of the training steps, read
   when metrics.jsonl records the last step, and at the end of the run, its end-of-run validation and
   checkpoints included).
3. Prints predicted against measured, with ratios: training time (the estimate's seconds_total
   against train's own summary "seconds", the loop's time: the steps, with no evaluation or save
   inside 200 steps at the default --save-every 200 and --eval-every 0; the end-of-run validation and
   save come after it), peak memory (memory.predict's peak_bytes and the estimate's own measured peak
   against the run's at the end of its steps; the prediction also against the whole run's), and the
   tokens per epoch (sampled estimate against the shards' count). The
   last line is one JSON object.

Run on a quiet machine (figures taken under load say little):
    python benchmarks/bench_estimate.py                     # small, 200 steps: about 6-8 min
    python benchmarks/bench_estimate.py --config tiny --steps 30 --batch 4 --seq-len 64   # smoke, ~1 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_json(cmd: list[str]) -> tuple[dict, float]:
    """Runs a command whose last stdout line is JSON; (that object, wall seconds)."""
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), wall


def child_train(a) -> int:
    """Step 2, in its own process: prepare, then train with the peak memory measured around it."""
    from pakar.runtime import configure_threads

    configure_threads([])  # the threads and OpenMP wait policy `pakar train` gets, before torch loads
    import torch

    from pakar.data import BatchLoader, prepare
    from pakar.runtime import PeakMemory
    from pakar.train import TrainArgs, train, val_fraction_of

    args = TrainArgs(config=a.config, data=[a.data], seq_len=a.seq_len, batch=a.batch, max_steps=a.steps,
                     out=a.out, device="cpu")
    _, tokens = prepare(args.data, args.out, vocab_size=args.vocab_size, val_fraction=val_fraction_of(args),
                        log=lambda m: print(m, file=sys.stderr))
    steps_per_epoch = BatchLoader(tokens.train, args.batch, args.seq_len, args.seed).steps_per_epoch
    del tokens
    peak = PeakMemory(torch.device("cpu"))
    peak.start()
    watch = StepsPeak(Path(args.out) / "metrics.jsonl", a.steps, peak)
    watch.start()
    summary = train(args)
    watch.stop.set()
    print(json.dumps({"summary": summary, "peak_rss_increase_bytes": peak.increase(),
                      "steps_peak_rss_increase_bytes": watch.value,
                      "tokens_per_epoch": steps_per_epoch * args.batch * args.seq_len}))
    return 0


class StepsPeak(threading.Thread):
    """The peak increase when the training steps are over: read as soon as metrics.jsonl holds the
    last step's record, before the end-of-run validation and checkpoints add theirs (Linux: the
    high-water mark is only read, so what comes later does not change it; polled every 20 ms)."""

    def __init__(self, metrics: Path, last_step: int, peak):
        super().__init__(daemon=True)
        self.metrics, self.last_step, self.peak = metrics, last_step, peak
        self.value, self.stop = None, threading.Event()

    def run(self) -> None:
        needle = f'"step": {self.last_step}, '
        while not self.stop.wait(0.02):
            try:
                text = self.metrics.read_text(encoding="utf-8")
            except OSError:
                continue
            if any(line.startswith('{"kind": "train"') and needle in line for line in text.splitlines()):
                self.value = self.peak.increase()
                return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "id_general"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of the real run (default 200)")
    p.add_argument("--out", default=None, help="run folder (default: a temporary one, deleted after)")
    p.add_argument("--child-train", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_train:
        return child_train(a)
    if not Path(a.data).exists():
        sys.exit(f"--data {a.data}: not found (the shared Indonesian corpus; see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        out = a.out or str(Path(tmp) / "run")
        common = ["--config", a.config, "--data", a.data, "--seq-len", str(a.seq_len), "--batch", str(a.batch)]
        est, est_wall = run_json([sys.executable, "-m", "pakar", "estimate", *common, "--max-steps", str(a.steps),
                                  "--out", out, "--device", "cpu", "--json"])
        print(f"estimate: {est_wall:.1f} s; {est['tokens_per_second']:,.0f} tokens/s, plan {est['memory_plan']}, "
              f"predicted {est['seconds_total']:.1f} s for {est['total_steps']} steps", file=sys.stderr)
        real, train_wall = run_json([sys.executable, str(Path(__file__).resolve()), "--child-train", *common,
                                     "--steps", str(a.steps), "--out", out])
    s = real["summary"]
    rows = {
        "train_seconds": (est["seconds_total"], s["seconds"]),
        "peak_memory_predicted": (est["predicted_peak_bytes"], real["steps_peak_rss_increase_bytes"]),
        "peak_memory_predicted_whole_run": (est["predicted_peak_bytes"], real["peak_rss_increase_bytes"]),
        "peak_memory_estimate_measured": (est["peak_memory_bytes"], real["steps_peak_rss_increase_bytes"]),
        "tokens_per_epoch": (est["tokens_per_epoch"], real["tokens_per_epoch"]),
        "tokens_per_second": (est["tokens_per_second"], s["tokens_per_s"]),
    }
    print(f"{'':32s}{'estimated':>16s}{'measured':>16s}{'ratio':>8s}")
    for name, (e, m) in rows.items():
        print(f"{name:32s}{e:16,.1f}{m:16,.1f}{e / m:8.3f}")
    report = {"config": a.config, "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps,
              "memory_plan": est["memory_plan"], "tokens_method": est["tokens_method"],
              "estimate_wall_seconds": round(est_wall, 2), "train_process_wall_seconds": round(train_wall, 2),
              **{f"{k}_estimated": e for k, (e, _) in rows.items()}, **{f"{k}_measured": m for k, (_, m) in rows.items()},
              **{f"{k}_ratio": round(e / m, 4) for k, (e, m) in rows.items()},
              "time_within_15pct": abs(est["seconds_total"] / s["seconds"] - 1) <= 0.15,
              "memory_within_20pct": abs(est["predicted_peak_bytes"] / real["steps_peak_rss_increase_bytes"] - 1) <= 0.20}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
