"""Start-up time of the command line (issue 18: answer at once when possible).

Times, in fresh interpreters, `pakar --help`, `pakar export --help`, `pakar export --bogus` (a usage
error), `pakar train --epochs x` and `python -c "import pakar"`, and prints min/median seconds of each
and one JSON object last. The target: help and usage errors in well under 2 s (before the command layer
they imported torch first: 5-30 s). tests/test_layout.py checks the behaviour behind it (torch is not
imported); this script only measures.

    python benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "pakar --help": ["-m", "pakar", "--help"],
    "pakar export --help": ["-m", "pakar", "export", "--help"],
    "pakar export --bogus": ["-m", "pakar", "export", "--bogus"],
    "pakar train --epochs x": ["-m", "pakar", "train", "--epochs", "x"],
    "import pakar": ["-c", "import pakar"],
}


def time_once(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="runs per case (default 5)")
    repeats = p.parse_args().repeats
    result = {}
    for name, args in CASES.items():
        times = [time_once(args) for _ in range(repeats)]
        result[name] = {"min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}
        print(f"{name:<26} min {min(times):6.3f} s   median {statistics.median(times):6.3f} s")
    print(json.dumps({"repeats": repeats, **result}))


if __name__ == "__main__":
    main()
