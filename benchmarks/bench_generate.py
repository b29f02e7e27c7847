"""Decode speed of pakar's engine against Hugging Face transformers' `generate` on the same weights.

For the `tiny` and `small` presets (random weights, vocabulary 8192, a 64-token prompt), greedy:
- time to first token (prefill + first token), batch 1;
- decode tokens/s at batch 1 and at batch 8 (aggregate), from the time of N new tokens minus the
  time of 1, so prefill does not count;
- the same for Qwen3MoeForCausalLM (sdpa attention) holding the same weights, in the same run.
Both must produce the same greedy tokens (checked and reported: `tokens_match`). The two engines'
runs are interleaved, so a slower stretch of a shared machine slows both.
Target: decode at batch 1 at least 3x transformers on a CPU.

Also measured at batch 1: the matrix-vector products alone (`matvec_floor_ms`: the weights a token
reads, which every engine pays) and so the most any engine could gain over transformers here
(`ceiling_speedup` = transformers' time per token / the floor).

Run: python benchmarks/bench_generate.py [--configs tiny small] [--new-tokens 64] [--repeats 3]
The last line printed is one JSON object. Both engines run with the same --threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pakar.config import get_config  # noqa: E402
from pakar.engine import Engine, SamplingParams  # noqa: E402
from pakar.model import Transformer  # noqa: E402


def hf_copy(model: Transformer):
    """transformers' Qwen3MoeForCausalLM holding `model`'s weights, with its default sdpa attention
    (tests/hf_reference.py does the weight mapping; the logits are checked equal below)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_reference import hf_model_from_pakar

    return hf_model_from_pakar(model, attn_implementation="sdpa").eval()


def time_ours(engine: Engine, prompts: list[list[int]], n_new: int) -> tuple[float, list[list[int]]]:
    sp = SamplingParams(max_new_tokens=n_new, temperature=0.0)
    t0 = time.perf_counter()
    out = engine.generate(prompts, sp)
    return time.perf_counter() - t0, out


def time_hf(hf, prompts: list[list[int]], n_new: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


def measure(engine, hf, prompts, n_new, repeats):
    """Medians of the time for 1 and for n_new new tokens, for both engines, runs interleaved (ours,
    then transformers, then again) so that a slower stretch of a shared machine hits both alike.
    Returns ((ours_1, ours_n), (hf_1, hf_n), our tokens, transformers' tokens) of the last long runs."""
    time_ours(engine, prompts, 2), time_hf(hf, prompts, 2)  # warm-up
    runs = {k: [] for k in ("o1", "h1", "on", "hn")}
    for _ in range(repeats):
        runs["o1"].append(time_ours(engine, prompts, 1)[0])
        runs["h1"].append(time_hf(hf, prompts, 1)[0])
        t, ours_tok = time_ours(engine, prompts, n_new)
        runs["on"].append(t)
        t, hf_tok = time_hf(hf, prompts, n_new)
        runs["hn"].append(t)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return (med["o1"], med["on"]), (med["h1"], med["hn"]), ours_tok, hf_tok


@torch.inference_mode()
def matvec_floor(model: Transformer, tokens: int = 64) -> float:
    """Seconds per token of nothing but the matrix-vector products of a batch-1 decode step: q, k, v,
    o, router, three per chosen expert (chosen at random per layer and token, so that, as in real
    routing, all experts' weights take turns in the caches) and the head, on the model's own float32
    weights. Any batch-1 engine reads these weights once per token, so transformers' step time over
    this floor is the most any engine could gain over it here."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(cfg.hidden_size), torch.randn(cfg.num_attention_heads * cfg.head_dim)
    h = torch.randn(cfg.moe_intermediate_size)
    choices = [[torch.randperm(cfg.num_experts, generator=g)[:cfg.num_experts_per_tok].tolist()
                for _ in model.layers] for _ in range(tokens)]

    def run(chosen_per_layer):
        for layer, chosen in zip(model.layers, chosen_per_layer):
            att, ex = layer.self_attn, layer.mlp.experts
            for w in (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, layer.mlp.gate.weight):
                torch.mv(w, x)
            torch.mv(att.o_proj.weight, a)
            for e in chosen:
                torch.mv(ex.gate_proj[e], x), torch.mv(ex.up_proj[e], x), torch.mv(ex.down_proj[e], h)
        torch.mv(model.lm_head.weight, x)

    for c in choices[:8]:
        run(c)
    t0 = time.perf_counter()
    for c in choices:
        run(c)
    return (time.perf_counter() - t0) / tokens


def bench_config(name: str, n_new: int, repeats: int, prompt_len: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(get_config(name, vocab_size=8192)).eval()
    hf = hf_copy(model)
    engine = Engine(model)
    g = torch.Generator().manual_seed(1)
    res = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    with torch.inference_mode():
        x = torch.randint(3, 8192, (1, prompt_len), generator=g)
        res["max_logit_diff_vs_hf"] = (model(x).logits - hf(x).logits).abs().max().item()
    match = True
    for B in (1, 8):
        prompts = torch.randint(3, 8192, (B, prompt_len), generator=g).tolist()
        (o1, oN), (h1, hN), ours_tok, hf_tok = measure(engine, hf, prompts, n_new, repeats)
        match &= ours_tok == hf_tok
        ours_rate, hf_rate = B * (n_new - 1) / (oN - o1), B * (n_new - 1) / (hN - h1)
        res[f"batch{B}"] = {"ours_decode_tok_s": round(ours_rate, 1), "hf_decode_tok_s": round(hf_rate, 1),
                            "speedup": round(ours_rate / hf_rate, 2),
                            "ours_ttft_ms": round(1000 * o1, 2), "hf_ttft_ms": round(1000 * h1, 2)}
        print(f"{name} batch {B}: ours {ours_rate:,.0f} tok/s, transformers {hf_rate:,.0f} tok/s "
              f"({ours_rate / hf_rate:.2f}x); time to first token {1000 * o1:.1f} ms vs {1000 * h1:.1f} ms",
              flush=True)
        if B == 1:
            floor = matvec_floor(model)
            b1 = res["batch1"]
            b1["matvec_floor_ms"] = round(1000 * floor, 3)
            b1["ceiling_speedup"] = round(1 / hf_rate / floor, 2)  # transformers' step / the floor
            print(f"{name} batch 1: the matrix-vector products alone take {1000 * floor:.2f} ms per token; "
                  f"ours {1000 / ours_rate:.2f} ms, transformers {1000 / hf_rate:.2f} ms: no engine could "
                  f"beat transformers by more than {b1['ceiling_speedup']:.2f}x here", flush=True)
    res["tokens_match"] = match
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small"])
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per timed run (default 64)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; medians (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both engines (default 1: on a "
                   "shared machine, OpenMP threads spin-waiting on a busy core make multi-threaded timings noise)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"benchmark": "generate", "device": "cpu", "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
    import transformers

    out["transformers"] = transformers.__version__
    for name in args.configs:
        out[name] = bench_config(name, args.new_tokens, args.repeats, args.prompt_len)
    speedups = [out[n]["batch1"]["speedup"] for n in args.configs]
    out["target_batch1_speedup"] = 3.0
    out["min_batch1_speedup"] = min(speedups)
    out["target_met"] = min(speedups) >= 3.0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
