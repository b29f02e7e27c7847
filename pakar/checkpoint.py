"""Checkpoint I/O, in one place.

Two kinds of file, both plain dicts of tensors, numbers, strings and lists, so that they load with
`torch.load(weights_only=True)`: a checkpoint can never execute code on the machine that opens it.

- Model checkpoint (`checkpoints/model_epoch{N}.pt`): self-contained, everything chat, eval,
  fine-tuning, export and serving need: {"format", "config" (ModelConfig fields), "model" (state dict),
  "tokenizer" (tokenizer.json text), "meta" (epoch, step, validation numbers, whether it was trained
  on the chat template, ...)}.
- Training state (`checkpoints/state.pt`): a model checkpoint plus what resuming needs to reproduce
  the next step exactly: optimizer state, loop counters, RNG states, the training arguments.

Writes are atomic: the bytes go to a temporary file in the same folder, are fsync'ed, and replace the
target with os.replace, so a crash mid-save leaves the previous good file in place.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from pakar import PakarError, __version__, what_is_there
from pakar.config import ModelConfig

FORMAT = "pakar-model-v1"


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    return obj


def model_checkpoint(model_state: dict, config: ModelConfig, tokenizer_json: str, **meta) -> dict:
    """The self-contained model checkpoint dict. `model_state` must be a plain (unwrapped) state dict."""
    state = {k: v.detach().cpu() for k, v in model_state.items()}
    return {"format": FORMAT, "config": config.to_dict(), "model": state, "tokenizer": tokenizer_json,
            "meta": {"pakar_version": __version__, **meta}}


def save_model(path: str | Path, model_state: dict, config: ModelConfig, tokenizer_json: str, **meta) -> None:
    atomic_save(model_checkpoint(model_state, config, tokenizer_json, **meta), path)


def build_model(ckpt: dict, device="cpu", dtype: torch.dtype | None = None):
    """A Transformer (eval mode) and a Tokenizer from a loaded checkpoint dict."""
    from pakar.model import Transformer
    from pakar.tokenizer import Tokenizer

    config = ModelConfig.from_dict(ckpt["config"])
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
    """The newest checkpoints/model_epoch{N}.pt (highest N) in a run directory."""
    ckdir = Path(run_dir) / "checkpoints"
    def epoch(p: Path) -> int:
        n = p.stem.removeprefix("model_epoch")
        return int(n) if n.isdigit() else -1

    found = sorted(ckdir.glob("model_epoch*.pt"), key=epoch)
    if not found:
        raise PakarError(f"no checkpoints/model_epoch*.pt in {Path(run_dir).resolve()} "
                         f"{what_is_there(ckdir / 'model_epoch1.pt')}; train first (python train.py ...) "
                         f"or pass --checkpoint PATH")
    return found[-1]
