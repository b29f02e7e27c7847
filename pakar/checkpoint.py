"""Checkpoint I/O, in one place.

Two kinds of file, both plain dicts of tensors, numbers, strings and lists, so that they load with
`torch.load(weights_only=True)`: a checkpoint can never execute code on the machine that opens it.

- Model checkpoint (`checkpoints/model_epoch{N}.pt`): self-contained, everything chat, eval,
  fine-tuning, export and serving need: {"format", "config" (ModelConfig fields), "model" (state dict),
  "tokenizer" (tokenizer.json text), "meta" (epoch, step, validation numbers, whether it was trained
  on the chat template, ...)}.
- Training state (`checkpoints/state.pt`): a model checkpoint plus what resuming needs to reproduce
  the next step exactly: optimizer state, loop counters, RNG states, the training arguments. Built by
  `training_state` and read back by `load_training_state` (which refuses a state saved with other
  resume settings, process count, model config or data); the loop (pakar.train) only hands over plain
  dicts, so this module knows nothing of training beyond those entries.

Writes are atomic: the bytes go to a temporary file in the same folder (`.NAME.tmp<pid>`), are
fsync'ed, and replace the target with os.replace, so a crash mid-save leaves the previous good file in
place. A write that fails (disk full, permission denied) removes its temporary file and raises one
PakarError naming the path; a SIGKILL mid-write can still leave the temporary file, which the next
run in that folder removes (`remove_stale_temps`). Nothing non-finite is ever written: `atomic_save`
refuses an object holding a NaN or infinite float tensor (a diverged run must not replace the last
good checkpoint with a poisoned one).

Run folders (`check_run_dir`, shared by train and finetune): a folder that already holds a run
(checkpoints/state.pt or model/lora epoch or step checkpoints) is refused unless the run is resumed
(--resume) or replaced (--overwrite, which deletes those checkpoints first), and --init-from may never
point into the checkpoints/ folder the run writes.

Loading validates before anything is built, so a damaged or hand-edited file is one line naming the
file and the problem, never a traceback and never a model that silently computes NaN:
check_model_checkpoint (every model checkpoint and state file that safe_load opens) checks the four
entries, the config's fields, that the model it describes fits in memory (counted from the config
with pakar.info.param_counts, before any allocation: a config asking for 35 TB is refused at once),
that the tokenizer parses and fits the vocabulary, that every weight has the shape the config implies
and that every weight is finite. check_resume_state adds what --resume needs (optimizer with state,
RNG, loop counters, arguments). A training state is a model checkpoint plus those entries, so it
also works wherever a model checkpoint is expected.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from pakar import PakarError, __version__, what_is_there
from pakar.config import ModelConfig
from pakar.info import param_counts
from pakar.model import Transformer
from pakar.runtime import memory_bytes
from pakar.tokenizer import Tokenizer

FORMAT = "pakar-model-v1"
# what every model checkpoint (and so every state file) holds, with the type of each entry
REQUIRED_ENTRIES = {"config": dict, "model": dict, "tokenizer": str, "meta": dict}
# the config fields that decide the weights' shapes: a checkpoint must state them (no silent defaults)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings")
# what --resume needs beyond the model: training_state writes exactly these
RESUME_ENTRIES = {"optimizer": dict, "rng": dict, "loop": dict, "train_args": dict, "world_size": int}


def atomic_save(obj, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically; refuses non-finite tensors; disk errors are PakarErrors."""
    path = Path(path)
    bad = first_nonfinite(obj)
    if bad is not None:
        raise PakarError(f"refusing to write {path}: tensor {bad} holds NaN or infinite values; the previous "
                         f"file is kept")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, path.parent) if e.errno in DISK_ERRORS else e from None
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                # torch.save turns an OSError of the file's write() into an opaque "[enforce fail at
                # inline_container.cc]" RuntimeError: re-raise the OSError it swallowed, if any
                if recorder.error is not None:
                    raise recorder.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise write_error(e, path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _WriteRecorder:
    """The file object torch.save writes to, remembering the OSError a write raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # everything else (flush, tell, ...) is the file's
        return getattr(self.f, name)


DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
               getattr(errno, "EDQUOT", -1): "disk quota exceeded"}


def write_error(e: OSError, path: str | Path) -> PakarError:
    """One line for a failed write: what happened (disk full, permission denied, ...) and where."""
    reason = DISK_ERRORS.get(e.errno) or e.strerror or type(e).__name__
    return PakarError(f"cannot write {e.filename or path}: {reason}; the previous file (if any) is intact")


def first_nonfinite(obj, where: str = "") -> str | None:
    """The key path of the first floating-point tensor with a NaN or inf in a nest of dicts/lists, or
    None. One pass over every tensor (a few seconds for the 3b preset's state, once per save)."""
    if torch.is_tensor(obj):
        if (obj.is_floating_point() or obj.is_complex()) and obj.numel() and not bool(torch.isfinite(obj).all()):
            return where or "(top level)"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = first_nonfinite(v, f"{where}.{k}" if where else str(k))
        if bad is not None:
            return bad
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks: a base checkpoint's identity in LoRA adapters and
    fine-tuning metadata, and an index's source manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def safe_load(path: str | Path, map_location="cpu", fmt: str = FORMAT, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True and one-line errors for missing, truncated or foreign files.
    `fmt` is the expected "format" field (a model checkpoint by default; pakar.lora's adapters too)."""
    path = Path(path)
    if not path.is_file():
        raise PakarError(f"{what} not found: {path} {what_is_there(path)}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PakarError(f"refusing to load {path}: it contains objects that are not plain weights "
                         f"(a pickle that could run code, or not a pakar file): {first}") from None
    except Exception as e:  # a truncated zip fails in many ways (RuntimeError, EOFError, KeyError, ...)
        raise PakarError(f"cannot read {what} {path}: truncated or not a PyTorch file "
                         f"({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        hint = ""
        if isinstance(obj, dict) and obj.get("format") == FORMAT and fmt != FORMAT:
            hint = " (it is a full model checkpoint)"
        elif isinstance(obj, dict) and fmt == FORMAT and "adapters" in obj:
            hint = " (it is a LoRA adapter: fold it into a checkpoint with `pakar lora-merge`)"
        name = "pakar checkpoint" if fmt == FORMAT else f"pakar {what}"
        raise PakarError(f"{path} is not a {name} (expected format {fmt!r}){hint}")
    if fmt == FORMAT:
        check_model_checkpoint(obj, path)
    return obj


def model_bytes(config: ModelConfig, bytes_per_param: int = 4) -> int:
    """Bytes a built model of `config` occupies: its parameters (counted from the config, nothing is
    allocated) and the float32 rotary tables."""
    rope = 2 * config.max_position_embeddings * config.head_dim * 4
    return param_counts(config)["total_params"] * bytes_per_param + rope


def check_fits(config: ModelConfig, device: torch.device | str = "cpu", bytes_per_param: int = 4,
               source: str = "the model") -> None:
    """PakarError if a model of `config` cannot fit in `device`'s memory (checked before allocating)."""
    need, have = model_bytes(config, bytes_per_param), memory_bytes(device)
    if have is not None and need > have:
        raise PakarError(f"{source}: its config describes {param_counts(config)['total_params']:,} parameters "
                         f"({need / 2**30:,.1f} GiB), more than the {have / 2**30:,.1f} GiB of memory of "
                         f"{torch.device(device)}; refusing to build it")


def config_from_checkpoint(d: dict, source) -> ModelConfig:
    """The ModelConfig a checkpoint's "config" entry describes; PakarError naming the field otherwise."""
    missing = [k for k in SHAPE_FIELDS if k not in d]
    if missing:
        raise PakarError(f"{source}: its config lacks {', '.join(missing)}")
    try:
        return ModelConfig.from_dict(d)
    except PakarError as e:
        raise PakarError(f"{source}: {e}") from None
    except TypeError as e:  # a value of a type the checks cannot even compare
        raise PakarError(f"{source}: invalid model config ({e})") from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every persistent tensor of a Transformer(config) and its shape (built on the meta device: free)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}


def check_weights(state: dict, config: ModelConfig, source) -> None:
    """PakarError naming the first weight that is missing, unexpected, not a tensor, of the wrong shape
    or not finite. LoRA factors in a fine-tuning state are checked for finiteness only."""
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise PakarError(f"{source}: weight {bad[0]!r} is not a tensor")
    base, adapters = split_state(state)
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in base]
    unexpected = [k for k in base if k not in expected]
    if missing or unexpected:
        raise PakarError(f"{source}: the weights do not match its config: "
                         + ", ".join(f"{what} {names[:3]}" for what, names in (("missing", missing),
                                     ("unexpected", unexpected)) if names))
    for k, shape in expected.items():
        if tuple(base[k].shape) != shape:
            raise PakarError(f"{source}: weight {k} has shape {tuple(base[k].shape)}, its config implies {shape}")
    check_finite(state, source)


def split_state(state: dict) -> tuple[dict, dict]:
    """A LoRA model's state dict -> (the plain base state dict with the model's own key names,
    {base key: {"lora_A": A, "lora_B": B} or, for token rows, {"rows": ids, "delta": (n, D)}})."""
    base, adapters = {}, {}
    for key, value in state.items():
        if ".parametrizations." in key:  # <module>.parametrizations.<name>.original | .0.<factor>
            module, rest = key.split(".parametrizations.", 1)
            name, tail = rest.split(".", 1)
            if tail == "original":
                base[f"{module}.{name}"] = value
            elif tail in ("0.lora_A", "0.lora_B", "0.rows", "0.delta"):
                adapters.setdefault(f"{module}.{name}", {})[tail[2:]] = value
            else:
                raise PakarError(f"unexpected parametrized state key {key!r}")
        elif key.endswith((".lora_A", ".lora_B")):
            owner, which = key.rsplit(".", 1)
            adapters.setdefault(f"{owner}.weight", {})[which] = value
        else:
            base[key] = value
    return base, adapters


def check_finite(tensors: dict, source) -> None:
    """PakarError naming the first floating-point tensor of a flat {name: tensor} dict with a NaN or an
    infinity (first_nonfinite finds it)."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        n = int((~torch.isfinite(tensors[bad])).sum())
        raise PakarError(f"{source}: weight {bad} has {n:,} non-finite value(s) (NaN or infinity): the run "
                         f"that wrote it diverged; use an earlier checkpoint")


def check_model_checkpoint(ckpt: dict, source) -> ModelConfig:
    """Everything build_model relies on, checked without building anything (see the module docstring).
    Returns the checkpoint's ModelConfig."""
    for key, kind in REQUIRED_ENTRIES.items():
        if key not in ckpt:
            raise PakarError(f"{source}: not a complete pakar checkpoint: its {key!r} entry is missing")
        if not isinstance(ckpt[key], kind):
            raise PakarError(f"{source}: its {key!r} entry is a {type(ckpt[key]).__name__}, "
                             f"expected a {kind.__name__}")
    config = config_from_checkpoint(ckpt["config"], source)
    check_fits(config, "cpu", source=str(source))
    try:
        tokenizer = Tokenizer.from_json(ckpt["tokenizer"])
    except PakarError as e:
        raise PakarError(f"{source}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise PakarError(f"{source}: its tokenizer has {tokenizer.vocab_size:,} tokens, more than the model's "
                         f"vocab_size {config.vocab_size:,}")
    check_weights(ckpt["model"], config, source)
    return config


def check_resume_state(obj: dict, path) -> None:
    """PakarError unless `obj` (already through safe_load) holds everything --resume restores: a model
    checkpoint copied to state.pt, or a state whose optimizer lost its moments, would otherwise resume
    with a fresh AdamW or crash."""
    absent = [k for k in RESUME_ENTRIES if k not in obj]
    if len(absent) == len(RESUME_ENTRIES):
        raise PakarError(f"{path} is a model checkpoint, not a resumable state (no optimizer, RNG or loop "
                         f"counters): start a new run with --init-from {path} instead of --resume")
    if absent:
        raise PakarError(f"{path}: not a complete resumable state: {', '.join(absent)} missing")
    for key, kind in RESUME_ENTRIES.items():
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise PakarError(f"{path}: its {key!r} entry is a {type(obj[key]).__name__}, expected a {kind.__name__}")
    missing = [k for k in ("epoch", "step_in_epoch", "step", "tokens_seen", "elapsed") if k not in obj["loop"]]
    if missing:
        raise PakarError(f"{path}: its loop counters lack {', '.join(missing)}")
    optimizer = obj["optimizer"]
    # AdamW creates its moments at the first step: only a state saved before any step may have none
    if not optimizer.get("param_groups") or (not optimizer.get("state") and obj["loop"]["step"] != 0):
        raise PakarError(f"{path}: its optimizer state is empty (no AdamW moments after {obj['loop']['step']} "
                         f"steps): resuming would silently restart the optimizer; start a new run with "
                         f"--init-from {path} instead")
    for name, value in optimizer["state"].items():
        tensors = {f"optimizer state {name}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)} \
            if isinstance(value, dict) else {}
        check_finite(tensors, path)
    if "torch" not in obj["rng"]:
        raise PakarError(f"{path}: its RNG state has no 'torch' generator state")


def rng_state() -> dict:
    """Every random generator a training step may draw from (dropout-free pakar draws few, but a
    customized model or a data hook may), for bit-identical resume."""
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


def training_state(model_ckpt: dict, optimizer_state: dict, train_args: dict, world_size: int, loop: dict) -> dict:
    """state.pt's dict: a model checkpoint (`model_checkpoint`) plus the RESUME_ENTRIES, with the RNG
    states of this moment."""
    return {**model_ckpt, "optimizer": optimizer_state, "train_args": train_args, "world_size": world_size,
            "rng": rng_state(), "loop": loop}


def load_training_state(path: Path, train_args: dict, resume_keys, world_size: int, config: ModelConfig,
                        data_key: str) -> dict:
    """Read state.pt for --resume, refusing one that cannot continue this run: a missing or incomplete
    file, or one saved with other values of the `resume_keys` arguments, another number of processes,
    another model config or other training data (`data_key`)."""
    if not path.is_file():
        raise PakarError(f"--resume: no saved state at {path}; start without --resume")
    state = safe_load(path)
    check_resume_state(state, path)
    saved = state["train_args"]
    changed = [f"--{k.replace('_', '-')} (was {saved.get(k)!r}, now {train_args.get(k)!r})"
               for k in resume_keys if saved.get(k) != train_args.get(k)]
    if state["world_size"] != world_size:
        changed.append(f"world size (saved with {state['world_size']} processes, now {world_size})")
    if state["config"] != config.to_dict():
        changed.append("model config")
    if state["meta"].get("data_key") != data_key:
        changed.append("training data or tokenizer")
    if changed:
        raise PakarError("cannot resume: the run was saved with different settings: " + ", ".join(changed)
                         + "; use the same flags, or start a new run in another --out")
    return state


def model_checkpoint(model_state: dict, config: ModelConfig, tokenizer_json: str, **meta) -> dict:
    """The self-contained model checkpoint dict. `model_state` must be a plain (unwrapped) state dict."""
    state = {k: v.detach().cpu() for k, v in model_state.items()}
    return {"format": FORMAT, "config": config.to_dict(), "model": state, "tokenizer": tokenizer_json,
            "meta": {"pakar_version": __version__, **meta}}


def save_model(path: str | Path, model_state: dict, config: ModelConfig, tokenizer_json: str, **meta) -> None:
    atomic_save(model_checkpoint(model_state, config, tokenizer_json, **meta), path)


def build_model(ckpt: dict, device="cpu", dtype: torch.dtype | None = None):
    """A Transformer (eval mode) and a Tokenizer from a loaded checkpoint dict."""
    config = ModelConfig.from_dict(ckpt["config"])
    bytes_per_param = torch.finfo(dtype).bits // 8 if dtype is not None else 4
    check_fits(config, device, bytes_per_param, "checkpoint")  # a GPU may hold less than the RAM it came from
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise PakarError(f"checkpoint weights do not match its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    if dtype is not None:
        model = model.to(dtype)
    model.finish_meta_build(device)
    return model.eval(), Tokenizer.from_json(ckpt["tokenizer"])


def load_model(path: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, checkpoint dict) from a model checkpoint or a training state file."""
    ckpt = safe_load(path)
    model, tokenizer = build_model(ckpt, device, dtype)
    return model, tokenizer, ckpt


def latest_epoch_checkpoint(run_dir: str | Path = ".") -> Path:
    """The newest model checkpoint of a run directory: checkpoints/model_epoch{N}.pt (end of epoch N) or
    model_step{S}.pt (a run stopped by --max-steps or --time-limit mid-epoch), the one trained for the
    most optimizer steps (its meta "step"; read with mmap, so no tensor is loaded), then the highest N."""
    ckdir = Path(run_dir) / "checkpoints"

    def progress(p: Path) -> tuple[int, int]:
        n = p.stem.removeprefix("model_epoch").removeprefix("model_step")
        try:
            step = int(torch.load(p, map_location="cpu", weights_only=True, mmap=True)["meta"]["step"])
        except Exception:  # unreadable or foreign: ordered by name only; loading it reports the problem
            step = -1
        return step, int(n) if n.isdigit() else -1

    found = sorted([*ckdir.glob("model_epoch*.pt"), *ckdir.glob("model_step*.pt")], key=progress)
    if not found:
        raise PakarError(f"no checkpoints/model_epoch*.pt in {Path(run_dir).resolve()} "
                         f"{what_is_there(ckdir / 'model_epoch1.pt')}; train first (python train.py ...) "
                         f"or pass --checkpoint PATH")
    return found[-1]


# --- run folders ------------------------------------------------------------------------------------

# What a run writes into checkpoints/ and what a new run there would overwrite.
RUN_FILES = re.compile(r"^(state|(model|lora)_(epoch|step)\d+)\.pt$")
# pakar's temporary files: atomic_save and hf (".NAME.tmp<pid>"), the tokenizer, token shards and their
# manifest ("NAME.tmp-<pid>", "train.bin.tmp-<pid>-moved")
TEMP_FILES = re.compile(r"^(\..+\.tmp(?P<a>\d+)|.+\.tmp-(?P<b>\d+)(-moved)?)$")


def run_files(run_dir: str | Path) -> list[Path]:
    """The checkpoints a run left in run_dir/checkpoints (state.pt, model/lora epoch and step files)."""
    ck = Path(run_dir) / "checkpoints"
    return sorted(p for p in ck.iterdir() if RUN_FILES.match(p.name)) if ck.is_dir() else []


def check_run_dir(out: str | Path, resume: bool, overwrite: bool, init_from: str | None) -> None:
    """Refuse to start a run that would destroy another: --out holding a run without --resume or
    --overwrite, both flags at once, or --init-from inside the checkpoints/ folder this run writes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PakarError(f"--out {out} is a file, not a folder")
    if resume and overwrite:
        raise PakarError("--resume continues the run in --out and --overwrite replaces it: pick one")
    if init_from and Path(init_from).resolve().parent == (out / "checkpoints").resolve():
        raise PakarError(f"--init-from {init_from} is inside {out / 'checkpoints'}, which this run writes (it "
                         f"would overwrite the checkpoint it starts from): pass another --out, e.g. --out finetune")
    found = run_files(out)
    if found and not (resume or overwrite):
        raise PakarError(f"--out {out} already holds a training run ({found[0]}): add --resume to continue it, "
                         f"or --overwrite to replace it (or pass another --out)")


def remove_run_files(run_dir: str | Path) -> list[Path]:
    """--overwrite: delete the previous run's checkpoints (a leftover model_epoch5.pt would otherwise
    pass for this run's newest). Returns what was deleted."""
    found = run_files(run_dir)
    for p in found:
        p.unlink(missing_ok=True)
    return found


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (POSIX). Elsewhere False: os.kill would terminate it on Windows."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that a killed save left in a run folder (the folder itself,
    checkpoints/ and each data/<key>/ shard folder), except those of a process that is still running
    (POSIX; a live writer's file is left alone). Returns what was deleted."""
    run_dir = Path(run_dir)
    folders = [run_dir, run_dir / "checkpoints", *(run_dir / "data").glob("*/")]
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = TEMP_FILES.match(p.name)
            if m and p.is_file() and not _alive(int(m["a"] or m["b"])):
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass  # not ours to remove (permissions): harmless, it is never read
    return removed
