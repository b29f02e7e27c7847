"""`pakar export` (Hugging Face folder or GGUF file) and `pakar import` (a Hugging Face folder).

Parsers first (pakar.args holds the dtype names and the shard size), then torch and pakar.hf.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pakar.args import DEFAULT_MAX_SHARD, EXPORT_DTYPES
from pakar.config import ModelConfig
from pakar.info import param_counts


def main_export(argv: list[str], prog: str = "pakar export") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Write a Hugging Face Qwen3-MoE model folder (Qwen3 for a dense model) "
                                "(config.json, safetensors weights, tokenizer) from a pakar checkpoint.")
    p.add_argument("--checkpoint", help="pakar model checkpoint (.pt) (default: the newest "
                   "checkpoints/model_epoch*.pt in the current folder)")
    p.add_argument("--out", help="output folder, created; files of an earlier export there are replaced "
                   "(default: export/<checkpoint name>, e.g. export/model_epoch2)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: Hugging Face Qwen3-MoE (dense: Qwen3) folder; gguf: one file for llama.cpp, Ollama and LM Studio, "
                        "written to --out (default export/<checkpoint name>.gguf) with an Ollama Modelfile beside "
                        "it (needs pip install 'pakar[gguf]') (default: hf)")
    p.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f32",
                   help="GGUF weight type: f32 (exact), f16, or q8_0 (8-bit, about a quarter of f32's size) "
                        "(default: f32; only with --format gguf)")
    p.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="float32",
                   help="weight dtype in the folder (default: float32, exact; bfloat16 halves the size)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                   help=f"largest weight file, e.g. 5GB or 500MB; bigger models are split into shards with an "
                        f"index (default: {DEFAULT_MAX_SHARD})")
    p.add_argument("--allow-bias-drop", action="store_true",
                   help="export a checkpoint trained with aux-loss-free balancing (non-zero expert selection "
                        "bias) without that bias; its routing, and so its outputs, will differ (default: refuse)")
    args = p.parse_args(argv)
    from pakar.checkpoint import latest_epoch_checkpoint, safe_load  # lazy: torch, after the flags are parsed
    from pakar.hf import export_checkpoint

    path = Path(args.checkpoint) if args.checkpoint else latest_epoch_checkpoint(".")
    ckpt = safe_load(path)
    if args.format == "gguf":
        from pakar.gguf import export_gguf  # lazy: the optional gguf package

        export_gguf(ckpt, args.out or Path("export") / f"{path.stem}.gguf", outtype=args.outtype,
                    allow_bias_drop=args.allow_bias_drop)
        return 0
    export_checkpoint(ckpt, args.out or Path("export") / path.stem, dtype=args.dtype, allow_bias_drop=args.allow_bias_drop,
                      max_shard_size=args.max_shard_size)
    return 0


def main_import(argv: list[str], prog: str = "pakar import") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Read a local Hugging Face Qwen3-MoE or dense Qwen3 folder (safetensors, "
                                "tokenizer.json) into a self-contained pakar checkpoint (float32 weights).")
    p.add_argument("--from", dest="src", required=True, help="Hugging Face model folder (local; nothing is downloaded)")
    p.add_argument("--out", required=True, help="pakar checkpoint to write, e.g. checkpoints/imported.pt")
    args = p.parse_args(argv)
    from pakar.checkpoint import atomic_save  # lazy: torch, after the flags are parsed
    from pakar.hf import import_folder

    ckpt = import_folder(args.src)
    atomic_save(ckpt, args.out)
    n = param_counts(ModelConfig.from_dict(ckpt["config"]))["total_params"]
    print(f"imported {n / 1e6:.2f}M parameters from {args.src} to {args.out}")
    return 0
