"""Does the MoE pay? pakar's MoE preset against its dense twin (`NAME-dense`: the same attention, one
SwiGLU MLP of the active width, the same training FLOPs per token) at equal wall-clock time.

Everything but the feed-forward is shared: the tokenizer (trained once on the corpus' training
documents), the data (`../shared/data/id_general/`, all of it; the held-out slice is pakar's own
content-hashed validation split, --val-fraction of the documents, identical in every run), the batch,
the sequence length, and the same wall-clock budget per run (--seconds). Each model gets the same
learning-rate sweep (--lrs, at least 3) and the same seeds (--seeds, 2 by default). "Wall clock" is
training time: the held-out evaluations are left out of each budget (the same slice for both models;
counted in, they would charge the MoE's slower forward to its training).

Each run is pakar's own training, `pakar.train.train()` with --time-limit, so the benchmark measures
what `pakar train` does. So that the cosine schedule ends when the time does, each model's step time is
first measured (its real training step, the two models interleaved in this process so that load from
other programs hits both alike) and --max-steps set to what fits the budget; --time-limit (the
budget plus the evaluations' measured forward time) stays as a hard stop. The run evaluates the
held-out slice --evals times along the way and once at the end; the curves' x axes are training
seconds (wall clock minus the evaluations' own time, from metrics.jsonl) and training FLOPs (tokens
seen x pakar.info.train_flops_per_token). Each run's training seconds are printed, so an unequal
split (a machine whose load changed mid-run) shows.

Prints a table of every run, the final figures (best learning rate per model by the mean over seeds,
then each seed), writes a PNG (held-out bits per byte against training seconds and against training
FLOPs), and prints one JSON object on its last line: moe_bpb, dense_bpb (means over seeds at each
model's best learning rate), seconds_each, moe_lr, dense_lr, moe_bpb_per_seed, dense_bpb_per_seed,
moe_tokens_per_s, dense_tokens_per_s, moe_wins_every_seed, runs (every run's figures).

`--breakdown` instead times where a training step's time goes, the MoE against the dense twin,
interleaved, fastest of --reps: the whole step (forward, backward, AdamW), the feed-forward block of
one layer alone (forward + backward) and, inside the MoE block, routing, the sort and gather, the
expert matmuls and the scatter/combine, and the optimizer step.

Threads and OpenMP wait policy are pakar train's (`--threads N` as there; default all cores, PASSIVE).
Default: `small`, 3 learning rates x 2 seeds x 2 models x 75 s, about 20 minutes on a quiet 2-core CPU.

`--paired` trains the two models of each (learning rate, seed) at the same time instead, each in its
own spawned process with one thread, pinned to its own core where the OS allows (Linux): both see the
same machine at the same moments (memory bandwidth and other programs included), each measures its
step time at the same time as the other to fit its --max-steps, and the comparison takes half the wall
time. `--schedule wsd` holds the peak rate until the last 20% of each run, so the curves' earlier
points compare the models at the same learning rate; a long paired WSD run shows whether and when the
curves cross (README, "Does the MoE pay?").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "id_general"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small", help="MoE preset; its dense twin is CONFIG-dense (default small)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="corpus folder or file (default ../shared/data/id_general)")
    p.add_argument("--seconds", type=float, default=75.0, help="wall-clock budget per training run, seconds (default 75)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3], help="peak learning rates swept "
                   "for each model (default 1.5e-3 3e-3 6e-3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds (default 1 2)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer size (default 8192)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="training precision (default float32, pakar train's CPU default; bfloat16 = autocast)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="held-out share of documents (default 0.02)")
    p.add_argument("--evals", type=int, default=3, help="held-out evaluations during each run, besides the final one "
                   "(default 3)")
    p.add_argument("--out", default=None, help="work folder for the runs (default: a temporary folder)")
    p.add_argument("--png", default="moe_vs_dense.png", help="plot file (default moe_vs_dense.png)")
    p.add_argument("--paired", action="store_true", help="train the two models of each (lr, seed) at the same time, "
                   "one process with one thread each (pinned to its own core where the OS allows), instead of one "
                   "after the other with all threads: the same machine state for both, half the wall time")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "wsd"],
                   help="learning-rate schedule (default cosine; wsd holds the peak until the last 20%%, so the "
                        "curves' earlier points compare at the same learning rate)")
    p.add_argument("--breakdown", action="store_true", help="time the parts of a training step instead")
    p.add_argument("--reps", type=int, default=8, help="--breakdown repetitions (default 8)")
    args = p.parse_args(argv)
    if len(args.lrs) < 1 or len(args.seeds) < 1 or args.seconds <= 0:
        p.error("need at least one --lrs value, one --seeds value and --seconds > 0")
    return args


# --- timing ------------------------------------------------------------------------------------------

def step_seconds(configs: list[str], vocab: int, batch: int, seq_len: int, reps: int = 3,
                 dtype: str = "float32", forward_too: bool = False):
    """The fastest of `reps` real training steps (pakar's loss path, AdamW) of each config, interleaved;
    with forward_too also the fastest evaluation forward of the same batch: ({name: s}, {name: s})."""
    import torch

    from pakar.config import get_config
    from pakar.model import Transformer
    from pakar.memory import make_optimizer

    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len))
    runs = {}
    for name in configs:
        model = Transformer(get_config(name, vocab_size=vocab, max_position_embeddings=max(seq_len, 1024)))
        runs[name] = (model, make_optimizer(model, "full", 1e-4, 0.1, torch.device("cpu")))

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step(name):
        model, opt = runs[name]
        with amp:
            out = model(x, x, return_logits=False)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward(name):
        model = runs[name][0].eval()
        with amp:
            model(x)
        model.train()

    best = {name: float("inf") for name in configs}
    fwd = {name: float("inf") for name in configs}
    for name in configs:
        step(name)  # warm-up: allocations, kernel selection
    for _ in range(reps):
        for name in configs:
            t = time.perf_counter()
            step(name)
            best[name] = min(best[name], time.perf_counter() - t)
            if forward_too:
                t = time.perf_counter()
                forward(name)
                fwd[name] = min(fwd[name], time.perf_counter() - t)
    return (best, fwd) if forward_too else best


def breakdown(args) -> dict:
    """Where the step time goes, MoE against dense (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from pakar.config import get_config
    from pakar.kernels import compute_dtype, scatter_rows
    from pakar.model import MLP
    from pakar.moe import MoE, combine

    moe_name, dense_name = args.config, f"{args.config}-dense"
    full = step_seconds([moe_name, dense_name], args.vocab_size, args.batch, args.seq_len, args.reps, args.dtype)
    cfg = get_config(moe_name, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    moe, mlp = MoE(cfg), MLP(get_config(dense_name, vocab_size=args.vocab_size))
    for p in [*moe.parameters(), *mlp.parameters()]:
        torch.nn.init.normal_(p, 0.0, 0.02)
    N, D, E, K = args.batch * args.seq_len, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok
    x0 = torch.randn(N, D)

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def ffn(module):
        x = x0.clone().requires_grad_()
        with amp:
            out = module(x.view(1, N, D))
        y, extra = (out[0], 0.01 * out[1] + 0.001 * out[2]) if isinstance(out, tuple) else (out, 0.0)
        (y.square().mean() + extra).backward()

    # the MoE block's forward, part by part (the same code as MoE.forward), with autograd on
    def parts():
        with amp:
            return _parts()

    def _parts():
        t = {}
        x = x0.clone().requires_grad_()
        t0 = time.perf_counter()
        logits, probs, idx, w = moe.gate(x)
        t1 = time.perf_counter()
        expert_M, order_M = torch.sort(idx.reshape(-1), stable=True)
        offsets = torch.searchsorted(expert_M, torch.arange(E), right=True)
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        x_MD = x.to(compute_dtype(x))[order_M // K]
        t2 = time.perf_counter()
        y_MD = moe.experts(x_MD, counts, offsets.to(torch.int32))
        t3 = time.perf_counter()
        y = combine(scatter_rows(y_MD, order_M, y_MD.shape[0]).view(-1, K, D), w.to(y_MD.dtype)).float()
        t4 = time.perf_counter()
        balance = E * (counts.float() / expert_M.numel() * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        t5 = time.perf_counter()
        (y.square().mean() + 0.01 * balance + 0.001 * z).backward()
        t6 = time.perf_counter()
        return {"router": t1 - t0, "sort+gather": t2 - t1, "experts": t3 - t2, "scatter+combine": t4 - t3,
                "aux losses": t5 - t4, "backward (all parts)": t6 - t5}

    def optimizer_step(params):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        t = time.perf_counter()
        opt.step()
        return time.perf_counter() - t

    best = {"moe_ffn": float("inf"), "dense_ffn": float("inf")}
    part_best: dict[str, float] = {}
    ffn(moe), ffn(mlp), parts()
    for _ in range(args.reps):
        for key, module in (("moe_ffn", moe), ("dense_ffn", mlp)):
            t = time.perf_counter()
            ffn(module)
            best[key] = min(best[key], time.perf_counter() - t)
        for k, v in parts().items():
            part_best[k] = min(part_best.get(k, float("inf")), v)
    from pakar.model import Transformer

    opt_s = {}
    for name in (moe_name, dense_name):
        with torch.device("cpu"):
            params = list(Transformer(get_config(name, vocab_size=args.vocab_size)).parameters())
        opt_s[name] = min(optimizer_step(params) for _ in range(3))
    res = {"step_s": {moe_name: full[moe_name], dense_name: full[dense_name]},
           "ffn_layer_fwd_bwd_s": best, "moe_parts_s": part_best, "adamw_step_s": opt_s,
           "threads": torch.get_num_threads(), "tokens_per_step": N, "dtype": args.dtype}
    print(f"training step ({N} tokens, {args.dtype}, fastest of {args.reps}, interleaved, "
          f"{torch.get_num_threads()} threads):")
    for name in (moe_name, dense_name):
        print(f"  {name:16s} {full[name] * 1e3:8.1f} ms  ({N / full[name]:,.0f} tokens/s)")
    print(f"  MoE / dense: {full[moe_name] / full[dense_name]:.3f}")
    print("one layer's feed-forward, forward + backward:")
    print(f"  MoE {best['moe_ffn'] * 1e3:.1f} ms, dense {best['dense_ffn'] * 1e3:.1f} ms "
          f"({best['moe_ffn'] / best['dense_ffn']:.3f}x)")
    print("  MoE parts (fastest of each): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in part_best.items()))
    print(f"AdamW step: {moe_name} {opt_s[moe_name] * 1e3:.1f} ms, {dense_name} {opt_s[dense_name] * 1e3:.1f} ms "
          f"(it scales with all parameters, not the active ones)")
    return res


# --- the comparison -----------------------------------------------------------------------------------

def read_curve(run_dir: Path, flops_per_token: int) -> list[dict]:
    """The run's held-out evaluations: step, training seconds (wall clock minus earlier evaluations'
    time), training FLOPs, bits per byte."""
    curve, eval_time = [], 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "val":
            continue
        train_s = rec["elapsed"] - eval_time - rec["eval_seconds"]  # this record's time includes its evaluation
        eval_time += rec["eval_seconds"]
        curve.append({"step": rec["step"], "train_seconds": round(train_s, 2),
                      "flops": rec["tokens_seen"] * flops_per_token, "bpb": rec["bits_per_byte"]})
    return curve


def one_run(args, name: str, lr: float, seed: int, max_steps: int, limit_s: float, tokenizer, work: Path) -> dict:
    from pakar.info import train_flops_per_token
    from pakar.config import get_config
    from pakar.train import TrainArgs, train

    out = work / f"{name}_lr{lr:g}_seed{seed}"
    targs = TrainArgs(config=name, data=[args.data], out=str(out), batch=args.batch, seq_len=args.seq_len,
                      lr=lr, seed=seed, epochs=100, max_steps=max_steps, time_limit=limit_s / 60,
                      schedule=args.schedule,
                      eval_every=max(1, max_steps // (args.evals + 1)) if args.evals else 0, save_every=0,
                      log_every=50, val_fraction=args.val_fraction, device="cpu", dtype=args.dtype,
                      overwrite=True)
    with open(work / f"{out.name}.log", "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        summary = train(targs, tokenizer=tokenizer)
    cfg = get_config(name, vocab_size=tokenizer.vocab_size)
    curve = read_curve(out, train_flops_per_token(cfg, args.seq_len))
    train_s = curve[-1]["train_seconds"] if curve else summary["seconds"]
    return {"config": name, "lr": lr, "seed": seed, "max_steps": max_steps, "steps": summary["steps"],
            "seconds": summary["seconds"], "train_seconds": train_s, "tokens_seen": summary["tokens_seen"],
            # training tokens per second of training time (the evaluations' time left out)
            "tokens_per_s": round(summary["tokens_seen"] / max(train_s, 1e-9), 1), "final_bpb": summary["val_bpb"],
            "stopped": summary["stopped"], "curve": curve}


def fit_plan(args, step_s: float, fwd_s: float, val_tokens: int) -> tuple[int, float]:
    """(--max-steps, --time-limit in seconds) for a run of args.seconds of training: --max-steps fills
    the budget at the measured step time (so the schedule ends with it, 3% spare for the loop's own
    work), and --time-limit, which also counts the evaluations (the loop's clock), gets their estimated
    time on top: (evals + 1) passes over the held-out slice."""
    val_batches = val_tokens / (args.batch * args.seq_len)
    return max(2, int(0.97 * args.seconds / step_s)), args.seconds + (args.evals + 1) * val_batches * fwd_s


def paired_child(args, name: str, lr: float, seed: int, core: int | None, work: Path) -> dict:
    """One run of --paired, in its own spawned process: one thread, pinned to `core` where the OS
    allows (Linux), its step time measured here, at the same time as the other model's, so both
    plans see the same machine."""
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    import torch

    from pakar.data import prepare

    torch.set_num_threads(1)
    tokenizer, tokens = prepare([args.data], work / "shared", vocab_size=args.vocab_size,
                                val_fraction=args.val_fraction, log=lambda m: None)  # cached: the parent made it
    secs, fwd = step_seconds([name], tokenizer.vocab_size, args.batch, args.seq_len, dtype=args.dtype, forward_too=True)
    max_steps, limit = fit_plan(args, secs[name], fwd[name], len(tokens.val))
    return one_run(args, name, lr, seed, max_steps, limit, tokenizer, work) | {"step_s_measured": secs[name]}


def plot(runs: list[dict], best: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {}
    for r in runs:
        if r["lr"] != best[r["config"]]:
            continue
        color = colors.setdefault(r["config"], f"C{len(colors)}")
        style = "-" if r["seed"] == min(x["seed"] for x in runs) else "--"
        label = f"{r['config']} lr {r['lr']:g} seed {r['seed']}"
        xs_t = [c["train_seconds"] for c in r["curve"]]
        xs_f = [c["flops"] for c in r["curve"]]
        ys = [c["bpb"] for c in r["curve"]]
        axes[0].plot(xs_t, ys, style, color=color, marker="o", label=label)
        axes[1].plot(xs_f, ys, style, color=color, marker="o", label=label)
    axes[0].set_xlabel("training wall-clock seconds (evaluations excluded)")
    axes[1].set_xlabel("training FLOPs")
    axes[1].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    for ax in axes:
        ax.set_ylabel("held-out bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(args) -> dict:
    import tempfile

    from pakar.data import prepare

    moe_name, dense_name = args.config, f"{args.config}-dense"
    work_ctx = tempfile.TemporaryDirectory(prefix="pakar_moe_vs_dense_") if args.out is None else None
    work = Path(args.out or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    # one tokenizer for every run, trained on the training documents (prepare keeps the split's rule)
    tokenizer, tokens = prepare([args.data], work / "shared", vocab_size=args.vocab_size,
                                val_fraction=args.val_fraction, log=lambda m: None)
    if args.paired:
        secs = None  # each child measures its own step, at the same time as the other's
        print(f"{moe_name} vs {dense_name}, paired (both at once, one thread each): {args.seconds:g} s of training "
              f"per run, lrs {args.lrs}, seeds {args.seeds}, batch {args.batch} x {args.seq_len}, {args.schedule}, "
              f"{len(tokens.val):,} held-out tokens", flush=True)
    else:
        secs, fwd = step_seconds([moe_name, dense_name], tokenizer.vocab_size, args.batch, args.seq_len,
                                 dtype=args.dtype, forward_too=True)
        plan = {name: fit_plan(args, secs[name], fwd[name], len(tokens.val)) for name in secs}
        print(f"{moe_name} vs {dense_name}: {args.seconds:g} s of training per run, lrs {args.lrs}, seeds "
              f"{args.seeds}, batch {args.batch} x {args.seq_len}, {args.schedule}, {len(tokens.val):,} held-out "
              f"tokens; measured step {', '.join(f'{n} {s:.3f} s' for n, s in secs.items())} -> --max-steps "
              f"{ {n: m for n, (m, _) in plan.items()} }, --time-limit "
              f"{', '.join(f'{n} {t:.0f} s' for n, (_, t) in plan.items())}", flush=True)
    runs = []

    def report(r):
        runs.append(r)
        print(f"  {r['config']:14s} lr {r['lr']:<8g} seed {r['seed']}: {r['steps']:5d} steps, {r['train_seconds']:6.1f} s "
              f"training ({r['seconds']:.1f} s with evaluations), {r['tokens_per_s']:8,.0f} tok/s, held-out bpb "
              f"{r['final_bpb']:.4f} ({r['stopped']})", flush=True)

    order = 0
    for seed in args.seeds:
        for lr in args.lrs:
            pair = [moe_name, dense_name] if order % 2 == 0 else [dense_name, moe_name]  # alternate who goes first
            order += 1
            if args.paired:
                with mp.get_context("spawn").Pool(2) as pool:  # spawn: what Windows does anyway
                    jobs = [pool.apply_async(paired_child, (args, name, lr, seed, core, work))
                            for core, name in enumerate(pair)]
                    for job in jobs:
                        report(job.get())
                    pool.close()  # let the workers exit on their own (terminate would leak their semaphores)
                    pool.join()
            else:
                for name in pair:
                    report(one_run(args, name, lr, seed, *plan[name], tokenizer, work))

    def final(name, lr):
        return [r["final_bpb"] for r in runs if r["config"] == name and r["lr"] == lr]

    best = {name: min(args.lrs, key=lambda lr: statistics.mean(final(name, lr))) for name in (moe_name, dense_name)}
    per_seed = {name: final(name, best[name]) for name in best}
    tps = {name: statistics.mean(r["tokens_per_s"] for r in runs if r["config"] == name) for name in best}
    print("final held-out bits per byte at each model's best learning rate (mean over seeds):")
    for name in (moe_name, dense_name):
        print(f"  {name:14s} lr {best[name]:g}: {statistics.mean(per_seed[name]):.4f} "
              f"(seeds: {', '.join(f'{b:.4f}' for b in per_seed[name])}), {tps[name]:,.0f} tokens/s")
    wins = all(m < d for m, d in zip(per_seed[moe_name], per_seed[dense_name]))
    png = Path(args.png)
    plot(runs, best, png, f"pakar {moe_name} vs {dense_name}, {args.seconds:g} s of training per run"
                          f"{' (paired: both at once, one core each)' if args.paired else ''}, {args.schedule}, best "
                          f"lr of {args.lrs} each, seeds {args.seeds}")
    print(f"plot: {png}")
    if work_ctx is not None:
        work_ctx.cleanup()
    return {"moe_config": moe_name, "dense_config": dense_name,
            "moe_bpb": round(statistics.mean(per_seed[moe_name]), 5),
            "dense_bpb": round(statistics.mean(per_seed[dense_name]), 5),
            "seconds_each": args.seconds, "moe_lr": best[moe_name], "dense_lr": best[dense_name],
            "moe_bpb_per_seed": per_seed[moe_name], "dense_bpb_per_seed": per_seed[dense_name],
            "moe_tokens_per_s": round(tps[moe_name], 1), "dense_tokens_per_s": round(tps[dense_name], 1),
            "moe_wins_every_seed": wins, "paired": args.paired, "schedule": args.schedule, "seeds": args.seeds,
            "lrs": args.lrs, "batch": args.batch, "seq_len": args.seq_len, "dtype": args.dtype,
            "step_seconds_measured": secs or {name: statistics.mean(r["step_s_measured"] for r in runs
                                                                    if r["config"] == name) for name in best},
            "png": str(png),
            "runs": [{k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"]} for r in runs]}


def main(argv=None) -> int:
    from pakar.runtime import configure_threads  # before torch loads: pakar train's threads and wait policy

    args = parse_args(configure_threads(list(sys.argv[1:] if argv is None else argv)))
    res = breakdown(args) if args.breakdown else compare(args)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
