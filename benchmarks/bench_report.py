"""What the curves cost a training run: the time spent redrawing them at evaluations (pakar.report.
LiveCurves, throttled to about 5% of the wall time) against the training time, and the time of the
final report (curves + report.md) after the last step.

    python benchmarks/bench_report.py                     # tiny, 2 epochs on the embedded sample, eval every 10 steps
    python benchmarks/bench_report.py --config small --eval-every 50 --max-steps 400

Frequent evaluations are the worst case for plotting. Prints the figures, one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pakar.report as report  # noqa: E402
from pakar.train import TrainArgs, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    a = p.parse_args()
    spent = {"draw": 0.0, "draws": 0, "refresh_calls": 0, "report": 0.0}
    refresh, draw, write = report.LiveCurves.refresh, report.draw_curves, report.write_report

    def timed_refresh(self):
        spent["refresh_calls"] += 1
        t0 = time.perf_counter()
        refresh(self)
        spent["draw"] += time.perf_counter() - t0

    def counted_draw(*args, **kw):
        spent["draws"] += 1
        return draw(*args, **kw)

    def timed_write(*args, **kw):
        t0 = time.perf_counter()
        try:
            return write(*args, **kw)
        finally:
            spent["report"] += time.perf_counter() - t0

    report.LiveCurves.refresh, report.draw_curves = timed_refresh, counted_draw
    import pakar.train as train_mod

    train_mod.write_report = timed_write
    with tempfile.TemporaryDirectory() as tmp:
        s = train(TrainArgs(config=a.config, epochs=a.epochs, max_steps=a.max_steps, eval_every=a.eval_every,
                            batch=a.batch, seq_len=a.seq_len, out=str(Path(tmp) / "run"), device="cpu",
                            eval_tokens=2048, save_every=0, vocab_size=1024))
    res = {"config": a.config, "steps": s["steps"], "train_seconds": s["seconds"],
           "evaluations": spent["refresh_calls"], "curve_draws_during_training": spent["draws"] - 1,
           "curve_seconds_during_training": round(spent["draw"], 3),
           "curve_share_of_training": round(spent["draw"] / s["seconds"], 4),
           "final_report_seconds": round(spent["report"], 3)}
    print(f"{res['steps']} steps in {res['train_seconds']:.1f} s with {res['evaluations']} evaluations: curves drawn "
          f"{res['curve_draws_during_training']} times during training, {res['curve_seconds_during_training']:.2f} s "
          f"({100 * res['curve_share_of_training']:.1f}% of training); final report {res['final_report_seconds']:.2f} s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
