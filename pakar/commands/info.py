"""`pakar info`: parameters, FLOPs and training memory of a config (no torch needed at all)."""

from __future__ import annotations

import argparse
import json

from pakar import PakarError
from pakar.config import PRESETS, get_config
from pakar.info import info, render


def main(argv: list[str], prog: str = "pakar info") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Parameters, training FLOPs per token and training "
                                "memory of a model config, computed from the config alone.")
    p.add_argument("--config", default="default", help=f"preset: {', '.join(PRESETS)} (default: default)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (default: the preset's, 8192; a trained tokenizer decides in practice)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per GPU per micro-step, for the "
                   "activation memory (default: 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value < 1:
            raise PakarError(f"{flag} must be a positive integer, got {value}")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    cfg = get_config(args.config, **overrides)  # PakarError naming the preset or the field
    if args.seq_len > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=args.seq_len)  # as `pakar train` does
    r = info(cfg, args.seq_len, args.batch_size)
    print(json.dumps({"config_name": args.config, **r}) if args.json else render(args.config, r))
    return 0
