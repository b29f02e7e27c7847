"""Typed command arguments, the flag checks, and the defaults that command-line help states.

Light on purpose: this module imports only the standard library and pakar.config (no torch, numpy,
tokenizers or fastapi), so pakar.commands builds every parser, parses and validates flags from it and
answers `--help` and usage errors before any heavy import. The library modules import their defaults
from here (one number, one home) and take these dataclasses, never an argparse namespace.

- TrainArgs / FinetuneArgs: the flags of `pakar train` / `pakar finetune` as fields; __post_init__
  checks ranges and names (PakarError naming the flag), so a library caller gets the same checks.
- check_number / check_out_folder: the one-line flag checks every command uses.
- Defaults shown in help: learning rates per preset, vocabulary bounds (pakar.tokenizer), export
  dtypes and shard size (pakar.hf), the server's limits (pakar.serve).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pakar import PakarError
from pakar.config import PRESETS
from pakar.memory import PLAN_CHOICES  # light too: no torch

# --- defaults shown in help (the library modules import theirs from here) ---------------------------

DEFAULT_LR = {"tiny": 3e-3, "small": 1.5e-3, "default": 3e-4, "3b": 2e-4}


def default_lr(preset: str, finetune: bool = False, lora: bool = False) -> float:
    """The peak learning rate when --lr is not given, the one rule for pretraining and fine-tuning:
    the preset's pretraining rate (DEFAULT_LR, 3e-4 for an unknown preset); a tenth of it to fine-tune
    all weights (continuing from trained weights takes smaller steps); LoRA adapters start at zero and
    train from scratch, so they keep the pretraining rate."""
    lr = DEFAULT_LR.get(preset, 3e-4)
    return lr / 10 if finetune and not lora else lr


SAMPLE_PROMPT = "Indonesia adalah"
CHAT_VAL_FRACTION = 0.05  # chat conversations held out by pakar finetune (text keeps corpus.VAL_FRACTION)
MIN_VOCAB = 256 + 3  # the 256 bytes and pakar.tokenizer.SPECIAL_TOKENS (which asserts the count)
MAX_VOCAB = 1 << 20  # far above any BPE in use (Qwen's has 151,646); larger sizes crash `tokenizers`' trainer
DEFAULT_VOCAB = 8192
EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # pakar export --dtype
DEFAULT_MAX_SHARD = "5GB"  # transformers 4.x's default shard size
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds a connection gets to send a request's headers (and its body)
DEFAULT_MAX_CONNECTIONS = 512
API_KEY_ENV = "PAKAR_API_KEY"


# --- flag checks -------------------------------------------------------------------------------------

def check_number(flag: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """PakarError naming `flag` and the allowed range unless `value` is a finite number within it
    (None = the flag is unset, accepted). argparse's float() accepts "nan" and "inf": this refuses them."""
    if value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        show = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
        if low is not None and high is not None:
            allowed = f"in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"
        elif low is not None:
            allowed = f"{'>' if low_open else '>='} {show(low)}"
        elif high is not None:
            allowed = f"{'<' if high_open else '<='} {show(high)}"
        else:
            allowed = "a finite number"
        shown = str(value)
        raise PakarError(f"{flag} {shown if len(shown) <= 40 else shown[:37] + '...'}: must be {allowed}")


def check_out_folder(flag: str, path) -> None:
    """PakarError if `path` names an existing file where a folder is meant (mkdir would fail later)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise PakarError(f"{flag} {path}: is a file, not a folder; give a folder name")



# --- LoRA settings (pakar.lora applies them) -----------------------------------------------------------

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj")


TARGET_GROUPS = {"attention": ATTENTION_TARGETS, "experts": EXPERT_TARGETS,
                 "all": ATTENTION_TARGETS + EXPERT_TARGETS}


def parse_targets(names) -> tuple[str, ...]:
    """--lora-targets words (tensor names or the groups attention / experts / all) -> tensor names,
    in a canonical order."""
    chosen: set[str] = set()
    for name in ([names] if isinstance(names, str) else names):
        for word in str(name).replace(",", " ").split():
            if word in TARGET_GROUPS:
                chosen.update(TARGET_GROUPS[word])
            elif word in TARGET_GROUPS["all"]:
                chosen.add(word)
            else:
                raise PakarError(f"--lora-targets: unknown target {word!r}; choose from "
                                 f"{', '.join(TARGET_GROUPS['all'])} or the groups {', '.join(TARGET_GROUPS)}")
    if not chosen:
        raise PakarError("--lora-targets: no target given")
    return tuple(t for t in TARGET_GROUPS["all"] if t in chosen)


@dataclass
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = ATTENTION_TARGETS
    token_ids: tuple[int, ...] = ()  # vocabulary rows of embed_tokens and lm_head trained alongside

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise PakarError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if not 0 < self.alpha < math.inf:
            raise PakarError(f"--lora-alpha must be a finite number > 0, got {self.alpha}")
        self.targets = parse_targets(self.targets)
        self.token_ids = tuple(sorted(set(int(i) for i in self.token_ids)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets), "token_ids": list(self.token_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                   token_ids=tuple(d.get("token_ids", ())))



# --- typed arguments ---------------------------------------------------------------------------------

@dataclass
class TrainArgs:
    epochs: int = 1
    batch: int = 8  # sequences per device per micro-step
    config: str = "small"
    seq_len: int = 256
    data: list[str] | None = None  # None: the embedded sample corpus
    out: str = "."
    grad_accum: int = 1
    lr: float | None = None  # None: the preset's default
    min_lr_ratio: float = 0.1
    warmup: int | None = None  # optimizer steps; None: 5% of the run, at most 200
    schedule: str = "cosine"  # cosine | wsd
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule is fitted to it)
    time_limit: float | None = None  # minutes; save the state and stop when reached
    eval_every: int = 0  # optimizer steps; 0 = only at epoch ends
    eval_tokens: int = 2**20  # at most this many validation tokens per evaluation
    save_every: int = 200  # optimizer steps between resumable states (and at every epoch end)
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False  # replace the run already in --out (deletes its checkpoints)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16
    vocab_size: int = DEFAULT_VOCAB  # when a tokenizer has to be trained
    val_fraction: float | None = None  # share of documents held out; None: pakar.corpus.VAL_FRACTION,
    # or 5% for the small embedded sample corpus so that its validation loss means something
    activation_checkpointing: bool = False
    compile: bool = False
    init_from: str | None = None  # start from this checkpoint's weights and tokenizer (fine-tuning)
    sample_prompt: str = SAMPLE_PROMPT
    deepspeed: bool = False
    deepspeed_config: str | None = None
    fsdp: bool = False
    memory_plan: str = "auto"  # auto | full | lowmem | offload (pakar.memory)

    def __post_init__(self):
        for flag, low in (("epochs", 1), ("batch", 1), ("seq-len", 8), ("grad-accum", 1), ("log-every", 1),
                          ("save-every", 0), ("eval-every", 0), ("eval-tokens", 1), ("warmup", 0), ("max-steps", 1)):
            check_number(f"--{flag}", getattr(self, flag.replace("-", "_")), low)
        check_number("--seed", self.seed, 0, 2**64 - 1)  # torch and numpy seeds are unsigned 64-bit
        check_number("--lr", self.lr, 0, low_open=True)
        check_number("--min-lr-ratio", self.min_lr_ratio, 0, 1)
        check_number("--weight-decay", self.weight_decay, 0)
        check_number("--grad-clip", self.grad_clip, 0)  # 0 = off
        check_number("--time-limit", self.time_limit, 0, low_open=True)
        check_number("--val-fraction", self.val_fraction, 0, 0.5, low_open=True)
        check_number("--vocab-size", self.vocab_size, MIN_VOCAB, MAX_VOCAB)
        check_out_folder("--out", self.out)
        if self.config not in PRESETS:
            raise PakarError(f"unknown --config {self.config!r}; choose one of: {', '.join(PRESETS)}")
        if self.schedule not in ("cosine", "wsd"):
            raise PakarError(f"--schedule must be cosine or wsd, got {self.schedule!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise PakarError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.memory_plan not in PLAN_CHOICES:
            raise PakarError(f"--memory-plan must be one of {', '.join(PLAN_CHOICES)}, got {self.memory_plan!r}")
        if self.memory_plan in ("lowmem", "offload") and (self.fsdp or self.deepspeed):
            raise PakarError(f"--memory-plan {self.memory_plan} keeps its own optimizer state; with --fsdp or "
                             f"--deepspeed (which shard or offload it themselves) use --memory-plan full or auto")

    # Fields that change what the next step computes: a resumed run must keep them.
    RESUME_KEYS = ("config", "batch", "seq_len", "grad_accum", "lr", "min_lr_ratio", "warmup", "schedule",
                   "weight_decay", "grad_clip", "seed", "dtype", "init_from")


@dataclass
class FinetuneArgs(TrainArgs):
    out: str = "finetune"
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float | None = None  # None: 2 x rank
    lora_targets: list[str] = field(default_factory=lambda: ["attention"])
    val_fraction: float | None = None  # held-out share; None: 5% of chat conversations, 1% of text documents
    merge: bool = False  # LoRA: also write merged model_epoch{N}.pt

    RESUME_KEYS = TrainArgs.RESUME_KEYS + ("lora_rank", "lora_alpha", "lora_targets", "val_fraction")

    def __post_init__(self):
        super().__post_init__()
        if not self.init_from:
            raise PakarError("fine-tuning needs --checkpoint PATH (the model to start from)")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise PakarError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_rank:
            if self.lora_alpha is None:
                self.lora_alpha = 2.0 * self.lora_rank
            spec = LoraSpec(self.lora_rank, float(self.lora_alpha), tuple(self.lora_targets))
            self.lora_alpha, self.lora_targets = spec.alpha, list(spec.targets)
        elif self.merge:
            raise PakarError("--merge folds LoRA adapters into the model: it needs --lora-rank R")
        if self.val_fraction is not None and not 0 < self.val_fraction <= 0.5:
            raise PakarError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction}")

    def lora_spec(self) -> LoraSpec | None:
        return LoraSpec(self.lora_rank, float(self.lora_alpha), tuple(self.lora_targets)) if self.lora_rank else None

