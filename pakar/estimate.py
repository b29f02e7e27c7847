"""`pakar estimate`: what a training run will cost, answered before it runs.

estimate(args) -> dict, for the same TrainArgs `pakar train` takes. Choices:
- Tokens. Exact when the run folder (`--out`) already holds a tokenizer and the token shards of these
  sources (pakar.data.find_cached: what `train` would reuse): their counts. Otherwise estimated from a
  sample: the first SAMPLE_BYTES of the corpus, each file contributing in proportion to its size (its
  head: reading a whole multi-GB corpus is what the estimate must not do), tokenized by
  pakar.data.prepare itself into a temporary folder, then scaled by corpus bytes / sampled bytes. The
  tokenizer is `--out`'s tokenizer.json when there is one, else one trained on the sample with
  --vocab-size (what `train` would do, on less text: a few % more tokens per byte than the
  tokenizer trained on the whole corpus). `tokens_method` says which.
- Speed. Real optimizer steps through pakar.train's own machinery (open_run, make_model, plan_run,
  step_start_sync, train_step) on this machine's device, with the memory plan the run would use, in a
  temporary run folder deleted afterwards. One warm-up step (allocator, first-touch pages, autotuning),
  then timed steps: as many as fit in STEP_BUDGET_S judged by the warm-up step, 1 to MAX_STEPS, or
  `--steps N`. Batches come from the real data (cached shards, or the sample's). Epoch time = trained
  tokens per epoch / measured tokens per second; evaluation and checkpoint saves are not counted.
- Big models (PROBE_PARAMS and up): a 1-layer copy of the model is timed first; when the full model
  would take longer than FULL_BUDGET_S to build and time (`default` on a CPU: minutes per step), a
  2-layer copy is timed too and step time and peak memory are extrapolated along the line through the
  two to the full depth (every layer is the same computation on the same shapes; the embedding, head
  and loss are the intercept), with the memory plan the full model would get. `speed_method` says
  which was done.
- Memory. Predicted: pakar.memory.predict for the plan. Measured: pakar.runtime.PeakMemory over the
  model build and the steps (CUDA allocator peak; on a CPU the peak resident-set increase).
- MFU from pakar.info.train_flops_per_token and the device's peak (pakar.runtime.peak_flops; none on
  a CPU). Reference GPUs: the same run's time from its FLOPs at ASSUMED_MFU of each card's dense
  bf16 peak (pakar.runtime.GPU_PEAK_FLOPS, sources there), and the plan pakar.memory.choose would
  pick on that card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import pakar.distributed as dist_ctx
from pakar import PakarError
from pakar.args import TrainArgs
from pakar.corpus import embedded_sample_path, resolve_sources
from pakar.data import BatchLoader, TokenData, find_cached, prepare
from pakar.info import ASSUMED_MFU, flop_seconds, human_duration, param_counts, train_flops_per_token
from pakar.memory import CUDA_CONTEXT_BYTES, choose, free_memory, predict
from pakar.runtime import GPU_PEAK_FLOPS, PeakMemory, autocast_dtype, resolve_device
from pakar.tokenizer import Tokenizer
from pakar.train import (Loop, TokenStreamData, make_model, model_config, open_run, plan_run, run_steps,
                         step_start_sync, train_step, val_fraction_of)

SAMPLE_BYTES = 2_000_000  # corpus text read for a sampled count (~1 s to tokenize, a few to train a BPE on)
STEP_BUDGET_S = 12.0  # seconds of timed steps to aim for
MAX_STEPS = 50  # fast steps (tiny, a GPU) are timed over more of them, still within the budget
PROBE_PARAMS = 200_000_000  # from this size on, a 1-layer probe first says whether the full model is affordable
FULL_BUDGET_S = 25.0  # a full-model measurement predicted longer than this is replaced by extrapolation
# card -> its memory in GiB (A100 and H100: the 80 GB models); peaks from GPU_PEAK_FLOPS. The memory
# plan is the one pakar.memory.choose picks with the whole card free (its prediction counts the CUDA context).
REFERENCE_GPUS = {"RTX 3060": 12, "RTX 4090": 24, "A100": 80, "H100": 80}


@dataclass
class CorpusCount:
    train_tokens: int  # tokens of the training split (estimated when sampled)
    val_tokens: int
    method: str  # how the counts were obtained, in words
    tokenizer: object
    tokens: TokenData  # real tokens for the timed steps: the cached shards, or the sample's


def estimate(args: TrainArgs, steps: int | None = None, log=lambda m: None) -> dict:
    """The figures of the module docstring, as one dict (the --json object)."""
    with tempfile.TemporaryDirectory(prefix="pakar-estimate-", ignore_cleanup_errors=True) as tmp:
        corpus = count_tokens(args, Path(tmp) / "sample", log)
        measured = measure(args, corpus, Path(tmp), steps, log)
        del corpus.tokens  # unmap the sample's shards before the folder goes (Windows refuses otherwise)
    return summarise(args, corpus, measured)


# --- tokens ------------------------------------------------------------------------------------------

def count_tokens(args: TrainArgs, sample_dir: Path, log) -> CorpusCount:
    val_fraction = val_fraction_of(args)
    cached = find_cached(args.data, args.out, val_fraction)
    if cached is not None:
        tokenizer, tokens = cached
        return CorpusCount(len(tokens.train), len(tokens.val), f"exact, from the token cache {tokens.dir}",
                           tokenizer, tokens)
    sources = resolve_sources(args.data if args.data is not None else [str(embedded_sample_path())])
    tok_path = Path(args.out) / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path) if tok_path.exists() else None
    files, total, sampled = sample_corpus(sources, sample_dir, SAMPLE_BYTES)
    tokenizer, tokens = prepare([str(f) for f in files], sample_dir, vocab_size=args.vocab_size,
                                tokenizer=tokenizer, val_fraction=val_fraction, log=log)
    scale = total / max(sampled, 1)
    which = f"the tokenizer {tok_path}" if tok_path.exists() else \
        f"a {tokenizer.vocab_size:,}-token BPE trained on the sample (no {tok_path} yet)"
    method = (f"estimated: {sampled / 1e6:.1f} MB sampled of {total / 1e6:,.1f} MB, tokenized with {which}"
              if sampled < total else f"counted on the whole corpus ({total / 1e6:.1f} MB) with {which}")
    return CorpusCount(round(len(tokens.train) * scale), round(len(tokens.val) * scale), method, tokenizer, tokens)


def sample_corpus(sources: list[Path], out: Path, budget: int) -> tuple[list[Path], int, int]:
    """Copies the head of every source file, its share of `budget` bytes in proportion to its size and
    cut at a line end, into `out`; returns (the copies, corpus bytes, sampled bytes), bytes of the files
    as the reader sees them (gzip: uncompressed)."""
    sizes = [_text_size(p) for p in sources]
    total = sum(sizes)
    out.mkdir(parents=True, exist_ok=True)
    files, sampled = [], 0
    for i, (src, size) in enumerate(zip(sources, sizes)):
        if size == 0:
            continue
        quota = size if total <= budget else max(1, budget * size // total)
        opener = gzip.open if src.suffix.lower() == ".gz" else open
        with opener(src, "rb") as f:
            head = f.read(quota)
            if len(head) < size:  # cut at the last line end, so no document is split (unless it is one line)
                cut = head.rfind(b"\n") + 1
                head = head[:cut] if cut else head
        name = src.name[:-3] if src.suffix.lower() == ".gz" else src.name  # keeps .jsonl: the reader's format
        dst = out / f"{i:05d}-{name}"
        dst.write_bytes(head)
        files.append(dst)
        sampled += len(head)
    if not files:
        raise PakarError("--data: the files are empty")
    return files, total, sampled


def _text_size(path: Path) -> int:
    """Bytes the corpus reader sees: a gzip member's uncompressed size from its trailer (ISIZE, the size
    mod 2^32: a file of 4 GiB or more of text is counted at least as its compressed size)."""
    size = path.stat().st_size
    if path.suffix.lower() != ".gz" or size < 18:
        return size
    with open(path, "rb") as f:
        f.seek(-4, 2)
        isize = int.from_bytes(f.read(4), "little")
    return isize if isize >= size else isize + (1 << 32) * max(1, size // (1 << 32))


# --- speed and memory --------------------------------------------------------------------------------

def measure(args: TrainArgs, corpus: CorpusCount, tmp: Path, steps: int | None, log) -> dict:
    """The full model's steps when they fit the time budget, else the same model with 1 and 2 layers
    (probes with the plan the full model gets) and a straight line through their step times and peak
    memories to the full depth: every layer is the same computation on the same shapes, so time and
    memory are linear in the layer count (the embedding, head and loss are the intercept)."""
    cfg = model_config(args, corpus.tokenizer, None)
    layers = cfg.num_hidden_layers
    if param_counts(cfg)["total_params"] < PROBE_PARAMS or layers <= 2:
        return {**measure_steps(args, corpus, tmp / "full", steps, log), "speed_method": "measured"}
    fixed = dataclasses.replace(args, memory_plan=full_model_plan(args, cfg))
    one = measure_steps(fixed, corpus, tmp / "layers1", steps, log, layers=1, budget=STEP_BUDGET_S / 4)
    full_cost = layers * (one["build_seconds"] + 2 * one["step_seconds"])  # build, warm-up, one timed step
    if full_cost <= FULL_BUDGET_S:
        return {**measure_steps(args, corpus, tmp / "full", steps, log), "speed_method": "measured"}
    log(f"the full {layers}-layer model would take about {full_cost:.0f} s to time here: extrapolating "
        f"from 1 and 2 layers")
    two = measure_steps(fixed, corpus, tmp / "layers2", steps, log, layers=2, budget=STEP_BUDGET_S / 2)
    line = lambda a, b: a + (layers - 1) * max(b - a, 0.0)  # noqa: E731  (a noisy negative slope: flat)
    step_s = line(one["step_seconds"], two["step_seconds"])
    overhead = line(one["first_step_overhead"], two["first_step_overhead"])
    return {**two, "model_cfg": cfg, "n_params": param_counts(cfg)["total_params"],
            "flops_per_token": train_flops_per_token(cfg, args.seq_len), "step_seconds": step_s,
            "first_step_overhead": overhead,
            "tokens_per_second": two["tokens_per_step"] / step_s,
            "peak_memory_bytes": round(line(one["peak_memory_bytes"], two["peak_memory_bytes"])),
            "timed_steps": one["timed_steps"] + two["timed_steps"],
            "probe_step_seconds": [one["step_seconds"], two["step_seconds"]],
            "speed_method": f"time and memory extrapolated to {layers} layers from the same model with 1 and 2 layers "
                            f"({one['step_seconds']:.2f} and {two['step_seconds']:.2f} s per step)"}


def full_model_plan(args: TrainArgs, cfg) -> str:
    """--memory-plan, or what auto would choose for the full model on this device now (as
    pakar.memory.resolve_plan does, before this process holds a model): the plan the probes use."""
    if args.memory_plan != "auto":
        return args.memory_plan
    device = resolve_device(args.device)
    free, host_free = free_memory(device)
    if device.type == "cuda":
        free += CUDA_CONTEXT_BYTES  # mem_get_info made the context, which the prediction counts
    plan, _ = choose(cfg, args.batch, args.seq_len, device_type=device.type,
                     bf16=autocast_dtype(args.dtype, device) is not None,
                     activation_checkpointing=args.activation_checkpointing, free_bytes=free, host_free_bytes=host_free)
    return plan


def measure_steps(args: TrainArgs, corpus: CorpusCount, run_dir: Path, steps: int | None, log,
                  warmup: int = 1, layers: int | None = None, budget: float = STEP_BUDGET_S) -> dict:
    """Real optimizer steps through pakar.train's machinery in a temporary run folder: `warmup` steps,
    then `steps` timed (None: as many as the warm-up says fit in `budget` seconds), with the model cut
    to `layers` layers if given. The run's own log lines (the memory plan and why) go to stderr, as
    train would print them, so that stdout stays the report."""
    with contextlib.redirect_stdout(sys.stderr):
        return _measure_steps(args, corpus, run_dir, steps, log, warmup, layers, budget)


def _measure_steps(args: TrainArgs, corpus: CorpusCount, run_dir: Path, steps: int | None, log,
                   warmup: int, layers: int | None, budget: float) -> dict:
    targs = dataclasses.replace(args, out=str(run_dir), resume=False, overwrite=False, init_from=None,
                                max_steps=None, save_every=0, eval_every=0)
    ctx = dist_ctx.setup(targs)
    device, amp, run_log = open_run(targs, ctx)
    try:
        loader = BatchLoader(corpus.tokens.train, args.batch, args.seq_len, args.seed)
        data = TokenStreamData(corpus.tokens, loader, corpus.tokenizer, targs)
        peak = PeakMemory(device)
        peak.start()
        t_build = time.perf_counter()
        model_cfg = model_config(targs, corpus.tokenizer, None)
        if layers is not None:
            model_cfg = model_cfg.replace(num_hidden_layers=layers)
        model_cfg, model = make_model(targs, device, corpus.tokenizer, None, None, model_cfg)
        run = plan_run(targs, ctx, device, amp, run_log, data, corpus.tokenizer, model_cfg, model, None, {},
                       None, None)
        build_s = time.perf_counter() - t_build
        loop = Loop()

        def one_step(i: int) -> int:
            micro = [data.get(0, (i * args.grad_accum + m) % loader.steps_per_epoch) for m in range(args.grad_accum)]
            n_targets, _, _ = step_start_sync(ctx, micro, targs, 0.0, None)
            return train_step(run, micro, n_targets, run.peak_lr, loop).tokens  # .tokens: after the step's sync

        run.model.train()
        t0 = time.perf_counter()
        for i in range(warmup):
            one_step(i)
        warm_s = (time.perf_counter() - t0) / max(warmup, 1)
        n = steps if steps is not None else max(1, min(MAX_STEPS, int(budget / max(warm_s, 1e-6))))
        log(f"{model_cfg.num_hidden_layers} layer(s): warm-up {warm_s:.2f} s per step; timing {n} step(s)")
        t0, tokens = time.perf_counter(), 0
        for i in range(warmup, warmup + n):
            tokens += one_step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        measured = {"tokens_per_second": tokens / seconds, "timed_steps": n, "step_seconds": seconds / n,
                    "first_step_overhead": max(0.0, warm_s - seconds / n) if warmup == 1 else 0.0,
                    "build_seconds": build_s, "peak_memory_bytes": peak.increase(),
                    "device": str(device), "amp": amp, "model_cfg": model_cfg, "n_params": run.n_params,
                    "tokens_per_step": args.batch * args.seq_len * args.grad_accum,
                    "flops_per_token": run.flops_per_token, "peak_flops": run.peak_flops,
                    "memory_plan": run.memory_plan}
        del run, model, data
        return measured
    finally:
        run_log.close()
        dist_ctx.teardown(ctx)


# --- the report --------------------------------------------------------------------------------------

def steps_per_epoch(train_tokens: int, args: TrainArgs) -> int:
    """pakar.data.BatchLoader's windows and pakar.train.plan_run's optimizer steps, one process."""
    windows = max(train_tokens - 1, 0) // args.seq_len
    return windows // args.batch // args.grad_accum


def summarise(args: TrainArgs, corpus: CorpusCount, m: dict) -> dict:
    cfg = m["model_cfg"]
    bf16 = m["amp"] is not None
    device_type = m["device"].split(":")[0]
    per_epoch_steps = steps_per_epoch(corpus.train_tokens, args)
    if per_epoch_steps < 1:
        raise PakarError(f"the corpus gives about {corpus.train_tokens:,} training tokens, fewer than one "
                         f"optimizer step of {m['tokens_per_step']:,}: use more data or a smaller --batch/--seq-len")
    total_steps = run_steps(per_epoch_steps, args)
    tokens_per_epoch = per_epoch_steps * m["tokens_per_step"]
    tps = m["tokens_per_second"]
    predicted = predict(cfg, m["memory_plan"], args.batch, args.seq_len, device_type=device_type, bf16=bf16,
                        activation_checkpointing=args.activation_checkpointing)
    flops = m["flops_per_token"]
    host_free = free_memory(torch.device("cpu"))[1]  # the offload plan on a reference card: this machine's RAM
    refs = []
    for name, card_gib in REFERENCE_GPUS.items():
        peak = GPU_PEAK_FLOPS[name]
        try:
            plan, _ = choose(cfg, args.batch, args.seq_len, device_type="cuda", bf16=True,
                             activation_checkpointing=args.activation_checkpointing,
                             free_bytes=card_gib * 2**30, host_free_bytes=host_free)
        except PakarError:
            plan = None  # no plan fits that card
        refs.append({"gpu": name, "memory_gib": card_gib, "peak_tflops": peak / 1e12, "mfu": ASSUMED_MFU,
                     "memory_plan": plan, "seconds_per_epoch": flop_seconds(tokens_per_epoch, flops, peak),
                     "seconds_total": flop_seconds(total_steps * m["tokens_per_step"], flops, peak)})
    return {
        "config": args.config, "batch": args.batch, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
        "epochs": args.epochs, "max_steps": args.max_steps, "parameters": m["n_params"], "vocab_size": cfg.vocab_size,
        "corpus_tokens": corpus.train_tokens + corpus.val_tokens, "tokens_per_epoch": tokens_per_epoch,
        "tokens_method": corpus.method, "steps_per_epoch": per_epoch_steps, "total_steps": total_steps,
        "tokens_per_second": tps, "seconds_per_epoch": tokens_per_epoch / tps,
        # the run's first step costs more (allocation, first-touch pages, autotuning): once, in the total
        "first_step_overhead_seconds": m["first_step_overhead"],
        "seconds_total": total_steps * m["tokens_per_step"] / tps + m["first_step_overhead"],
        "timed_steps": m["timed_steps"], "speed_method": m["speed_method"],
        "probe_step_seconds": m.get("probe_step_seconds"),
        "peak_memory_bytes": m["peak_memory_bytes"], "predicted_peak_bytes": predicted["peak_bytes"],
        "predicted_host_bytes": predicted["host_bytes"], "memory_plan": m["memory_plan"],
        "device": m["device"], "dtype": "bfloat16" if bf16 else "float32",
        "train_flops_per_token": flops, "device_peak_flops": m["peak_flops"],
        "mfu": tps * flops / m["peak_flops"] if m["peak_flops"] else None,
        "reference_mfu": ASSUMED_MFU, "reference_gpus": refs,
    }


def render(r: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [
        f"estimate for {r['config']} ({r['parameters']:,} parameters), batch {r['batch']} x seq-len {r['seq_len']}"
        f" x grad-accum {r['grad_accum']}, {r['epochs']} epoch(s)"
        + (f", --max-steps {r['max_steps']}" if r["max_steps"] else ""),
        f"tokens: {r['corpus_tokens']:,} in the corpus, {r['tokens_per_epoch']:,} trained per epoch "
        f"({r['steps_per_epoch']:,} optimizer steps) [{r['tokens_method']}]",
        f"this device: {r['device']} {r['dtype']}, memory plan {r['memory_plan']}",
        f"  speed: {r['tokens_per_second']:,.0f} tokens/s"
        + (f" over {r['timed_steps']} step(s) after a warm-up step" if r["speed_method"] == "measured"
           else f" ({r['speed_method']})") + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""),
        f"  time: ≈ {human_duration(r['seconds_per_epoch'])} per epoch, ≈ {human_duration(r['seconds_total'])} "
        f"for the run's {r['total_steps']:,} steps (training steps only: no evaluation or saving)",
        f"  peak memory: predicted {gib(r['predicted_peak_bytes'])}, "
        f"{'measured' if r['speed_method'] == 'measured' else 'extrapolated'} {gib(r['peak_memory_bytes'])}"
        + (f" (+ {gib(r['predicted_host_bytes'])} in host RAM)" if r["predicted_host_bytes"] and
           not r["device"].startswith("cpu") else ""),
        f"reference GPUs (this run's FLOPs at {100 * r['reference_mfu']:.0f}% of the dense bf16 peak):",
    ]
    for g in r["reference_gpus"]:
        plan = g["memory_plan"] or "no plan fits"
        lines.append(f"  {g['gpu']:<9} {g['memory_gib']:>3} GiB {g['peak_tflops']:>6.1f} TFLOP/s  "
                     f"≈ {human_duration(g['seconds_per_epoch']):>10} per epoch, "
                     f"≈ {human_duration(g['seconds_total']):>10} in all  (plan: {plan})")
    return "\n".join(lines)
