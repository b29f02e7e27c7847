"""`pakar estimate` and the estimate line of `train`: the report's keys and arithmetic, token counts
against a real prepare and a real epoch, the sampled count against the true one, one-line errors,
the peak-memory reader against a known allocation, and bench_gpu.py's code run on a CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pakar.estimate
from pakar.cli import main as cli_main
from pakar.data import BatchLoader, prepare
from pakar.info import human_duration
from pakar.runtime import PeakMemory
from pakar.train import TrainArgs, train

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("tokens_per_epoch", "tokens_per_second", "seconds_per_epoch", "seconds_total", "peak_memory_bytes",
        "predicted_peak_bytes", "memory_plan", "device", "tokens_method", "mfu", "reference_gpus")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_estimate_counts_exactly_from_the_cache_and_matches_a_real_epoch(tmp_path, capsys, monkeypatch):
    """With the token cache in --out, the count is the shards' own; tokens per epoch and steps equal
    what a real one-epoch train run then trains on, and train's log carries the estimate line."""
    import tempfile

    out, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    tok, data = prepare(None, out, vocab_size=512, val_fraction=0.05, log=lambda m: None)
    rc, stdout, _ = run_cli(capsys, "estimate", "--config", "tiny", "--seq-len", "32", "--batch", "2",
                            "--vocab-size", "512", "--out", str(out), "--device", "cpu", "--steps", "2",
                            "--epochs", "3", "--json")
    assert rc == 0
    r = json.loads(stdout)
    assert all(k in r for k in KEYS)
    assert r["tokens_method"].startswith("exact")
    assert r["corpus_tokens"] == len(data.train) + len(data.val)
    loader = BatchLoader(data.train, 2, 32, seed=0)
    assert r["steps_per_epoch"] == loader.steps_per_epoch and r["tokens_per_epoch"] == loader.steps_per_epoch * 64
    assert r["total_steps"] == 3 * r["steps_per_epoch"]
    assert math.isclose(r["seconds_per_epoch"], r["tokens_per_epoch"] / r["tokens_per_second"], rel_tol=1e-9)
    assert math.isclose(r["seconds_total"], 3 * r["seconds_per_epoch"] + r["first_step_overhead_seconds"], rel_tol=1e-9)
    assert r["peak_memory_bytes"] > 0 and r["predicted_peak_bytes"] > 0 and r["device"] == "cpu"
    assert r["mfu"] is None  # no known peak on a CPU
    for g in r["reference_gpus"]:  # the FLOP arithmetic, recomputed
        flop_s = r["tokens_per_epoch"] * r["train_flops_per_token"] / (g["peak_tflops"] * 1e12 * g["mfu"])
        assert math.isclose(g["seconds_per_epoch"], flop_s, rel_tol=1e-9)
    assert not list(scratch.glob("pakar-estimate-*"))  # the temporary run folder is gone

    summary = train(TrainArgs(config="tiny", seq_len=32, batch=2, vocab_size=512, out=str(out), device="cpu",
                              val_fraction=0.05, eval_tokens=256, save_every=0, log_every=1000))
    assert summary["tokens_seen"] == r["tokens_per_epoch"] and summary["steps"] == r["steps_per_epoch"]
    log = (out / "training.log").read_text(encoding="utf-8")
    assert "estimate: ≈ " in log and "per epoch on this device" in log
    rec = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    est = [x for x in rec if x["kind"] == "estimate"]
    assert len(est) == 1 and est[0]["step"] == 4
    assert math.isclose(est[0]["seconds_per_epoch"], r["tokens_per_epoch"] / est[0]["tokens_per_s"], rel_tol=1e-9)


def test_sampled_count_is_close_to_the_true_count(shared_data, tmp_path, monkeypatch):
    """id_general (3.7 MB) sampled at 1 MB, with a BPE trained on the sample, against prepare's real
    count with the real tokenizer: within 5% (head-of-file sampling and a tokenizer trained on a
    quarter of the text; measured 0.3% at the default 2 MB sample)."""
    monkeypatch.setattr(pakar.estimate, "SAMPLE_BYTES", 1_000_000)
    args = TrainArgs(data=[str(shared_data / "id_general")], out=str(tmp_path / "run"))
    count = pakar.estimate.count_tokens(args, tmp_path / "sample", log=lambda m: None)
    assert count.method.startswith("estimated") and "trained on the sample" in count.method
    _, data = prepare(args.data, tmp_path / "run", log=lambda m: None)
    true = len(data.train)
    assert abs(count.train_tokens - true) / true < 0.05, (count.train_tokens, true)
    # with the run's own tokenizer now present (but the cache made for another split), it is used
    count2 = pakar.estimate.count_tokens(TrainArgs(data=args.data, out=args.out, val_fraction=0.02),
                                         tmp_path / "sample2", log=lambda m: None)
    assert "tokenizer.json" in count2.method and count2.method.startswith("estimated")


def test_sample_corpus_takes_each_file_in_proportion_and_reads_gzip(tmp_path):
    import gzip

    a, b = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    a.write_text("".join(f"line {i} of a\n" for i in range(3000)))
    text_b = "".join(f"baris {i} dari b\n" for i in range(1000))
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write(text_b)
    files, total, sampled = pakar.estimate.sample_corpus([a, b], tmp_path / "s", 6000)
    assert total == a.stat().st_size + len(text_b.encode())
    assert [f.name for f in files] == ["00000-a.txt", "00001-b.txt"]
    sizes = [f.stat().st_size for f in files]
    assert sum(sizes) == sampled and all(f.read_bytes().endswith(b"\n") for f in files)
    share_a = a.stat().st_size / total
    assert abs(sizes[0] / sampled - share_a) < 0.02  # in proportion to the file sizes
    assert files[1].read_text(encoding="utf-8").startswith("baris 0 dari b\n")


@pytest.mark.parametrize("argv, needle", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--steps", "0"], "--steps 0"),
    (["--resume"], "--resume does not apply"),
    (["--config", "huge"], "unknown --config"),
    (["--memory-plan", "auto", "--seq-len", "4"], "--seq-len"),
])
def test_bad_input_is_a_one_line_error(capsys, tmp_path, argv, needle):
    rc, stdout, err = run_cli(capsys, "estimate", "--out", str(tmp_path), *argv)
    assert rc == 2 and stdout == "" and err.startswith("error:") and needle in err
    assert len(err.strip().splitlines()) == 1


def test_peak_memory_sees_a_known_allocation():
    """A 256 MiB tensor, written so its pages are resident, is seen as a 256 MiB peak increase even
    after it is freed (Linux: the resettable high-water mark)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the resettable peak is Linux's; elsewhere an earlier peak can hide the increase")
    peak = PeakMemory(torch.device("cpu"))
    peak.start()
    x = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
    del x
    inc = peak.increase()
    assert 0.95 * 2**28 <= inc <= 1.5 * 2**28, inc


def test_human_duration():
    assert [human_duration(s) for s in (4.4, 59.4, 61, 3600 * 3 + 600, 7200, 86400 * 4 + 3600 * 6, 86400)] == \
        ["4 s", "59 s", "1 min", "3 h 10 min", "2 h", "4 d 6 h", "1 d"]


def test_bench_gpu_runs_its_code_on_a_cpu(capsys):
    """bench_gpu.py's parts (matmul peak, the big run and the seed command through the training code,
    every memory plan against its prediction, transformers' step) on a CPU with tiny settings."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    rc = bench_gpu.main(["--device", "cpu", "--config", "tiny", "--seq-len", "32", "--batch", "2",
                         "--seed-batch", "2", "--seed-seq-len", "32", "--caps-gib", "", "--matmul-n", "128",
                         "--steps", "1", "--warmup", "1", "--plan-steps", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and report["matmul_bf16_tflops"] > 0
    assert report["big_run"]["tokens_per_s"] > 0 and 0 < report["big_run"]["mfu"]
    assert report["seed_command"]["memory_plan"] == "full"  # tiny fits anywhere: auto takes the fastest
    assert [r["plan"] for r in report["plans"]] == ["full", "lowmem", "offload"] and all(r["ran"] for r in report["plans"])
    assert report["transformers"]["pakar_over_transformers"] > 0


def test_bench_gpu_says_why_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    assert bench_gpu.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_big_models_are_extrapolated_from_one_and_two_layers(tmp_path, capsys, monkeypatch):
    """With the thresholds lowered, small (6 layers) takes the probe path: the report says so, its
    speed is the line through the 1- and 2-layer probes' step times, and its parameter count is the
    full model's (counted on a real one)."""
    monkeypatch.setattr(pakar.estimate, "PROBE_PARAMS", 0)
    monkeypatch.setattr(pakar.estimate, "FULL_BUDGET_S", 0.0)
    rc, stdout, err = run_cli(capsys, "estimate", "--config", "small", "--seq-len", "32", "--batch", "2",
                              "--vocab-size", "512", "--out", str(tmp_path), "--device", "cpu", "--steps", "1",
                              "--json")
    r = json.loads(stdout)
    from pakar.config import get_config
    from pakar.model import Transformer

    assert rc == 0 and r["speed_method"].startswith("time and memory extrapolated to 6 layers")
    assert "extrapolating from 1 and 2 layers" in err
    t1, t2 = r["probe_step_seconds"]
    assert math.isclose(r["tokens_per_second"], 64 / (t1 + 5 * max(t2 - t1, 0.0)), rel_tol=1e-9)
    full = Transformer(get_config("small", vocab_size=r["vocab_size"]))
    assert r["parameters"] == sum(p.numel() for p in full.parameters())
