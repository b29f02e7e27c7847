"""Training: the seed's `python train.py --epochs 5 --batch 2 --config default --seq-len 256`.

One loop function, read top to bottom: per optimizer step, evaluate (when due) -> save (when due) ->
step -> log. Choices:
- The run directory (`--out`, default ".") holds tokenizer.json, the token cache (data/), training.log,
  metrics.jsonl and checkpoints/ (model_epoch{N}.pt at each epoch end, state.pt to resume).
- Batches are a pure function of (seed, epoch, step, rank) (pakar.data.BatchLoader), so resuming needs
  only the loop counters, and `--resume` reproduces an uninterrupted run bit for bit on a CPU.
- Gradient accumulation normalises explicitly: every micro-batch's summed cross-entropy is divided by
  the number of counted targets in the whole optimizer step (all micro-batches, all ranks), so 4
  micro-batches of B equal one batch of 4B even when a loss mask makes their token counts differ.
  The MoE auxiliary losses are averaged over micro-batches; expert loads for bias balancing are summed.
- AdamW (fused where the device supports it), linear warmup then cosine or warmup-stable-decay (WSD)
  to `--min-lr-ratio` of the peak; weight decay only on matrices (not norms, embeddings, router bias).
- Precision: bf16 autocast on a CUDA GPU that supports it, float32 elsewhere unless `--dtype bfloat16`
  (pakar.runtime.autocast_dtype: the one rule evaluation and generation follow too).
- Arguments: TrainArgs (pakar.args); the command line is pakar.commands.train, which also sends chat
  JSONL data with --init-from to pakar.finetune.train_chat (the seed's form of chat fine-tuning).
- Only rank 0 writes logs and checkpoints; the distributed wrapping lives in pakar.distributed.

Never losing work (the choices of issue 17):
- A run folder holding a run (checkpoints/state.pt, model_epoch*.pt, ...) is refused unless the run is
  resumed (--resume) or replaced (--overwrite deletes its checkpoints first); --init-from may not point
  into the checkpoints/ it would write (pakar.checkpoint.check_run_dir, the same rule for finetune).
  Temporary files that a killed save left there are deleted at start and listed in training.log.
  Only one run at a time may use a folder (nothing enforces it; two would overwrite each other's
  state), so every pakar temporary file there is stale, except, on POSIX, one whose writer process
  still runs (a concurrent `pakar prepare`), which is left alone.
- Non-finite steps: when the step's global loss or gradient norm is NaN/inf, the update is skipped
  (weights, AdamW moments and router biases untouched; the step counter and the data position move
  on, so resume replays it the same), counted, and logged (training.log and a kind="skip" record in
  metrics.jsonl). MAX_BAD_STEPS in a row stop the run with a PakarError (exit 2) and nothing saved
  over the last good state.pt and epoch checkpoints. The check reads the loss and the gradient norm in
  the one host-device sync per step the loop already had. And pakar.checkpoint.atomic_save refuses to
  write any non-finite tensor, whatever the path.
- SIGINT (Ctrl-C), SIGTERM (docker stop, a scheduler's pre-emption) and SIGBREAK (Windows) only set a
  flag; the loop reads it at the next step boundary (before any forward of the next step), saves
  state.pt there and exits with 128 + the signal number, printing the exact resume command. A second
  Ctrl-C quits at once without saving. Under torchrun the flag travels in the per-step all-reduce of
  the target count (with the --time-limit flag), so every rank stops at the same step without an extra
  collective.
- Every run that ends leaves a loadable model checkpoint and a final validation: model_epoch{N}.pt at
  epoch ends; a stop by --max-steps or --time-limit inside an epoch writes model_step{S}.pt (which
  chat/eval's default, pakar.checkpoint.latest_epoch_checkpoint, finds by its step).
- --max-steps is not a resume setting: raising it with --resume continues the run. The lr schedule is
  fitted to the run's total steps, so a raised --max-steps changes the schedule from the resumed step
  on (the log says so); the same flags reproduce the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pakar import PakarError
from pakar.args import DEFAULT_LR, TrainArgs
from pakar.checkpoint import (DISK_ERRORS, atomic_save, check_resume_state, check_run_dir, model_checkpoint,
                              remove_run_files, remove_stale_temps, safe_load, write_error)
from pakar.config import ModelConfig, get_config
from pakar.corpus import VAL_FRACTION
from pakar.model import Transformer
from pakar.moe import expert_load_stats, update_expert_bias
from pakar.runtime import autocast_dtype, peak_flops, resolve_device

# Non-finite steps in a row that stop the run. One bad batch (an overflow spike) is skipped and
# training goes on; when the weights or the learning rate are broken every step is non-finite, and
# after 3 the run stops rather than skipping through the rest of the data.
MAX_BAD_STEPS = 3


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "wsd":  # stable at the peak, then a linear decay over the last 20%
        decay_start = max(warmup, int(total * 0.8))
        if step < decay_start:
            return peak
        frac = (step + 1 - decay_start) / max(1, total - decay_start)
        return peak * (1 - (1 - min_ratio) * frac)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))



def cxx_compiler() -> tuple[str, str | None]:
    """The C++ compiler torch.compile's inductor calls, named as it chooses it (torch._inductor.cpp_builder:
    $CXX, else cl on Windows, clang++ on macOS, g++ elsewhere), and its path, None when not on PATH."""
    name = os.environ.get("CXX") or ("cl" if os.name == "nt" else "clang++" if sys.platform == "darwin" else "g++")
    return name, shutil.which(name)


def check_compiler() -> None:
    """--compile needs a C++ compiler (inductor builds its CPU kernels, and the launchers of its Triton
    kernels on a GPU, with one); without it the first step fails deep inside with a long traceback."""
    name, path = cxx_compiler()
    if path is None:
        raise PakarError(f"--compile needs a C++ compiler and {name!r} is not on PATH (set CXX to use another): "
                         f"install one (Windows: Visual Studio Build Tools, then run from the Developer PowerShell; "
                         f"Linux: g++; macOS: xcode-select --install) or train without --compile")



def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


class RunLog:
    """training.log (human lines) and metrics.jsonl (one JSON object per record), rank 0 only.
    Console output goes through tqdm.write so it does not break the progress bar."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.text = self._open(run_dir / "training.log") if enabled else None
        self.jsonl = self._open(run_dir / "metrics.jsonl") if enabled else None

    @staticmethod
    def _open(path: Path):
        try:
            return open(path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(e, path) if e.errno in DISK_ERRORS else e from None

    @staticmethod
    def _write(f, line: str) -> None:
        try:
            f.write(line)
            f.flush()
        except OSError as e:
            raise write_error(e, f.name) if e.errno in DISK_ERRORS else e from None

    def say(self, msg: str, console: bool = True) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write(self.text, f"{stamp} | {msg}\n")
        if console:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)

    def record(self, **fields) -> None:
        if self.enabled:
            self._write(self.jsonl, json.dumps(fields) + "\n")

    def close(self) -> None:
        for f in (self.text, self.jsonl):
            if f:
                f.close()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



# --- never losing work: helpers of the loop ----------------------------------------------------------

def claim_run_dir(args: TrainArgs, say: Callable[[str], None], is_main: bool = True) -> None:
    """Refuse a folder that holds another run (pakar.checkpoint.check_run_dir); then, on the main
    process, delete the old run's checkpoints (--overwrite) and the temporary files killed saves left."""
    check_run_dir(args.out, args.resume, args.overwrite, args.init_from)
    if not is_main:
        return
    if args.overwrite:
        gone = remove_run_files(args.out)
        if gone:
            say(f"--overwrite: deleted the previous run's {', '.join(p.name for p in gone)}")
    for p in remove_stale_temps(args.out):
        say(f"removed a temporary file left by an interrupted save: {p}")


def resume_command() -> str:
    """The command line that continues this run: the one that started it, plus --resume."""
    prog, rest = sys.argv[0], [a for a in sys.argv[1:] if a != "--overwrite"]
    if prog.endswith("__main__.py"):
        words = ["python", "-m", "pakar"]
    elif prog.endswith(".py"):
        words = ["python", prog]
    else:
        words = [Path(prog).name]
    words += rest + ([] if "--resume" in rest else ["--resume"])
    if os.name == "nt":
        import subprocess

        return subprocess.list2cmdline(words)
    return " ".join(shlex.quote(w) for w in words)


class StopSignals:
    """SIGINT, SIGTERM (and Windows' SIGBREAK) set `.received` instead of killing the run; the loop
    checks it between optimizer steps. A second SIGINT raises KeyboardInterrupt at once (quit without
    saving). Installed only in the main thread (Python delivers signals there); the previous handlers
    come back on exit, so calling train() in-process leaves the caller's handlers as they were."""

    NAMES = ("SIGINT", "SIGTERM", "SIGBREAK")

    def __init__(self):
        self.received, self._old = None, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        # os.write to fd 2, not print or the log: a handler may interrupt a write to the same buffered file
        try:
            os.write(2, f"\nreceived {signal.Signals(signum).name}: saving at the end of this optimizer step "
                        f"(Ctrl-C again quits without saving)\n".encode())
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


class BadSteps:
    """Counts the non-finite steps that were skipped; stops the run after MAX_BAD_STEPS in a row."""

    def __init__(self, log: "RunLog", lr_hint: str):
        self.log, self.lr_hint, self.total, self.in_a_row = log, lr_hint, 0, 0

    def ok(self) -> None:
        self.in_a_row = 0

    def skip(self, step: int, epoch: int, loss: float, grad_norm: float, last_saved: str) -> None:
        self.total += 1
        self.in_a_row += 1
        self.log.say(f"step {step}: non-finite loss {loss} or gradient norm {grad_norm}: update skipped "
                     f"({self.in_a_row} in a row, {self.total} in all)")
        self.log.record(kind="skip", step=step, epoch=epoch, loss=_json_number(loss),
                        grad_norm=_json_number(grad_norm), in_a_row=self.in_a_row, skipped_total=self.total)
        if self.in_a_row >= MAX_BAD_STEPS:
            raise PakarError(f"training diverged: the loss or gradient norm was NaN/inf for {self.in_a_row} "
                             f"optimizer steps in a row (up to step {step}); nothing was saved from them, "
                             f"{last_saved}. Lower --lr ({self.lr_hint}) or raise --warmup, and start again "
                             f"with --overwrite (or another --out)")


def step_start_sync(ctx, micro, args: TrainArgs, t_start: float, received) -> tuple[torch.Tensor, str | None, bool]:
    """Before a step: its global count of targets, and whether to stop instead. One all-reduce carries
    the count, the --time-limit flag and the signal flag, so every rank stops at the same step (the
    save is collective) with no collective beyond the count the loop needs anyway."""
    n_local = float(sum(int((y != -100).sum()) for _, y in micro))
    over = args.time_limit is not None and time.perf_counter() - t_start > args.time_limit * 60
    total = ctx.all_reduce_sum(torch.tensor([n_local, float(over), float(received is not None)]))
    n_targets = total[0]
    _, over_any, signal_any = total.tolist()
    if signal_any:
        name = signal.Signals(received).name if received is not None else "a signal to another process"
        return n_targets, f"stopped by {name}", True
    if over_any:
        return n_targets, f"reached --time-limit {args.time_limit:g} min", False
    return n_targets, None, False


def stop_hint(reason: str, args: TrainArgs, step: int, progressed: bool) -> str:
    """The line a stopped run ends with: why, and the command that continues it."""
    if reason.startswith("reached --max-steps"):
        if not progressed:
            return (f"already at --max-steps {args.max_steps} (step {step}): to train on, raise --max-steps "
                    f"(or drop it) and keep --resume")
        return (f"stopped: {reason}. To train on, run the same command with a higher --max-steps (or without "
                f"it) plus --resume (the same --max-steps would stop again at once)")
    return f"{reason} at step {step}: the state is saved; continue with: {resume_command()}"

def _json_number(x: float) -> float | str:
    """JSON has no NaN or Infinity: non-finite numbers are written as strings."""
    return x if math.isfinite(x) else str(x)

def train(args: TrainArgs, *, data=None, tokenizer=None, customize_model: Callable | None = None,
          save_epoch: Callable | None = None, meta: dict | None = None, init_ckpt: dict | None = None) -> dict:
    """Train and return a summary dict. Extension points for fine-tuning (pakar.finetune):
    `data` (an object with .steps_per_epoch, .get(epoch, step) -> (x, y) with y = -100 where not
    counted, and .evaluate(model, **kw) -> dict), `tokenizer`, `customize_model(model) -> model`
    (e.g. wrap with LoRA adapters; only parameters left trainable are optimised), `save_epoch(state,
    path_stem, meta) -> path` to write epoch checkpoints differently from the full state dict (e.g.
    adapters only), `meta` added to
    every checkpoint's meta, `init_ckpt` the args.init_from checkpoint if the caller has already loaded
    it (its "model" tensors are popped once the model holds them, so no second copy stays in memory)."""
    from pakar import distributed as D

    check_run_dir(args.out, args.resume, args.overwrite, args.init_from)  # before any process writes
    ctx = D.setup(args)
    device = ctx.device if ctx.device is not None else resolve_device(args.device)
    if args.compile:
        check_compiler()  # before any data work: inductor would fail only at the first step
    run_dir = Path(args.out)
    ck_dir = run_dir / "checkpoints"
    if ctx.is_main:
        try:
            ck_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(e, ck_dir) if e.errno in DISK_ERRORS else e from None
    log = RunLog(run_dir, ctx.is_main)
    claim_run_dir(args, log.say, ctx.is_main)
    amp = autocast_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain run on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    # ---- data and tokenizer ----
    if init_ckpt is None and args.init_from:
        init_ckpt = safe_load(args.init_from)
    if data is None:
        from pakar.data import BatchLoader, prepare
        from pakar.tokenizer import Tokenizer

        if init_ckpt is not None and tokenizer is None:
            tokenizer = Tokenizer.from_json(init_ckpt["tokenizer"])
        val_fraction = args.val_fraction or (VAL_FRACTION if args.data else 0.05)
        tokenizer, tokens = D.run_on_main_first(ctx, lambda: prepare(
            args.data, run_dir, vocab_size=args.vocab_size, tokenizer=tokenizer, val_fraction=val_fraction,
            log=(lambda m: log.say(m)) if ctx.is_main else (lambda m: None)))
        data = TokenStreamData(tokens, BatchLoader(tokens.train, args.batch, args.seq_len, args.seed,
                                                   ctx.rank, ctx.world_size), tokenizer, args)
    token_bytes = tokenizer.token_byte_lengths()
    ctx.check_same(data.key, "the training data and tokenizer")

    # ---- model ----
    if init_ckpt is not None:
        model_cfg = ModelConfig.from_dict(init_ckpt["config"])
        if args.seq_len > model_cfg.max_position_embeddings:
            raise PakarError(f"--seq-len {args.seq_len} exceeds the checkpoint's context of "
                             f"{model_cfg.max_position_embeddings} tokens")
    else:
        model_cfg = get_config(args.config, vocab_size=tokenizer.vocab_size)
        if args.seq_len > model_cfg.max_position_embeddings:
            model_cfg = model_cfg.replace(max_position_embeddings=args.seq_len)
    torch.manual_seed(args.seed)
    model = Transformer(model_cfg)
    if init_ckpt is not None:
        model.load_state_dict(init_ckpt.pop("model"))
    if customize_model is not None:
        model = customize_model(model)
    model.to(device)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        for layer in model.layers:
            layer.compile()
    raw_model = model
    n_params = sum(p.numel() for p in model.parameters())  # counted before FSDP/ZeRO-3 partition them

    steps_per_epoch = data.steps_per_epoch // args.grad_accum
    if steps_per_epoch < 1:
        raise PakarError(f"the corpus gives {data.steps_per_epoch} micro-batches per epoch, fewer than "
                         f"--grad-accum {args.grad_accum}; use more data or a smaller --batch/--grad-accum")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup = args.warmup if args.warmup is not None else max(1, min(200, total_steps // 20))
    preset = init_ckpt["meta"].get("config_name", args.config) if init_ckpt is not None else args.config
    peak_lr = args.lr if args.lr is not None else DEFAULT_LR.get(preset, 3e-4)
    if init_ckpt is not None and args.lr is None:
        peak_lr /= 10  # fine-tuning: a lower default than pretraining

    optimizer = make_optimizer(model, peak_lr, args.weight_decay, device)
    model, optimizer = ctx.wrap(model, optimizer)
    # The fused head + loss reads lm_head.weight inside the model's forward, without calling lm_head:
    # ZeRO-3 gathers a partitioned weight only in its own module's forward, so it keeps the plain head.
    fused_head = not (ctx.mode == "deepspeed" and ctx.zero_stage == 3)

    # ---- resume ----
    state_path = ck_dir / "state.pt"
    epoch, step_in_epoch, step, tokens_seen, elapsed = 0, 0, 0, 0, 0.0
    args_dict = dataclasses.asdict(args)
    if args.resume:
        if not state_path.is_file():
            raise PakarError(f"--resume: no saved state at {state_path}; start without --resume")
        state = safe_load(state_path)
        check_resume_state(state, state_path)
        saved = state["train_args"]
        changed = [f"--{k.replace('_', '-')} (was {saved.get(k)!r}, now {args_dict.get(k)!r})"
                   for k in type(args).RESUME_KEYS if saved.get(k) != args_dict.get(k)]
        if state["world_size"] != ctx.world_size:
            changed.append(f"world size (saved with {state['world_size']} processes, now {ctx.world_size})")
        if state["config"] != model_cfg.to_dict():
            changed.append("model config")
        if state["meta"].get("data_key") != data.key:
            changed.append("training data or tokenizer")
        if changed:
            raise PakarError("cannot resume: the run was saved with different settings: "
                             + ", ".join(changed)
                             + "; use the same flags, or start a new run in another --out")
        ctx.load_state(model, optimizer, state)
        loop = state["loop"]
        epoch, step_in_epoch, step = loop["epoch"], loop["step_in_epoch"], loop["step"]
        tokens_seen, elapsed = loop["tokens_seen"], loop["elapsed"]
        set_rng_state(state["rng"])
        log.say(f"resumed from {state_path} at epoch {epoch + 1}, step {step} ({step_in_epoch} into the epoch)")
        if loop.get("total_steps", total_steps) != total_steps:
            log.say(f"the lr schedule is now fitted to {total_steps} steps (the saved run had {loop['total_steps']}, "
                    f"--max-steps or --epochs changed): the learning rate differs from step {step} on")

    def checkpoint_meta(**extra) -> dict:
        return {"epoch": epoch, "step": step, "config_name": args.config, "seq_len": args.seq_len, "data_key": data.key,
                **(meta or {}), **extra}

    def save_state(reason: str) -> None:
        full = ctx.full_state(model, optimizer)  # collective under FSDP/DeepSpeed: every rank calls it
        if ctx.is_main:
            obj = model_checkpoint(full["model"], model_cfg, tokenizer.to_json(), **checkpoint_meta())
            obj.update(optimizer=full["optimizer"], train_args=args_dict, world_size=ctx.world_size,
                       rng=rng_state(), loop={"epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
                                              "tokens_seen": tokens_seen, "total_steps": total_steps,
                                              "elapsed": time.perf_counter() - t_start})
            atomic_save(obj, state_path)
            log.say(f"saved resumable state at step {step} ({reason}): {state_path}", console=False)
        saved_at[0] = step
        ctx.barrier()

    def save_model_checkpoint(stem: str, full: dict, val: dict | None) -> Path | None:
        """model_epoch{N}.pt / model_step{S}.pt (or the save_epoch extension's files); rank 0 writes."""
        if not ctx.is_main:
            return None
        m = checkpoint_meta(val_loss=val["loss"] if val else None, val_bpb=val.get("bits_per_byte") if val else None)
        if save_epoch is not None:
            path = save_epoch(full["model"], ck_dir / stem, m)
        else:
            path = ck_dir / f"{stem}.pt"
            atomic_save(model_checkpoint(full["model"], model_cfg, tokenizer.to_json(), **m), path)
        log.say(f"saved {path}")
        return path

    def last_saved() -> str:
        return (f"the last good state is {state_path} (step {saved_at[0]})" if saved_at[0] is not None
                else f"no state was saved yet ({state_path} is from before, if any)")

    def validate(tag: str) -> dict:
        res = data.evaluate(model, token_bytes=token_bytes, device=device, autocast_dtype=amp,
                            max_tokens=args.eval_tokens)
        bpb = res.get("bits_per_byte")
        log.say(f"validation ({tag}) | loss {res['loss']:.4f} | ppl {res['perplexity']:.2f} | "
                f"bpb {bpb:.4f} | {res['tokens']:,} tokens" if bpb is not None else
                f"validation ({tag}) | loss {res['loss']:.4f} | ppl {res['perplexity']:.2f} | {res['tokens']:,} tokens")
        log.record(kind="val", step=step, epoch=epoch + 1, loss=res["loss"], perplexity=res["perplexity"],
                   bits_per_byte=bpb, tokens=res["tokens"])
        return res

    # ---- the loop ----
    from pakar.info import train_flops_per_token
    from pakar.runtime import thread_summary

    flops_per_token = train_flops_per_token(model_cfg, args.seq_len)
    peak = peak_flops(device)
    tokens_per_step = args.batch * args.seq_len * args.grad_accum * ctx.world_size
    log.say(f"training {args.config} ({n_params:,} parameters) on "
            f"{device} {'bf16 autocast' if amp else 'float32'}, {ctx.world_size} process(es) ({ctx.mode}) | "
            f"{args.epochs} epoch(s) x {steps_per_epoch} steps of up to {tokens_per_step:,} tokens | "
            f"lr {peak_lr:g}, warmup {warmup}, {args.schedule} | {thread_summary()}")
    pbar = None
    if ctx.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                    disable=None)
    t_start = time.perf_counter() - elapsed
    t_window, tok_window = time.perf_counter(), 0
    history, last_val, saved_at = [], None, [step if args.resume else None]  # step of the last state saved
    stop_reason, by_signal, first_step, last_ckpt = None, False, step, None
    bad_steps = BadSteps(log, f"now {peak_lr:g}")
    signals = StopSignals()
    model.train()
    try:
        signals.__enter__()
        while epoch < args.epochs and stop_reason is None:
            while step_in_epoch < steps_per_epoch:
                if step >= total_steps:
                    stop_reason = f"reached --max-steps {args.max_steps}"
                    break
                if args.eval_every and step > 0 and step % args.eval_every == 0:
                    last_val = validate(f"step {step}")
                    model.train()
                if args.save_every and step > 0 and step % args.save_every == 0 and not bad_steps.in_a_row:
                    # (never during a run of skipped steps: the state before the trouble is kept)
                    save_state(f"every {args.save_every} steps")

                # one optimizer step over grad_accum micro-batches
                lr = lr_at(step, total_steps, warmup, peak_lr, args.min_lr_ratio, args.schedule)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                micro = [data.get(epoch, step_in_epoch * args.grad_accum + m) for m in range(args.grad_accum)]
                n_targets, stop_reason, by_signal = step_start_sync(ctx, micro, args, t_start, signals.received)
                if stop_reason is not None:
                    break  # a step boundary: nothing of this step has run
                loss_sum = aux_sum = bal_sum = z_sum = 0.0
                loads = None
                for m, (x, y) in enumerate(micro):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with ctx.no_sync(model, last=m == len(micro) - 1), \
                            torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        out = model(x, y, loss_reduction="sum", return_logits=not fused_head)
                        loss = out.loss / n_targets.clamp(min=1) * ctx.world_size + out.aux_loss / len(micro)
                    ctx.backward(model, loss)
                    loss_sum += out.loss.detach()
                    aux_sum += out.aux_loss.detach() / len(micro)
                    bal_sum += out.balance_loss.detach() / len(micro)
                    z_sum += out.z_loss.detach() / len(micro)
                    loads = out.expert_counts if loads is None else loads + out.expert_counts
                # the loss is read every step (one host-device sync, with the grad norm) for metrics.jsonl,
                # exact-replay checks and the non-finite check that skips the update
                loss_val, gn, applied = ctx.clip_and_step(model, optimizer, args.grad_clip, ctx.all_reduce_sum(
                    torch.as_tensor(loss_sum, dtype=torch.float32)) / n_targets)
                finite = math.isfinite(loss_val) and math.isfinite(gn)
                if not finite and applied:  # DeepSpeed applied it (a NaN loss with finite gradients)
                    raise PakarError(f"step {step + 1}: DeepSpeed applied an update with loss {loss_val} and "
                                     f"gradient norm {gn}; stopping without saving, {last_saved()}")
                global_loads = None  # summed over ranks, when bias balancing or the log needs them
                if model_cfg.expert_bias_update_rate > 0 and applied:
                    global_loads = ctx.all_reduce_sum(loads.float())
                    update_expert_bias(raw_model.moe_layers(), global_loads, model_cfg.expert_bias_update_rate)
                step += 1
                step_in_epoch += 1
                step_tokens = int(n_targets)  # counted targets: padding of chat rows is not a token seen
                tokens_seen += step_tokens
                tok_window += step_tokens

                if not finite:
                    bad_steps.skip(step, epoch + 1, loss_val, gn, last_saved())
                    if pbar is not None:
                        pbar.update(1)
                    continue
                bad_steps.ok()
                history.append(loss_val)
                if step % args.log_every == 0 or step_in_epoch == steps_per_epoch or step == total_steps:
                    now = time.perf_counter()
                    tps = tok_window / max(now - t_window, 1e-9)
                    t_window, tok_window = now, 0
                    mfu = tps * flops_per_token / (peak * ctx.world_size) if peak else None  # tps is all GPUs'
                    if global_loads is None:
                        global_loads = ctx.all_reduce_sum(loads.float())
                    imbalance = expert_load_stats(global_loads)["imbalance_max"]
                    aux_sum, bal_sum, z_sum = (ctx.all_reduce_sum(torch.stack([torch.as_tensor(
                        v, dtype=torch.float32) for v in (aux_sum, bal_sum, z_sum)])) / ctx.world_size).tolist()
                    log.say(f"epoch {epoch + 1}/{args.epochs} | step {step}/{total_steps} | loss {loss_val:.4f} | "
                            f"aux {float(aux_sum):.4f} (balance {float(bal_sum):.3f}, z {float(z_sum):.3f}) | "
                            f"lr {lr:.2e} | grad norm {gn:.3f} | {tps:,.0f} tok/s"
                            + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                            + f" | expert imbalance {imbalance:.2f}", console=pbar is None or pbar.disable)
                    log.record(kind="train", step=step, epoch=epoch + 1, loss=loss_val, aux=float(aux_sum),
                               balance=float(bal_sum), z=float(z_sum), lr=lr, grad_norm=gn, tokens_per_s=tps,
                               mfu=mfu, imbalance=imbalance, tokens_seen=tokens_seen)
                else:
                    log.record(kind="train", step=step, epoch=epoch + 1, loss=loss_val, lr=lr)
                if pbar is not None:
                    pbar.set_postfix_str(f"epoch {epoch + 1}/{args.epochs} loss {loss_val:.3f} "
                                         f"{step_tokens * (pbar.format_dict.get('rate') or 0):,.0f} tok/s")
                    pbar.update(1)
            else:
                # epoch end: validate, sample, save model_epoch{N}.pt and the resumable state
                elapsed = time.perf_counter() - t_start
                last_val = validate(f"epoch {epoch + 1}")
                full = ctx.full_state(model, None)
                if ctx.is_main and data.can_sample:
                    # with sharded parameters a forward is collective: sample from a plain CPU copy instead
                    sampler, where = (raw_model, device) if not ctx.shards_parameters else (
                        _plain_model(model_cfg, full["model"], customize_model), torch.device("cpu"))
                    text = sample_text(sampler, tokenizer, args.sample_prompt, where)
                    log.say(f"sample (epoch {epoch + 1}): {text!r}")
                    del sampler
                epoch, step_in_epoch = epoch + 1, 0
                last_ckpt = save_model_checkpoint(f"model_epoch{epoch}", full, last_val) or last_ckpt
                del full
                ctx.barrier()
                save_state("epoch end")
                model.train()
        elapsed = time.perf_counter() - t_start
        if stop_reason is not None:
            if pbar is not None:
                pbar.close()
            if not by_signal and step_in_epoch > 0 and step > first_step:
                # --max-steps / --time-limit inside an epoch: the run still ends with a model and its validation
                last_val = validate(f"step {step}")
                last_ckpt = save_model_checkpoint(f"model_step{step}", ctx.full_state(model, None), last_val) \
                    or last_ckpt
                ctx.barrier()
            if saved_at[0] != step:
                save_state(stop_reason)
            log.say(stop_hint(stop_reason, args, step, step > first_step))
    except KeyboardInterrupt:
        elapsed = time.perf_counter() - t_start
        if pbar is not None:
            pbar.close()
        log.say(f"interrupted again: quit without saving this step; {last_saved()}")
        raise
    except torch.OutOfMemoryError:
        raise PakarError("out of GPU memory. Remedies: a smaller --batch (keep the global batch with "
                         "--grad-accum), a shorter --seq-len, --activation-checkpointing, --dtype bfloat16, "
                         "or more GPUs with --fsdp/--deepspeed. Nothing was saved from this step; the last "
                         "good checkpoint is untouched.") from None
    finally:
        signals.__exit__()
        if pbar is not None:
            pbar.close()

    summary = {"steps": step, "epochs_completed": epoch, "tokens_seen": tokens_seen, "seconds": round(elapsed, 2),
               "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "final_train_loss": history[-1] if history else None,
               "val_loss": last_val["loss"] if last_val else None,
               "val_bpb": last_val.get("bits_per_byte") if last_val else None,
               "stopped": stop_reason, "signal": (signals.received or signal.SIGTERM) if by_signal else None, "skipped_steps": bad_steps.total,
               "checkpoint": str(last_ckpt) if last_ckpt else None, "run_dir": str(run_dir.resolve())}
    log.say("done | " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in summary.items() if v is not None))
    log.close()
    D.teardown(ctx)
    return summary


class TokenStreamData:
    """Pretraining data: a prepared token stream (pakar.data) and its loader."""

    can_sample = True

    def __init__(self, tokens, loader, tokenizer, args: TrainArgs):
        self.tokens, self.loader, self.args = tokens, loader, args
        self.steps_per_epoch = loader.steps_per_epoch
        self.key = tokens.key  # the token cache key: sources, tokenizer and split rule

    def get(self, epoch: int, step: int):
        return self.loader.get(epoch, step)

    def evaluate(self, model, **kw) -> dict:
        from pakar.evaluate import evaluate_tokens

        return evaluate_tokens(model, self.tokens.val, self.args.batch, self.args.seq_len, **kw)


def _plain_model(config: ModelConfig, state: dict, customize_model: Callable | None) -> Transformer:
    """An unsharded CPU model from a full state dict (the tensors are shared, not copied)."""
    with torch.device("meta"):
        model = Transformer(config)
    if customize_model is not None:
        model = customize_model(model)
    model.load_state_dict(state, assign=True)
    model.finish_meta_build("cpu")
    return model


@torch.no_grad()
def sample_text(model: Transformer, tokenizer, prompt: str, device, max_new_tokens: int = 32) -> str:
    """A short greedy continuation, so the user can watch the model learn."""
    from pakar.engine import Engine, SamplingParams

    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt)
    out = Engine(model).generate([ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                       stop_token_ids=(tokenizer.eot_id,)))[0]
    model.train(was_training)
    return prompt + tokenizer.decode(out)



