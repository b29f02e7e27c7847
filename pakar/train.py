"""Training: the seed's `python train.py --epochs 5 --batch 2 --config default --seq-len 256`.

train() reads top to bottom as a sequence of named parts: open_run (device, log, run folder) ->
load_data -> make_model -> plan_run (step plan, AdamW, wrapping for the mode: the read-only `Run`) ->
resume (state.pt into a `Loop` of counters) -> run_epoch (per optimizer step: evaluate and save when due,
train_step, log_step) and end_epoch after each epoch -> end_early (a stop inside the run) -> end_run
(summary). The distributed context comes from the caller (pakar.distributed.setup, or train() sets it
up when none is given); state.pt is built and checked in pakar.checkpoint. Choices:
- The run directory (`--out`, default ".") holds tokenizer.json, the token cache (data/), training.log,
  metrics.jsonl, checkpoints/ (model_epoch{N}.pt at each epoch end, state.pt to resume), and what
  pakar.report draws from metrics.jsonl: curves/*.png (at evaluations, throttled, and at the end),
  report.md (at the end) and, with --tensorboard, tensorboard/ event files.
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
- Only rank 0 writes logs and checkpoints; the distributed wrapping lives in pakar.distributed
  (DeepSpeed in pakar.zero).
- Learning-rate defaults: one rule, `default_lr` (the preset's rate; a tenth for full fine-tuning).

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
import shutil
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import pakar.distributed as dist_ctx
from pakar import PakarError
from pakar.args import TrainArgs, default_lr
from pakar.checkpoint import (DISK_ERRORS, atomic_save, check_run_dir, load_training_state, model_checkpoint,
                              remove_run_files, remove_stale_temps, safe_load, set_rng_state, training_state,
                              write_error)
from pakar.config import ModelConfig, get_config
from pakar.corpus import VAL_FRACTION
from pakar.data import BatchLoader, prepare
from pakar.engine import Engine, SamplingParams
from pakar.evaluate import evaluate_tokens
from pakar.info import ASSUMED_MFU, flop_seconds, human_duration, param_counts, train_flops_per_token
from pakar.memory import check_resume_plan, make_optimizer, resolve_plan
from pakar.model import Transformer
from pakar.moe import expert_load_stats, update_expert_bias
from pakar.report import LiveCurves, tensorboard_writer, to_tensorboard, write_report
from pakar.runtime import autocast_dtype, cpu_bf16_warning, peak_flops, resolve_device, thread_summary
from pakar.tokenizer import Tokenizer

# The time estimate in the first lines: optimizer steps of warm-up (the allocator, first-touch pages,
# autotuning make the first step slow), then steps timed; a few, so the line comes early.
ESTIMATE_WARMUP_STEPS, ESTIMATE_STEPS = 1, 3

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



class RunLog:
    """training.log (human lines) and metrics.jsonl (one JSON object per record), rank 0 only; with
    `tensorboard` the records' numbers also go to TensorBoard event files, and refresh_curves() redraws
    the PNG curves from metrics.jsonl (pakar.report). Console output goes through tqdm.write so it does
    not break the progress bar."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.text = self._open(run_dir / "training.log") if enabled else None
        self.jsonl = self._open(run_dir / "metrics.jsonl") if enabled else None
        self.tb = tensorboard_writer(run_dir) if enabled and tensorboard else None
        self.curves = LiveCurves(run_dir, lambda m: self.say(m, console=False)) if enabled else None

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
            tqdm.write(msg, file=sys.stdout)

    def record(self, **fields) -> None:
        if self.enabled:
            self._write(self.jsonl, json.dumps(fields) + "\n")
            if self.tb is not None:
                to_tensorboard(self.tb, fields)

    def refresh_curves(self) -> None:
        if self.curves is not None:
            self.curves.refresh()

    def close(self) -> None:
        for f in (self.text, self.jsonl):
            if f:
                f.close()
        if self.tb is not None:
            self.tb.close()


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

# --- the loop, in parts -----------------------------------------------------------------------------
# train() reads top to bottom: open the run -> data -> model -> optimizer (wrapped for the mode) ->
# resume -> epochs of train_step/log_step with end_epoch after each -> end_run. What the parts share
# is a `Run` (built once, then read-only) and a `Loop` (the counters and what the loop keeps between
# steps); state.pt's format lives in pakar.checkpoint (training_state / load_training_state).

@dataclass
class Run:
    """Everything the loop's parts read, fixed before the first step."""

    args: TrainArgs
    ctx: dist_ctx.Context
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None = float32
    memory_plan: str  # full | lowmem | offload (pakar.memory)
    log: RunLog
    run_dir: Path
    data: object  # TokenStreamData or pakar.finetune's ChatData (see train()'s docstring)
    tokenizer: object
    model_cfg: ModelConfig
    model: torch.nn.Module  # as wrapped for the mode (DDP, FSDP, DeepSpeed engine)
    raw_model: Transformer  # the Transformer itself (FSDP shards it in place)
    optimizer: object
    n_params: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    peak_lr: float
    fused_head: bool  # the fused head + loss (not under ZeRO-3, see plan_run)
    token_bytes: torch.Tensor  # UTF-8 bytes of each token, for bits per byte
    flops_per_token: float  # training FLOPs, for MFU
    peak_flops: float | None  # the accelerator's peak, None when unknown
    meta: dict  # the caller's extra checkpoint meta
    customize_model: Callable | None
    save_epoch: Callable | None

    @property
    def ck_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def state_path(self) -> Path:
        return self.ck_dir / "state.pt"


@dataclass
class Loop:
    """The loop's counters (the first five are state.pt's "loop" entry) and what it keeps between steps."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds of training, over all resumed runs
    t_start: float = 0.0  # perf_counter() of the (virtual) start: now - elapsed
    t_window: float = 0.0  # start of the throughput window of the next log line
    tok_window: int = 0
    first_step: int = 0  # the step this process started at
    saved_at: int | None = None  # step of the last state.pt written (or resumed from)
    history: list = dataclasses.field(default_factory=list)  # train losses of applied steps
    last_val: dict | None = None
    last_ckpt: Path | None = None
    stop_reason: str | None = None
    by_signal: bool = False
    bad_steps: BadSteps | None = None
    pbar: object = None  # tqdm progress bar on rank 0
    estimate_mark: tuple[float, int] | None = None  # (perf_counter, tokens_seen) after the warm-up steps

    def saved(self, total_steps: int) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
                "tokens_seen": self.tokens_seen, "total_steps": total_steps,
                "elapsed": time.perf_counter() - self.t_start}


@dataclass
class StepResult:
    """One optimizer step's numbers."""

    loss: float  # global mean loss
    grad_norm: float  # global gradient norm before clipping
    finite: bool  # False: a non-finite loss or norm, the update skipped
    lr: float
    tokens: int  # counted targets over all ranks
    aux: torch.Tensor | float  # the MoE auxiliary losses, means over micro-batches (this rank)
    balance: torch.Tensor | float
    z: torch.Tensor | float
    loads: torch.Tensor  # expert loads of this rank, summed over micro-batches
    global_loads: torch.Tensor | None  # summed over ranks, when bias balancing needed them


def train(args: TrainArgs, *, ctx: dist_ctx.Context | None = None, data=None, tokenizer=None,
          customize_model: Callable | None = None, save_epoch: Callable | None = None, meta: dict | None = None,
          init_ckpt: dict | None = None) -> dict:
    """Train and return a summary dict. `ctx` is the distributed context (pakar.distributed.setup(args);
    set up here when None; torn down at the end either way). Extension points for fine-tuning
    (pakar.finetune): `data` (an object with .steps_per_epoch, .key, .can_sample, .get(epoch, step) ->
    (x, y) with y = -100 where not counted, and .evaluate(model, **kw) -> dict), `tokenizer`,
    `customize_model(model) -> model` (e.g. wrap with LoRA adapters; only parameters left trainable are
    optimised), `save_epoch(state, path_stem, meta) -> path` to write epoch checkpoints differently from
    the full state dict (e.g. adapters only), `meta` added to every checkpoint's meta, `init_ckpt` the
    args.init_from checkpoint if the caller has already loaded it (its "model" tensors are popped once
    the model holds them, so no second copy stays in memory)."""
    check_run_dir(args.out, args.resume, args.overwrite, args.init_from)  # before any process writes
    ctx = ctx if ctx is not None else dist_ctx.setup(args)
    device, amp, log = open_run(args, ctx)
    if init_ckpt is None and args.init_from:
        init_ckpt = safe_load(args.init_from)
    data, tokenizer = load_data(args, ctx, log, data, tokenizer, init_ckpt)
    model_cfg, model = make_model(args, device, tokenizer, init_ckpt, customize_model)
    run = plan_run(args, ctx, device, amp, log, data, tokenizer, model_cfg, model, init_ckpt,
                          meta or {}, customize_model, save_epoch)
    loop = resume(run) if args.resume else Loop()
    signals = StopSignals()
    try:
        start_loop(run, loop)
        signals.__enter__()
        while loop.epoch < args.epochs and loop.stop_reason is None:
            run_epoch(run, loop, signals)
            if loop.stop_reason is None:
                end_epoch(run, loop)
        loop.elapsed = time.perf_counter() - loop.t_start
        if loop.stop_reason is not None:
            end_early(run, loop)
    except KeyboardInterrupt:
        loop.elapsed = time.perf_counter() - loop.t_start
        if loop.pbar is not None:
            loop.pbar.close()
        log.say(f"interrupted again: quit without saving this step; {last_saved(run, loop)}")
        raise
    except torch.OutOfMemoryError:
        raise PakarError("out of GPU memory. Remedies: a smaller --batch (keep the global batch with "
                         "--grad-accum), a shorter --seq-len, --activation-checkpointing, --memory-plan lowmem or "
                         "offload (`pakar info --gpu-memory GIB` predicts each), or more GPUs with --fsdp/--deepspeed. Nothing was saved from this step; the last "
                         "good checkpoint is untouched.") from None
    finally:
        signals.__exit__()
        if loop.pbar is not None:
            loop.pbar.close()
    return end_run(run, loop, signals)


def open_run(args: TrainArgs, ctx: dist_ctx.Context) -> tuple[torch.device, torch.dtype | None, RunLog]:
    """The device, the autocast dtype and the run folder's log; claims the folder (refusing another
    run's, deleting stale temporary files)."""
    device = ctx.device if ctx.device is not None else resolve_device(args.device)
    if args.compile:
        check_compiler()  # before any data work: inductor would fail only at the first step
    ck_dir = Path(args.out) / "checkpoints"
    if ctx.is_main:
        try:
            ck_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(e, ck_dir) if e.errno in DISK_ERRORS else e from None
    log = RunLog(Path(args.out), ctx.is_main, args.tensorboard)
    claim_run_dir(args, log.say, ctx.is_main)
    amp = autocast_dtype(args.dtype, device)
    if warning := cpu_bf16_warning(args.dtype, device):
        log.say(warning)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain run on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return device, amp, log


def load_data(args: TrainArgs, ctx: dist_ctx.Context, log: RunLog, data, tokenizer, init_ckpt: dict | None):
    """The caller's data, or the prepared token stream of --data (rank 0 prepares it first); checks that
    every rank holds the same data."""
    if data is None:
        if init_ckpt is not None and tokenizer is None:
            tokenizer = Tokenizer.from_json(init_ckpt["tokenizer"])
        tokenizer, tokens = dist_ctx.run_on_main_first(ctx, lambda: prepare(
            args.data, args.out, vocab_size=args.vocab_size, tokenizer=tokenizer, val_fraction=val_fraction_of(args),
            log=(lambda m: log.say(m)) if ctx.is_main else (lambda m: None)))
        data = TokenStreamData(tokens, BatchLoader(tokens.train, args.batch, args.seq_len, args.seed,
                                                   ctx.rank, ctx.world_size), tokenizer, args)
    ctx.check_same(data.key, "the training data and tokenizer")
    return data, tokenizer


def val_fraction_of(args: TrainArgs) -> float:
    """The held-out share of the documents: --val-fraction, else 1% of a corpus, 5% of the small
    embedded sample corpus (so that its validation loss means something)."""
    return args.val_fraction or (VAL_FRACTION if args.data else 0.05)


def model_config(args: TrainArgs, tokenizer, init_ckpt: dict | None) -> ModelConfig:
    """The run's architecture: --init-from's, or the --config preset with the tokenizer's vocabulary
    (and a context of at least --seq-len)."""
    if init_ckpt is not None:
        model_cfg = ModelConfig.from_dict(init_ckpt["config"])
        if args.seq_len > model_cfg.max_position_embeddings:
            raise PakarError(f"--seq-len {args.seq_len} exceeds the checkpoint's context of "
                             f"{model_cfg.max_position_embeddings} tokens")
        return model_cfg
    model_cfg = get_config(args.config, vocab_size=tokenizer.vocab_size)
    if args.seq_len > model_cfg.max_position_embeddings:
        model_cfg = model_cfg.replace(max_position_embeddings=args.seq_len)
    return model_cfg


def make_model(args: TrainArgs, device: torch.device, tokenizer, init_ckpt: dict | None,
               customize_model: Callable | None, model_cfg: ModelConfig | None = None
               ) -> tuple[ModelConfig, torch.nn.Module]:
    """The model (--init-from's weights or a fresh --config preset), customized, on the device, with
    activation checkpointing and per-block compilation as asked. `model_cfg` replaces model_config's
    architecture (pakar.estimate times a model with fewer layers)."""
    model_cfg = model_cfg or model_config(args, tokenizer, init_ckpt)
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
    return model_cfg, model


def run_steps(steps_per_epoch: int, args: TrainArgs) -> int:
    """Optimizer steps of the whole run: every epoch's, capped by --max-steps."""
    total = steps_per_epoch * args.epochs
    return total if args.max_steps is None else min(total, args.max_steps)


def plan_run(args: TrainArgs, ctx: dist_ctx.Context, device, amp, log: RunLog, data, tokenizer,
                    model_cfg: ModelConfig, model, init_ckpt: dict | None, meta: dict,
                    customize_model: Callable | None, save_epoch: Callable | None) -> Run:
    """The step plan (steps per epoch, total, warmup, peak lr), the memory plan's optimizer
    (pakar.memory), and the model and optimizer wrapped for the mode: the finished `Run`."""
    n_params = sum(p.numel() for p in model.parameters())  # counted before FSDP/ZeRO-3 partition them
    steps_per_epoch = data.steps_per_epoch // args.grad_accum
    if steps_per_epoch < 1:
        raise PakarError(f"the corpus gives {data.steps_per_epoch} micro-batches per epoch, fewer than "
                         f"--grad-accum {args.grad_accum}; use more data or a smaller --batch/--grad-accum")
    total_steps = run_steps(steps_per_epoch, args)
    warmup = args.warmup if args.warmup is not None else max(1, min(200, total_steps // 20))
    preset = init_ckpt["meta"].get("config_name", args.config) if init_ckpt is not None else args.config
    peak_lr = args.lr if args.lr is not None else default_lr(preset, finetune=init_ckpt is not None)
    plan, why = resolve_plan(args, model_cfg, model, device, bf16=amp is not None, world_size=ctx.world_size)
    log.say(why)
    optimizer = make_optimizer(model, plan, peak_lr, args.weight_decay, device, bf16=amp is not None)
    wrapped, optimizer = ctx.wrap(model, optimizer)
    # The fused head + loss reads lm_head.weight inside the model's forward, without calling lm_head:
    # ZeRO-3 gathers a partitioned weight only in its own module's forward, so it keeps the plain head.
    return Run(args=args, ctx=ctx, device=device, amp=amp, memory_plan=plan, log=log, run_dir=Path(args.out),
               data=data, tokenizer=tokenizer, model_cfg=model_cfg, model=wrapped, raw_model=model,
               optimizer=optimizer, n_params=n_params, steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup=warmup,
               peak_lr=peak_lr, fused_head=ctx.zero_stage != 3, meta=meta, customize_model=customize_model,
               save_epoch=save_epoch, token_bytes=tokenizer.token_byte_lengths(),
               flops_per_token=train_flops_per_token(model_cfg, args.seq_len), peak_flops=peak_flops(device))


def resume(run: Run) -> Loop:
    """Load state.pt (checked against this run by pakar.checkpoint.load_training_state) into the model,
    the optimizer and the RNGs; the loop counters it held."""
    args = run.args
    state = load_training_state(run.state_path, dataclasses.asdict(args), type(args).RESUME_KEYS,
                                run.ctx.world_size, run.model_cfg, run.data.key)
    check_resume_plan(state["optimizer"], run.memory_plan)
    run.ctx.load_state(run.model, run.optimizer, state)
    saved = state["loop"]
    loop = Loop(epoch=saved["epoch"], step_in_epoch=saved["step_in_epoch"], step=saved["step"],
                tokens_seen=saved["tokens_seen"], elapsed=saved["elapsed"], saved_at=saved["step"])
    set_rng_state(state["rng"])
    run.log.say(f"resumed from {run.state_path} at epoch {loop.epoch + 1}, step {loop.step} "
                f"({loop.step_in_epoch} into the epoch)")
    if saved.get("total_steps", run.total_steps) != run.total_steps:
        run.log.say(f"the lr schedule is now fitted to {run.total_steps} steps (the saved run had "
                    f"{saved['total_steps']}, --max-steps or --epochs changed): the learning rate differs from "
                    f"step {loop.step} on")
    return loop


def start_loop(run: Run, loop: Loop) -> None:
    """The run's first log line, the progress bar, the clocks."""
    args, ctx = run.args, run.ctx
    tokens_per_step = args.batch * args.seq_len * args.grad_accum * ctx.world_size
    run.log.say(f"training {args.config} ({run.n_params:,} parameters) on "
                f"{run.device} {'bf16 autocast' if run.amp else 'float32'}, {ctx.world_size} process(es) "
                f"({ctx.mode}) | {args.epochs} epoch(s) x {run.steps_per_epoch} steps of up to "
                f"{tokens_per_step:,} tokens | lr {run.peak_lr:g}, warmup {run.warmup}, {args.schedule} | "
                f"{thread_summary()}")
    if ctx.is_main:
        loop.pbar = tqdm(total=run.total_steps, initial=loop.step, unit="step", dynamic_ncols=True,
                         file=sys.stderr, disable=None)
    loop.t_start = time.perf_counter() - loop.elapsed
    loop.t_window, loop.tok_window, loop.first_step = time.perf_counter(), 0, loop.step
    loop.bad_steps = BadSteps(run.log, f"now {run.peak_lr:g}")
    run.log.record(**start_record(run, loop, tokens_per_step))
    if run.peak_flops and loop.step < run.total_steps:
        say_flop_estimate(run, loop)
    run.model.train()


def start_record(run: Run, loop: Loop, tokens_per_step: int) -> dict:
    """metrics.jsonl's "start" record: the settings, data and plan that pakar.report's report card states."""
    tokens = getattr(run.data, "tokens", None)  # TokenStreamData; chat data has conversations
    return {"kind": "start", "resume": run.args.resume, "step": loop.step, "time": time.time(),
            "args": dataclasses.asdict(run.args), "model_config": run.model_cfg.to_dict(), "n_params": run.n_params,
            "active_params": param_counts(run.model_cfg)["active_params"], "vocab_size": run.model_cfg.vocab_size,
            "world_size": run.ctx.world_size, "mode": run.ctx.mode, "device": str(run.device),
            "precision": "bf16 autocast" if run.amp else "float32", "steps_per_epoch": run.steps_per_epoch,
            "total_steps": run.total_steps, "warmup": run.warmup, "peak_lr": run.peak_lr,
            "tokens_per_step": tokens_per_step,
            "train_tokens": len(tokens.train) if tokens is not None else None,
            "val_tokens": len(tokens.val) if tokens is not None else None,
            "train_conversations": len(run.data.train) if tokens is None and hasattr(run.data, "train") else None}


def run_epoch(run: Run, loop: Loop, signals: StopSignals) -> None:
    """Optimizer steps until the epoch ends or the run must stop (loop.stop_reason set)."""
    args = run.args
    while loop.step_in_epoch < run.steps_per_epoch:
        if loop.step >= run.total_steps:
            loop.stop_reason = f"reached --max-steps {args.max_steps}"
            return
        if args.eval_every and loop.step > 0 and loop.step % args.eval_every == 0:
            loop.last_val = validate(run, loop, f"step {loop.step}")
            run.model.train()
        if args.save_every and loop.step > 0 and loop.step % args.save_every == 0 and not loop.bad_steps.in_a_row:
            # (never during a run of skipped steps: the state before the trouble is kept)
            save_state(run, loop, f"every {args.save_every} steps")
        lr = lr_at(loop.step, run.total_steps, run.warmup, run.peak_lr, args.min_lr_ratio, args.schedule)
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        micro = [run.data.get(loop.epoch, loop.step_in_epoch * args.grad_accum + m) for m in range(args.grad_accum)]
        n_targets, loop.stop_reason, loop.by_signal = step_start_sync(run.ctx, micro, args, loop.t_start,
                                                                      signals.received)
        if loop.stop_reason is not None:
            return  # a step boundary: nothing of this step has run
        res = train_step(run, micro, n_targets, lr, loop)
        loop.step += 1
        loop.step_in_epoch += 1
        loop.tokens_seen += res.tokens
        loop.tok_window += res.tokens
        if not res.finite:
            loop.bad_steps.skip(loop.step, loop.epoch + 1, res.loss, res.grad_norm, last_saved(run, loop))
        else:
            loop.bad_steps.ok()
            loop.history.append(res.loss)
            log_step(run, loop, res)
        say_measured_estimate(run, loop)
        if loop.pbar is not None:
            if res.finite:
                loop.pbar.set_postfix_str(f"epoch {loop.epoch + 1}/{args.epochs} loss {res.loss:.3f} "
                                          f"{res.tokens * (loop.pbar.format_dict.get('rate') or 0):,.0f} tok/s")
            loop.pbar.update(1)


def tokens_per_epoch(run: Run) -> int:
    """Targets one epoch trains on (every window is full; a loss mask would make this an upper bound)."""
    return run.steps_per_epoch * run.args.batch * run.args.seq_len * run.args.grad_accum * run.ctx.world_size


def say_flop_estimate(run: Run, loop: Loop) -> None:
    """Before step 1 on a GPU whose peak is known: the epoch's time from its FLOPs at ASSUMED_MFU."""
    remaining = (run.total_steps - loop.step) * tokens_per_epoch(run) / run.steps_per_epoch
    peak = run.peak_flops * run.ctx.world_size
    run.log.say(f"estimate from FLOPs at {100 * ASSUMED_MFU:.0f}% MFU: ≈ "
                f"{human_duration(flop_seconds(tokens_per_epoch(run), run.flops_per_token, peak))} per epoch, ≈ "
                f"{human_duration(flop_seconds(remaining, run.flops_per_token, peak))} for the run "
                f"(measured after step {loop.first_step + ESTIMATE_WARMUP_STEPS + ESTIMATE_STEPS})")


def say_measured_estimate(run: Run, loop: Loop) -> None:
    """After ESTIMATE_WARMUP_STEPS + ESTIMATE_STEPS steps of this process: the epoch's and the rest of
    the run's time at the speed of the last ESTIMATE_STEPS (the steps the loop runs anyway; their
    throughput is read at step boundaries, where train_step has already synchronised)."""
    done = loop.step - loop.first_step
    if done == ESTIMATE_WARMUP_STEPS:
        loop.estimate_mark = (time.perf_counter(), loop.tokens_seen)
    elif done == ESTIMATE_WARMUP_STEPS + ESTIMATE_STEPS and loop.estimate_mark is not None:
        t0, tokens0 = loop.estimate_mark
        tps = (loop.tokens_seen - tokens0) / max(time.perf_counter() - t0, 1e-9)
        remaining = (run.total_steps - loop.step) * tokens_per_epoch(run) / run.steps_per_epoch
        run.log.say(f"estimate: ≈ {human_duration(tokens_per_epoch(run) / tps)} per epoch on this device, ≈ "
                    f"{human_duration(remaining / tps)} for the remaining {run.total_steps - loop.step:,} steps "
                    f"({tps:,.0f} tokens/s over steps {loop.first_step + ESTIMATE_WARMUP_STEPS + 1}-{loop.step}; "
                    f"evaluation and saving not counted)")
        run.log.record(kind="estimate", step=loop.step, tokens_per_s=tps,
                       seconds_per_epoch=tokens_per_epoch(run) / tps, seconds_remaining=remaining / tps)


def train_step(run: Run, micro: list, n_targets: torch.Tensor, lr: float, loop: Loop) -> StepResult:
    """One optimizer step over the grad_accum micro-batches: forward and backward of each (the loss
    normalised by the step's global target count), clip and step (skipped when non-finite), the router
    bias update. `loop` is read only, for the error message of an update DeepSpeed applied anyway."""
    ctx, device, amp = run.ctx, run.device, run.amp
    loss_sum = aux_sum = bal_sum = z_sum = 0.0
    loads = None
    for m, (x, y) in enumerate(micro):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with ctx.no_sync(run.model, last=m == len(micro) - 1), \
                torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = run.model(x, y, loss_reduction="sum", return_logits=not run.fused_head)
            loss = out.loss / n_targets.clamp(min=1) * ctx.world_size + out.aux_loss / len(micro)
        ctx.backward(run.model, loss)
        loss_sum += out.loss.detach()
        aux_sum += out.aux_loss.detach() / len(micro)
        bal_sum += out.balance_loss.detach() / len(micro)
        z_sum += out.z_loss.detach() / len(micro)
        loads = out.expert_counts if loads is None else loads + out.expert_counts
    # the loss is read every step (one host-device sync, with the grad norm) for metrics.jsonl,
    # exact-replay checks and the non-finite check that skips the update
    loss_val, gn, applied = ctx.clip_and_step(run.model, run.optimizer, run.args.grad_clip, ctx.all_reduce_sum(
        torch.as_tensor(loss_sum, dtype=torch.float32)) / n_targets)
    finite = math.isfinite(loss_val) and math.isfinite(gn)
    if not finite and applied:  # DeepSpeed applied it (a NaN loss with finite gradients)
        raise PakarError(f"step {loop.step + 1}: DeepSpeed applied an update with loss {loss_val} and "
                         f"gradient norm {gn}; stopping without saving, {last_saved(run, loop)}")
    global_loads = None  # summed over ranks, when bias balancing or the log needs them
    if run.model_cfg.expert_bias_update_rate > 0 and applied:
        global_loads = ctx.all_reduce_sum(loads.float())
        update_expert_bias(run.raw_model.moe_layers(), global_loads, run.model_cfg.expert_bias_update_rate)
    return StepResult(loss=loss_val, grad_norm=gn, finite=finite, lr=lr, tokens=int(n_targets), aux=aux_sum,
                      balance=bal_sum, z=z_sum, loads=loads, global_loads=global_loads)


def log_step(run: Run, loop: Loop, res: StepResult) -> None:
    """metrics.jsonl's record of an applied step; every --log-every steps (and at an epoch's or the
    run's last step) the full line with throughput, MFU, auxiliary losses and expert imbalance."""
    args, ctx, step = run.args, run.ctx, loop.step
    if not (step % args.log_every == 0 or loop.step_in_epoch == run.steps_per_epoch or step == run.total_steps):
        run.log.record(kind="train", step=step, epoch=loop.epoch + 1, loss=res.loss, lr=res.lr)
        return
    now = time.perf_counter()
    tps = loop.tok_window / max(now - loop.t_window, 1e-9)
    loop.t_window, loop.tok_window = now, 0
    mfu = tps * run.flops_per_token / (run.peak_flops * ctx.world_size) if run.peak_flops else None  # all GPUs'
    global_loads = res.global_loads if res.global_loads is not None else ctx.all_reduce_sum(res.loads.float())
    imbalance = expert_load_stats(global_loads)["imbalance_max"]
    aux, bal, z = (ctx.all_reduce_sum(torch.stack([torch.as_tensor(v, dtype=torch.float32)
                                                   for v in (res.aux, res.balance, res.z)])) / ctx.world_size).tolist()
    pbar = loop.pbar
    moe = not run.model_cfg.dense  # a dense model has no auxiliary losses or experts to report
    run.log.say(f"epoch {loop.epoch + 1}/{args.epochs} | step {step}/{run.total_steps} | loss {res.loss:.4f} | "
                + (f"aux {aux:.4f} (balance {bal:.3f}, z {z:.3f}) | " if moe else "")
                + f"lr {res.lr:.2e} | grad norm {res.grad_norm:.3f} | "
                f"{tps:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                + (f" | expert imbalance {imbalance:.2f}" if moe else ""), console=pbar is None or pbar.disable)
    run.log.record(kind="train", step=step, epoch=loop.epoch + 1, loss=res.loss, aux=aux, balance=bal, z=z,
                   lr=res.lr, grad_norm=res.grad_norm, tokens_per_s=tps, mfu=mfu, imbalance=imbalance,
                   tokens_seen=loop.tokens_seen, elapsed=now - loop.t_start)


def end_epoch(run: Run, loop: Loop) -> None:
    """An epoch's end: validate, print a sample, save model_epoch{N}.pt and the resumable state."""
    ctx = run.ctx
    loop.elapsed = time.perf_counter() - loop.t_start
    loop.last_val = validate(run, loop, f"epoch {loop.epoch + 1}")
    full = ctx.full_state(run.model, None)
    log_sample(run, loop, full, f"epoch {loop.epoch + 1}")
    loop.epoch, loop.step_in_epoch = loop.epoch + 1, 0
    loop.last_ckpt = save_model_checkpoint(run, loop, f"model_epoch{loop.epoch}", full, loop.last_val) or loop.last_ckpt
    del full
    ctx.barrier()
    save_state(run, loop, "epoch end")
    run.model.train()


def log_sample(run: Run, loop: Loop, full: dict, tag: str) -> None:
    """A greedy sample from --sample-prompt (text data, rank 0) in training.log and metrics.jsonl, so the
    user, and report.md, see what the model writes at each epoch end and at a stop by a limit."""
    ctx = run.ctx
    if ctx.is_main and run.data.can_sample:
        # with sharded parameters a forward is collective: sample from a plain CPU copy instead
        sampler, where = (run.raw_model, run.device) if not ctx.shards_parameters else (
            _plain_model(run.model_cfg, full["model"], run.customize_model), torch.device("cpu"))
        text = sample_text(sampler, run.tokenizer, run.args.sample_prompt, where)
        run.log.say(f"sample ({tag}): {text!r}")
        run.log.record(kind="sample", step=loop.step, epoch=loop.epoch + 1, prompt=run.args.sample_prompt, text=text)


def end_early(run: Run, loop: Loop) -> None:
    """A stop inside the run (--max-steps, --time-limit, a signal): a model checkpoint and its
    validation when stopped inside an epoch by a limit, the resumable state, the line saying how to go on."""
    if loop.pbar is not None:
        loop.pbar.close()
    if not loop.by_signal and loop.step_in_epoch > 0 and loop.step > loop.first_step:
        # --max-steps / --time-limit inside an epoch: the run still ends with a model and its validation
        loop.last_val = validate(run, loop, f"step {loop.step}")
        full = run.ctx.full_state(run.model, None)
        log_sample(run, loop, full, f"step {loop.step}")
        loop.last_ckpt = save_model_checkpoint(run, loop, f"model_step{loop.step}", full, loop.last_val) or loop.last_ckpt
        del full
        run.ctx.barrier()
    if loop.saved_at != loop.step:
        save_state(run, loop, loop.stop_reason)
    run.log.say(stop_hint(loop.stop_reason, run.args, loop.step, loop.step > loop.first_step))


def end_run(run: Run, loop: Loop, signals: StopSignals) -> dict:
    """The summary (logged and returned); closes the log and tears the process group down."""
    last_val, history = loop.last_val, loop.history
    summary = {"steps": loop.step, "epochs_completed": loop.epoch, "tokens_seen": loop.tokens_seen,
               "seconds": round(loop.elapsed, 2), "tokens_per_s": loop.tokens_seen / max(loop.elapsed, 1e-9),
               "final_train_loss": history[-1] if history else None,
               "val_loss": last_val["loss"] if last_val else None,
               "val_bpb": last_val.get("bits_per_byte") if last_val else None,
               "stopped": loop.stop_reason,
               "signal": (signals.received or signal.SIGTERM) if loop.by_signal else None,
               "skipped_steps": loop.bad_steps.total,
               "checkpoint": str(loop.last_ckpt) if loop.last_ckpt else None, "run_dir": str(run.run_dir.resolve())}
    run.log.say("done | " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in summary.items() if v is not None))
    run.log.record(kind="end", **summary)
    if run.ctx.is_main:
        try:  # the report card and the final curves (pakar.report); `pakar report` rebuilds them any time
            written = write_report(run.run_dir, say=lambda m: run.log.say(m))
            run.log.say(f"report: {written['report']}")
        except Exception as e:  # never turn a finished training into a failed one
            run.log.say(f"report: not written ({type(e).__name__}: {e}); try `pakar report {run.run_dir}`")
    run.log.close()
    dist_ctx.teardown(run.ctx)
    return summary


# --- what the loop's parts share: checkpoints and validation --------------------------------------

def checkpoint_meta(run: Run, loop: Loop, **extra) -> dict:
    return {"epoch": loop.epoch, "step": loop.step, "config_name": run.args.config, "seq_len": run.args.seq_len,
            "data_key": run.data.key, **run.meta, **extra}


def save_state(run: Run, loop: Loop, reason: str) -> None:
    """state.pt (pakar.checkpoint.training_state); collective under FSDP/DeepSpeed: every rank calls it."""
    ctx = run.ctx
    full = ctx.full_state(run.model, run.optimizer)
    if ctx.is_main:
        ckpt = model_checkpoint(full["model"], run.model_cfg, run.tokenizer.to_json(), **checkpoint_meta(run, loop))
        atomic_save(training_state(ckpt, full["optimizer"], dataclasses.asdict(run.args), ctx.world_size,
                                   loop.saved(run.total_steps)), run.state_path)
        run.log.say(f"saved resumable state at step {loop.step} ({reason}): {run.state_path}", console=False)
    loop.saved_at = loop.step
    ctx.barrier()


def save_model_checkpoint(run: Run, loop: Loop, stem: str, full: dict, val: dict | None) -> Path | None:
    """model_epoch{N}.pt / model_step{S}.pt (or the save_epoch extension's files); rank 0 writes."""
    if not run.ctx.is_main:
        return None
    m = checkpoint_meta(run, loop, val_loss=val["loss"] if val else None,
                        val_bpb=val.get("bits_per_byte") if val else None)
    if run.save_epoch is not None:
        path = run.save_epoch(full["model"], run.ck_dir / stem, m)
    else:
        path = run.ck_dir / f"{stem}.pt"
        atomic_save(model_checkpoint(full["model"], run.model_cfg, run.tokenizer.to_json(), **m), path)
    run.log.say(f"saved {path}")
    return path


def last_saved(run: Run, loop: Loop) -> str:
    return (f"the last good state is {run.state_path} (step {loop.saved_at})" if loop.saved_at is not None
            else f"no state was saved yet ({run.state_path} is from before, if any)")


def validate(run: Run, loop: Loop, tag: str) -> dict:
    args = run.args
    res = run.data.evaluate(run.model, token_bytes=run.token_bytes, device=run.device,
                            autocast_dtype=run.amp, max_tokens=args.eval_tokens)
    bpb = res.get("bits_per_byte")
    run.log.say(f"validation ({tag}) | loss {res['loss']:.4f} | ppl {res['perplexity']:.2f} | "
                f"bpb {bpb:.4f} | {res['tokens']:,} tokens" if bpb is not None else
                f"validation ({tag}) | loss {res['loss']:.4f} | ppl {res['perplexity']:.2f} | {res['tokens']:,} tokens")
    # elapsed: seconds since the run started, on --time-limit's clock; eval_seconds: this evaluation's share of it
    run.log.record(kind="val", step=loop.step, epoch=loop.epoch + 1, loss=res["loss"], perplexity=res["perplexity"],
                   bits_per_byte=bpb, tokens=res["tokens"], bytes=res.get("bytes"),
                   elapsed=round(time.perf_counter() - loop.t_start, 3), eval_seconds=round(res["seconds"], 3),
                   tokens_seen=loop.tokens_seen,
                   expert_fraction=[[round(x, 6) for x in row] for row in res.get("expert_fraction") or []])
    run.log.refresh_curves()
    return res


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
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt)
    low = any(p.dtype == torch.bfloat16 for p in model.parameters())  # a lowmem/offload plan's bf16 weights
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=low):
        out = Engine(model).generate([ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                           stop_token_ids=(tokenizer.eot_id,)))[0]
    model.train(was_training)
    return prompt + tokenizer.decode(out)



