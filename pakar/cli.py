"""The one `pakar` command. Each subcommand is a small `main(argv, prog)` in pakar.commands (the thin
command layer: one module per pipeline stage), which builds its parser from pakar.args, parses and
checks the flags, and only then imports the library module that does the work.

Command modules are imported only when their subcommand runs, and none imports torch (or numpy,
tokenizers, fastapi) before its flags are parsed, so `pakar --help`, `pakar <command> --help` and a
usage error answer at once (tests/test_layout.py checks that torch stays out; benchmarks/
bench_startup.py times it), and a missing optional dependency (DeepSpeed, gguf) only matters to the
command that needs it. That also lets the global `--threads N` and the OpenMP wait policy
(pakar.runtime) be set before torch loads.

Console output never fails on a character: model text can hold anything (U+FFFD included), and a
Windows console or a redirected/piped stream in cp1252 would raise UnicodeEncodeError on it. main()
sets errors="replace" on stdout/stderr once, for every command (the seed's entry points go through
it): the encoding stays what the terminal expects, and what it cannot show becomes "?".
"""

from __future__ import annotations

import importlib
import sys

from pakar import PakarError, __version__
from pakar.runtime import THREADS_HELP, configure_threads

# subcommand -> (module, function, one-line help), in pipeline order
COMMANDS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("pakar.commands.data", "main_tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "prepare": ("pakar.commands.data", "main_prepare", "tokenize a corpus into cached token shards"),
    "info": ("pakar.commands.info", "main", "parameters, FLOPs and training memory of a config"),
    "estimate": ("pakar.commands.train", "main_estimate", "time and memory of a training run, from a few real steps"),
    "train": ("pakar.commands.train", "main", "train a model (the seed's train.py)"),
    "finetune": ("pakar.commands.train", "main_finetune", "continue training or chat-SFT a checkpoint, optionally with LoRA"),
    "lora-merge": ("pakar.commands.train", "main_merge", "fold a LoRA adapter into a full checkpoint"),
    "eval": ("pakar.commands.evaluate", "main_eval", "loss, perplexity, bits per byte and expert use on a corpus"),
    "report": ("pakar.commands.report", "main", "rebuild a run's report.md and loss/bpb/lr/throughput/expert curves"),
    "chat": ("pakar.commands.chat", "main_chat", "interactive chat in the terminal (the seed's chat_interactive.py)"),
    "chat-batch": ("pakar.commands.chat", "main_batch", "answer a list of prompts and write a report (test_chat_batch.py)"),
    "export": ("pakar.commands.hf", "main_export", "write a Hugging Face Qwen3-MoE (or dense Qwen3) model folder"),
    "import": ("pakar.commands.hf", "main_import", "read a Hugging Face Qwen3-MoE or Qwen3 folder into a pakar checkpoint"),
    "serve": ("pakar.commands.serve", "main_serve", "OpenAI-compatible HTTP server with a web chat page"),
    "index": ("pakar.commands.retrieval", "main_index", "build a passage search index over your documents (for --index)"),
    "search": ("pakar.commands.retrieval", "main_search", "search an index: top passages with score and source"),
    "eval-rag": ("pakar.commands.evaluate", "main_eval_rag", "retrieval recall/MRR and answer EM/F1 on reading-comprehension QA"),
}



def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pakar <command> [options]   (pakar <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", THREADS_HELP]
    return "\n".join(lines)


def tolerant_console() -> None:
    """stdout/stderr replace characters their encoding cannot represent instead of raising."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (a test's capture, a closed stream)
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tolerant_console()
    try:
        argv = configure_threads(argv)  # before the command's module imports torch
    except PakarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
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
    except SystemExit:
        if "-h" in rest or "--help" in rest:  # argparse printed the command's help: add the global options
            print(f"\n{THREADS_HELP}")
        raise
    except PakarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk or a folder we may not write: one line naming the path, not a traceback
        from pakar.checkpoint import DISK_ERRORS  # lazy: it imports torch; the launcher stays light

        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: {e.filename or 'a file'}: {DISK_ERRORS[e.errno]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
