"""GPU throughput at scale (issue 12, item 3): one script, one GPU, under 8 minutes, one JSON object.

Parts, all in the same process and run:
1. peak: a bf16 matmul (8192^3 on a GPU) timed with CUDA synchronisation; the MFU denominator.
2. default_seq1024: the `default` preset at seq-len 1024 in bf16 with the `full` plan (fused AdamW):
   tokens/s and MFU (pakar.info.train_flops_per_token / the measured matmul peak).
3. seed_command: the seed's `--config default --batch 2 --seq-len 256` with `--memory-plan auto`:
   tokens/s, measured peak (torch.cuda.max_memory_allocated) and the plan chosen.
4. plans: every memory plan under a simulated 12 GiB and 24 GiB card
   (torch.cuda.set_per_process_memory_fraction, with CUDA_CONTEXT left out of the cap since the
   allocator cap does not see it), the seed's command: measured allocator peak against
   pakar.memory.predict's peak less its CUDA-context term (what max_memory_allocated can see), and
   whether it ran or ran out of memory (the prediction says whether it should fit).
5. transformers: Qwen3MoeForCausalLM on the same config, batch and seq-len as part 2 (sdpa attention,
   its default experts implementation, bf16 autocast, fused AdamW, no host syncs), and the ratio.

pakar's parts run through the training loop's own code (pakar.estimate.measure_steps: open_run,
make_model, plan_run, train_step), so they include what a real run pays per step (its one host sync
for the loss and gradient norm, clipping, the router-bias update); the transformers step is a bare
forward/backward/step with no sync (its advantage). Data: random token ids (the speed of a step does
not depend on the text), a fixed vocabulary of the preset's size.

Without a CUDA GPU the script stops with a message; `--device cpu --config tiny --seq-len 64 --batch 2
--caps-gib ''` runs every part's code on a CPU as a smoke test (tests/test_estimate.py does), with no
memory caps (a CPU has no allocator cap to simulate).

Run on a GPU machine:  python benchmarks/bench_gpu.py            (add --compile to compile the blocks)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pakar import PakarError  # noqa: E402
from pakar.args import TrainArgs  # noqa: E402
from pakar.config import get_config  # noqa: E402
from pakar.data import TokenData  # noqa: E402
from pakar.estimate import CorpusCount, measure_steps  # noqa: E402
from pakar.memory import PLANS, predict  # noqa: E402


class FixedVocab:
    """The little of a tokenizer the training code reads (its size; bytes per token for bits per byte,
    which no timed step uses), so that the model has the preset's vocabulary without training a BPE."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def token_byte_lengths(self) -> list[int]:
        return [1] * self.vocab_size


def random_corpus(vocab_size: int, n_tokens: int, seed: int = 0) -> CorpusCount:
    rng = np.random.default_rng(seed)
    train = rng.integers(0, vocab_size, n_tokens, dtype=np.int64).astype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    tokens = TokenData(train=train, val=train[:0], manifest={"key": "random"}, dir=Path("."))
    return CorpusCount(n_tokens, 0, "random token ids", FixedVocab(vocab_size), tokens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, reps: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matmul, the best of `reps` timed groups of 5."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 5)
    return 2 * n**3 / best


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pakar_run(a, device: torch.device, batch: int, seq_len: int, plan: str, steps: int, warmup: int) -> dict:
    """tokens/s and peak memory of real training steps (pakar.estimate.measure_steps) on random tokens."""
    cfg = get_config(a.config)
    corpus = random_corpus(cfg.vocab_size, max(4 * batch * (seq_len + 1) * (warmup + steps), 1 << 16))
    args = TrainArgs(config=a.config, batch=batch, seq_len=seq_len, device=str(device), memory_plan=plan,
                     dtype="bfloat16" if device.type == "cuda" else "float32", compile=a.compile)
    free_device_memory(device)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        m = measure_steps(args, corpus, Path(tmp) / "run", steps, lambda msg: print(f"  {msg}", file=sys.stderr),
                          warmup=warmup)
    free_device_memory(device)
    return {"tokens_per_s": m["tokens_per_second"], "peak_memory_bytes": m["peak_memory_bytes"],
            "memory_plan": m["memory_plan"], "flops_per_token": m["flops_per_token"], "bf16": m["amp"] is not None,
            "step_s": m["step_seconds"]}


def hf_run(a, device: torch.device, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    """Qwen3MoeForCausalLM's training step on the same config: forward with labels (cross-entropy plus
    the router's auxiliary loss), backward, fused AdamW, zero_grad; timed with no host sync inside."""
    from hf_reference import hf_config_from_pakar  # the tests' config mapping (tests/ is on sys.path)
    from transformers import Qwen3MoeForCausalLM

    cfg = get_config(a.config)
    hc = hf_config_from_pakar(cfg.replace(max_position_embeddings=max(seq_len, cfg.max_position_embeddings)),
                              attn_implementation="sdpa")
    hc.output_router_logits = True  # include the auxiliary loss, as pakar does
    free_device_memory(device)
    torch.manual_seed(0)
    with device:  # initialised where it runs: a 1.6B-parameter init on the host would take a minute
        model = Qwen3MoeForCausalLM(hc).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g).to(device)
    bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # as pakar's step does
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t
    del model, opt
    free_device_memory(device)
    return {"tokens_per_s": batch * seq_len * steps / seconds, "step_s": seconds / steps}


def plans_under_caps(a, device: torch.device) -> list[dict]:
    """Every plan at the seed's batch and seq-len under each simulated card: measured against predicted."""
    cfg = get_config(a.config)
    bf16 = device.type == "cuda"
    rows = []
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    for cap_gib in a.caps_gib or [None]:
        for plan in PLANS:
            pred = predict(cfg, plan, a.seed_batch, a.seed_seq_len, device_type=device.type, bf16=bf16)
            visible = pred["peak_bytes"] - pred["breakdown"].get("cuda_context", 0)  # what the allocator sees
            row = {"plan": plan, "cap_gib": cap_gib, "predicted_peak_bytes": pred["peak_bytes"],
                   "predicted_allocator_bytes": visible, "predicted_fits": None}
            if cap_gib is not None:
                # the card's memory less the CUDA context the prediction counts: the allocator's share
                budget = cap_gib * 2**30 - pred["breakdown"].get("cuda_context", 0)
                row["predicted_fits"] = visible <= budget
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
            try:
                r = pakar_run(a, device, a.seed_batch, a.seed_seq_len, plan, a.plan_steps, 1)
                row.update(ran=True, measured_peak_bytes=r["peak_memory_bytes"], tokens_per_s=r["tokens_per_s"],
                           measured_over_predicted=r["peak_memory_bytes"] / visible)
            except (torch.OutOfMemoryError, PakarError) as e:  # a plan refused, or out of memory mid-step
                row.update(ran=False, error=str(e).splitlines()[0][:200])
            finally:
                if cap_gib is not None:
                    torch.cuda.set_per_process_memory_fraction(1.0, device)
            free_device_memory(device)  # after the except block: its traceback held the failed run's tensors
            print(f"  plan {plan} cap {cap_gib} GiB: {row}", file=sys.stderr)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    p.add_argument("--config", default="default", help="preset (default: default)")
    p.add_argument("--seq-len", type=int, default=1024, help="part 2's and 5's seq-len (default 1024)")
    p.add_argument("--batch", type=int, default=8, help="part 2's and 5's batch (default 8)")
    p.add_argument("--seed-batch", type=int, default=2, help="the seed command's batch (default 2)")
    p.add_argument("--seed-seq-len", type=int, default=256, help="the seed command's seq-len (default 256)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of parts 2, 3, 5 (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps before timing (default 3)")
    p.add_argument("--plan-steps", type=int, default=2, help="timed steps per plan in part 4 (default 2)")
    p.add_argument("--caps-gib", default="12,24", help="simulated card sizes in GiB, comma-separated (default 12,24)")
    p.add_argument("--matmul-n", type=int, default=8192, help="matmul size for the peak (default 8192)")
    p.add_argument("--compile", action="store_true", help="torch.compile pakar's blocks (parts 2-4)")
    p.add_argument("--skip-hf", action="store_true", help="leave out part 5")
    a = p.parse_args(argv)
    a.caps_gib = [float(x) for x in a.caps_gib.split(",") if x.strip()]
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu.py measures GPU throughput and there is no CUDA GPU here (PyTorch sees none). "
              "For a CPU smoke run of the same code: python benchmarks/bench_gpu.py --device cpu --config tiny "
              "--seq-len 64 --batch 2 --caps-gib '' --matmul-n 256", file=sys.stderr)
        return 2
    if a.caps_gib and not a.device.startswith("cuda"):
        print("--caps-gib needs a CUDA device (set_per_process_memory_fraction); pass --caps-gib ''", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    t_start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": a.config, "compile": a.compile}
    peak = matmul_peak(device, a.matmul_n)
    report["matmul_bf16_tflops"] = peak / 1e12
    print(f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", file=sys.stderr)

    big = pakar_run(a, device, a.batch, a.seq_len, "full", a.steps, a.warmup)
    big["mfu"] = big["tokens_per_s"] * big["flops_per_token"] / peak
    report["default_seq1024" if a.config == "default" and a.seq_len == 1024 else "big_run"] = {
        "batch": a.batch, "seq_len": a.seq_len, **big}
    print(f"{a.config} seq {a.seq_len} batch {a.batch}: {big['tokens_per_s']:,.0f} tok/s, MFU {100 * big['mfu']:.1f}%",
          file=sys.stderr)

    seed = pakar_run(a, device, a.seed_batch, a.seed_seq_len, "auto", a.steps, a.warmup)
    report["seed_command"] = {"batch": a.seed_batch, "seq_len": a.seed_seq_len, **seed}
    print(f"seed command: {seed['tokens_per_s']:,.0f} tok/s, peak {seed['peak_memory_bytes'] / 2**30:.2f} GiB "
          f"(plan {seed['memory_plan']})", file=sys.stderr)

    report["plans"] = plans_under_caps(a, device)
    ratios = [r["measured_over_predicted"] for r in report["plans"] if r.get("ran")]
    report["plans_worst_ratio"] = max(ratios, key=lambda r: abs(r - 1)) if ratios else None

    if not a.skip_hf:
        hf = hf_run(a, device, a.batch, a.seq_len, a.steps, a.warmup)
        report["transformers"] = {"batch": a.batch, "seq_len": a.seq_len, **hf,
                                  "pakar_over_transformers": big["tokens_per_s"] / hf["tokens_per_s"]}
        print(f"transformers: {hf['tokens_per_s']:,.0f} tok/s; pakar / transformers = "
              f"{big['tokens_per_s'] / hf['tokens_per_s']:.2f}x", file=sys.stderr)
    report["seconds"] = time.perf_counter() - t_start
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
