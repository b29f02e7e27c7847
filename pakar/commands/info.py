"""`pakar info`: parameters, FLOPs and training memory of a config (no torch needed at all)."""

from __future__ import annotations

import argparse
import json

from pakar import PakarError
from pakar.config import PRESETS, get_config
from pakar.info import info, render
from pakar.memory import gib, plan_table


def main(argv: list[str], prog: str = "pakar info") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Parameters, training FLOPs per token and training "
                                "memory of a model config, computed from the config alone.")
    p.add_argument("--config", default="default", help=f"preset: {', '.join(PRESETS)} (default: default)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (default: the preset's, 8192; a trained tokenizer decides in practice)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per GPU per micro-step, for the "
                   "activation memory (default: 2)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="also list every --memory-plan's predicted peak on a CUDA GPU of this many GiB (bf16) "
                   "and whether it fits")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="with --gpu-memory: predict with activation checkpointing")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    if args.gpu_memory is not None and not 0 < args.gpu_memory < 1e6:
        raise PakarError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value < 1:
            raise PakarError(f"{flag} must be a positive integer, got {value}")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    cfg = get_config(args.config, **overrides)  # PakarError naming the preset or the field
    if args.seq_len > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=args.seq_len)  # as `pakar train` does
    r = info(cfg, args.seq_len, args.batch_size)
    if args.gpu_memory is not None:
        r["gpu_memory_bytes"] = int(args.gpu_memory * 2**30)
        r["plans"] = plan_table(cfg, args.batch_size, args.seq_len, device_type="cuda", bf16=True,
                                activation_checkpointing=args.activation_checkpointing,
                                free_bytes=r["gpu_memory_bytes"])
    print(json.dumps({"config_name": args.config, **r}) if args.json else render(args.config, r))
    if args.gpu_memory is not None and not args.json:
        print(render_plans(r["plans"], args.gpu_memory, args.activation_checkpointing))
    return 0


def render_plans(plans: list[dict], gpu_gib: float, checkpointing: bool) -> str:
    lines = [f"memory plans on a {gpu_gib:g} GiB CUDA GPU with bf16 autocast"
             f"{' and activation checkpointing' if checkpointing else ''} (--memory-plan; peak includes ~1 GiB "
             f"of CUDA context):"]
    for pl in plans:
        host = f", + {gib(pl['host_bytes'])} host RAM" if pl["host_bytes"] else ""
        fits = "fits" if pl["fits"] else "does not fit"
        lines.append(f"  {pl['name']:8s} peak {gib(pl['peak_bytes']):>11s}{host}: {fits}")
    return "\n".join(lines)
