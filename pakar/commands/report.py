"""`pakar report RUN_DIR`: rebuild a run's report.md and curves from its metrics.jsonl.

Standard library only before the flags are parsed; pakar.report itself needs no torch either (the
images need matplotlib, the optional `plot` extra), so it works on a machine that only holds the run
folder, and on a run that crashed or was killed.
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Rebuild the report card (report.md) and the curves "
                                "(curves/*.png) of a training or fine-tuning run from its metrics.jsonl: settings, "
                                "data, tokens seen, wall time, final and best validation (loss, bits per byte, "
                                "perplexity), expert use, samples, and the seed's promised losses against this "
                                "run's. Works on a run that is still going, crashed or was killed.")
    p.add_argument("run_dir", nargs="?", default=".", metavar="RUN_DIR",
                   help="the run folder (pakar train/finetune --out; default: the current folder)")
    p.add_argument("--json", action="store_true", help="print the report's figures as one JSON object, last")
    args = p.parse_args(argv)
    from pakar.report import write_report  # lazy: after the flags (it imports no torch; matplotlib when drawing)

    res = write_report(args.run_dir)
    print(f"report: {res['report']} ({res['status']}, step {res['steps']:,}"
          + (f", final validation {res['final_val']['loss']:.4f} nats/token" if res["final_val"] else "")
          + (f", {res['final_val']['bits_per_byte']:.4f} bits/byte" if res["final_val"]
             and res["final_val"]["bits_per_byte"] is not None else "") + ")")
    for c in res["curves"]:
        print(f"curve: {c}")
    if args.json:
        print(json.dumps(res))
    return 0
