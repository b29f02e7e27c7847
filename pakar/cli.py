"""The one `pakar` command. Each subcommand is a small `main(argv)` in the module that owns the work.

Modules are imported only when their subcommand runs, so `pakar --help` stays instant and a
missing optional dependency (DeepSpeed, PEFT) only matters to the command that needs it.
"""

from __future__ import annotations

import importlib
import sys

from pakar import PakarError

# subcommand -> (module, function, one-line help), in pipeline order
COMMANDS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("pakar.tokenizer", "main", "train a byte-level BPE tokenizer on a corpus"),
    "prepare": ("pakar.data", "main", "tokenize a corpus into cached token shards"),
    "info": ("pakar.info", "main", "parameters, FLOPs and training memory of a config"),
    "train": ("pakar.train", "main", "train a model (the seed's train.py)"),
    "finetune": ("pakar.finetune", "main", "continue training or chat-SFT a checkpoint, optionally with LoRA"),
    "lora-merge": ("pakar.lora", "main_merge", "fold a LoRA adapter into a full checkpoint"),
    "eval": ("pakar.evaluate", "main", "loss, perplexity, bits per byte and expert use on a corpus"),
    "chat": ("pakar.chat", "main_chat", "interactive chat in the terminal (the seed's chat_interactive.py)"),
    "chat-batch": ("pakar.chat", "main_batch", "answer a list of prompts and write a report (test_chat_batch.py)"),
    "export": ("pakar.hf", "main_export", "write a Hugging Face Qwen3-MoE model folder"),
    "import": ("pakar.hf", "main_import", "read a Hugging Face Qwen3-MoE folder into a pakar checkpoint"),
    "serve": ("pakar.serve", "main", "OpenAI-compatible HTTP server with a web chat page"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pakar <command> [options]   (pakar <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from pakar import __version__

        print(f"pakar {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pakar: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    entry = getattr(importlib.import_module(module), func)
    try:
        return int(entry(rest, prog=f"pakar {name}") or 0)
    except PakarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk or a folder we may not write: one line naming the path, not a traceback
        from pakar.checkpoint import DISK_ERRORS

        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: {e.filename or 'a file'}: {DISK_ERRORS[e.errno]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
