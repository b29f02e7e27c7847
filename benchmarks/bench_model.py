"""Training-step speed of pakar's model against Hugging Face's Qwen3MoeForCausalLM, on this CPU.

For each config (tiny, small by default) and each precision (float32; bfloat16 autocast with float32
weights), both implementations get the same config, the same batch and the same step: forward with
the loss (cross-entropy plus the router's auxiliary loss), backward, AdamW (fused) step, zero_grad.
pakar runs its training path (fused loss head: return_logits=False); Hugging Face runs its defaults
(sdpa attention, its default experts implementation: grouped_mm in transformers 5.x).

Timing: the machine is shared, so every repetition runs all variants back to back (interleaved) and
the figure kept is the fastest repetition of each (the least disturbed one); the median is printed
too. The matmul peak (2048^3, float32 and bfloat16) is measured the same way in the same run, and MFU
is tokens/s x training FLOPs per token (pakar.info.train_flops_per_token) / that peak.

`--ablations` also times pakar with one of its speed choices undone at a time (same model, same
interleaving), to show what each one buys: the fused loss head (return_logits=True instead), the
experts' row padding on the CPU in bfloat16 (Experts.row_bucket -> 1), and the RMSNorm autograd
function (plain F.rms_norm instead). `--compile` adds pakar with torch.compile'd blocks.

Prints a table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch.nn.functional as F  # noqa: E402

import pakar.model  # noqa: E402
import pakar.moe  # noqa: E402
from pakar.config import get_config  # noqa: E402
from pakar.info import train_flops_per_token  # noqa: E402
from pakar.model import Transformer  # noqa: E402

_ROW_BUCKET = pakar.moe.Experts.__dict__["row_bucket"]
_RMSNORM_FORWARD = pakar.model.RMSNorm.forward


def _plain_rmsnorm(self, x):
    return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


@contextlib.contextmanager
def ablation(name: str):
    """Undo one speed choice for the duration of a step (benchmark-only monkeypatching)."""
    if name == "no-row-padding":
        pakar.moe.Experts.row_bucket = staticmethod(lambda x: 1)
    elif name == "autograd-rmsnorm":
        pakar.model.RMSNorm.forward = _plain_rmsnorm
    try:
        yield
    finally:
        pakar.moe.Experts.row_bucket = _ROW_BUCKET
        pakar.model.RMSNorm.forward = _RMSNORM_FORWARD


ABLATIONS = ("unfused-head", "no-row-padding", "autograd-rmsnorm")

PRECISIONS = ("fp32", "bf16")


def amp(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def matmul_peak(precision: str, reps: int, n: int = 2048) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def make_steps(name: str, batch: int, seq_len: int, hf_experts: list[str], compile_: bool, ablations: bool,
               seed: int = 0):
    """{variant: step function} for one config; every step is forward + backward + AdamW."""
    cfg = get_config(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    steps = {}

    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def pakar_step(precision, model=model, opt=opt, undo=None):
        with amp(precision), ablation(undo or ""):
            out = model(x, y, return_logits=undo == "unfused-head")
        with ablation(undo or ""):
            (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for p in PRECISIONS:
        steps[("pakar", p)] = lambda p=p: pakar_step(p)
    for undo in ABLATIONS if ablations else ():
        for p in PRECISIONS:
            steps[(f"pakar-{undo}", p)] = lambda p=p, u=undo: pakar_step(p, undo=u)
    if compile_:
        torch.manual_seed(seed)
        compiled = Transformer(cfg).train()
        for layer in compiled.layers:
            layer.compile()
        copt = torch.optim.AdamW(compiled.parameters(), lr=1e-4, fused=True)
        for p in PRECISIONS:
            steps[("pakar+compile", p)] = lambda p=p: pakar_step(p, compiled, copt)

    from hf_reference import hf_model_from_pakar

    for impl in hf_experts:
        hf = hf_model_from_pakar(model, attn_implementation="sdpa")
        hf.config.output_router_logits = True  # include the auxiliary loss, as pakar does
        if impl != "default":
            hf.set_experts_implementation(impl)
        hf.train()
        hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

        def hf_step(precision, hf=hf, hopt=hopt):
            with amp(precision):
                out = hf(input_ids=x, labels=y)
            out.loss.backward()
            hopt.step()
            hopt.zero_grad(set_to_none=True)

        for p in PRECISIONS:
            steps[(f"hf[{impl}]", p)] = lambda p=p, f=hf_step: f(p)
    return cfg, steps


def bench_config(name: str, args) -> dict:
    cfg, steps = make_steps(name, args.batch, args.seq_len, args.hf_experts, args.compile, args.ablations)
    tokens = args.batch * args.seq_len
    for fn in steps.values():  # warm-up (and compilation) outside the timing
        fn()
        fn()
    times = {k: [] for k in steps}
    for _ in range(args.reps):
        for k, fn in steps.items():
            times[k].append(_timed(fn))
    flops = train_flops_per_token(cfg, args.seq_len)
    res = {"tokens_per_step": tokens, "train_flops_per_token": flops, "variants": {}}
    for (impl, p), ts in times.items():
        tps = tokens / min(ts)
        res["variants"].setdefault(impl, {})[p] = {
            "tokens_per_s": round(tps, 1), "median_tokens_per_s": round(tokens / statistics.median(ts), 1),
            "step_ms": round(1000 * min(ts), 2), "mfu": round(tps * flops / args.peaks[p], 4)}
    best = {impl: max(v.values(), key=lambda r: r["tokens_per_s"]) for impl, v in res["variants"].items()}
    hf = max((k for k in best if k.startswith("hf")), key=lambda k: best[k]["tokens_per_s"])
    res["hf_best"] = {"variant": hf, "precision": _prec(res["variants"][hf], best[hf]),
                      "tokens_per_s": best[hf]["tokens_per_s"]}
    for key, candidates in (("pakar_best", ("pakar", "pakar+compile")), ("pakar_eager_best", ("pakar",))):
        pk = max((k for k in best if k in candidates), key=lambda k: best[k]["tokens_per_s"])
        res[key] = {"variant": pk, "precision": _prec(res["variants"][pk], best[pk]),
                    "tokens_per_s": best[pk]["tokens_per_s"]}
    res["speedup_best_vs_best"] = round(res["pakar_best"]["tokens_per_s"] / best[hf]["tokens_per_s"], 3)
    res["speedup_eager_best_vs_best"] = round(res["pakar_eager_best"]["tokens_per_s"] / best[hf]["tokens_per_s"], 3)
    for p in PRECISIONS:  # eager pakar against Hugging Face in the same precision
        res[f"speedup_{p}"] = round(res["variants"]["pakar"][p]["tokens_per_s"]
                                    / res["variants"][hf][p]["tokens_per_s"], 3)
    return res


def _prec(variant: dict, row: dict) -> str:
    return next(p for p, r in variant.items() if r is row)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,small", help="comma-separated presets (default: tiny,small)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--reps", type=int, default=6, help="timed repetitions per variant (default: 6)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2, this machine's cores)")
    p.add_argument("--hf-experts", default="default",
                   help="Hugging Face experts implementations to time, comma-separated: default, eager, "
                        "grouped_mm (default: default)")
    p.add_argument("--compile", action="store_true", help="also time pakar with torch.compile'd blocks "
                   "(compiling takes a minute or more on 2 cores)")
    p.add_argument("--ablations", action="store_true", help="also time pakar with each speed choice undone")
    args = p.parse_args(argv)
    args.hf_experts = [s for s in args.hf_experts.split(",") if s]
    torch.set_num_threads(args.threads)
    args.peaks = {prec: matmul_peak(prec, reps=max(3, args.reps)) for prec in PRECISIONS}

    report = {"threads": args.threads, "batch": args.batch, "seq_len": args.seq_len, "reps": args.reps,
              "torch": torch.__version__, "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in args.peaks.items()}}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        print("transformers is not installed: nothing to compare against", file=sys.stderr)
        return 1
    print(f"matmul peak (2048^3, {args.threads} threads): " +
          ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_peak_gflops"].items()))
    for name in args.configs.split(","):
        r = bench_config(name, args)
        report[name] = r
        print(f"\n{name}: {r['tokens_per_step']} tokens/step, {r['train_flops_per_token'] / 1e6:.1f} MFLOP/token")
        for impl, v in r["variants"].items():
            for prec, row in v.items():
                print(f"  {impl:24s} {prec}: {row['tokens_per_s']:9.0f} tok/s "
                      f"(median {row['median_tokens_per_s']:7.0f}) "
                      f"step {row['step_ms']:8.1f} ms  MFU {100 * row['mfu']:5.1f}%")
        print(f"  best vs best: {r['pakar_best']['variant']} {r['pakar_best']['precision']} / "
              f"{r['hf_best']['variant']} {r['hf_best']['precision']} = {r['speedup_best_vs_best']:.2f}x "
              f"(eager {r['speedup_eager_best_vs_best']:.2f}x; same precision: fp32 {r['speedup_fp32']:.2f}x, "
              f"bf16 {r['speedup_bf16']:.2f}x)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
