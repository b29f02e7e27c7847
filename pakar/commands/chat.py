"""`pakar chat` (the seed's chat_interactive.py) and `pakar chat-batch` (the seed's test_chat_batch.py).

Parsers and flag checks first (pakar.commands.common), then torch and the model (pakar.chat).
"""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from pakar import PakarError
from pakar.args import check_out_folder
from pakar.commands.common import (add_model_args, add_rag_args, add_sampling_args, check_sampling_flags,
                                   open_retriever, sampling_from_args)


def main_chat(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Chat with a checkpoint in the terminal; answers "
                                "stream as they are generated.")
    add_model_args(p)
    add_sampling_args(p, temperature=0.8, max_new=256)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible answers (default: random)")
    add_rag_args(p)
    args = p.parse_args(argv)
    check_sampling_flags(args)
    retriever = open_retriever(args)
    import torch  # lazy: after the flags are checked

    from pakar.chat import ChatSession, describe, load_generator, repl

    textgen, path = load_generator(args.checkpoint, device=args.device, dtype=args.dtype, mode=args.mode,
                                   quantize=args.quantize)
    if args.seed is not None:
        torch.manual_seed(args.seed)  # unseeded rows draw their generator seeds from torch's RNG
    params = sampling_from_args(args)
    try:
        import readline  # noqa: F401  (line editing and history where available; absent on Windows)
    except ImportError:
        pass
    print(f"pakar chat | {describe(textgen, path)}")
    if textgen.chat:
        print("chat mode: the model was fine-tuned on conversations; it sees the history that fits its "
              "context window.")
    else:
        print("text mode: this checkpoint was pretrained on plain text (no chat fine-tuning), so it "
              "continues what you type; each line is continued on its own, with no conversation history.")
    print("Type a message; /help lists commands, /quit leaves. Ctrl-C stops an answer.")
    if retriever:
        print(f"retrieval: {len(retriever.index):,} passages in {args.index}; {args.rag_k} per question, "
              "sources listed under each answer")
    # A shell that starts a command in the background without job control (a script's `&`, some CI
    # runners) leaves SIGINT ignored, and Python then never raises KeyboardInterrupt: Ctrl-C must still
    # stop an answer in the REPL
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    repl(ChatSession(textgen, params, args.system, retriever=retriever))
    return 0


def main_batch(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Answer a list of prompts in batches and write a "
                                "report (JSONL and a Markdown table).")
    add_model_args(p)
    add_sampling_args(p, temperature=0.7, max_new=128)
    p.add_argument("--prompts", help="text file (one prompt per line) or JSONL ({\"prompt\": ...} or "
                   "{\"messages\": [...]}, optional \"topic\") (default: a built-in Indonesian set covering "
                   "teknologi, pengetahuan umum, topik ringan and jurnal)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together at most (default 8)")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed SEED+i (default 0)")
    p.add_argument("--out", default="reports", help="folder for the reports (default: reports)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object, last")
    add_rag_args(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise PakarError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_sampling_flags(args)
    check_out_folder("--out", args.out)
    sampling_from_args(args)  # validate the flags before loading the model
    retriever = open_retriever(args)
    # lazy: torch, after the flags are checked
    from pakar.chat import (DEFAULT_PROMPTS, _as_request_prompt, _shown, describe, load_generator, rag_items,
                            read_prompts, run_batch, write_reports)
    from pakar.rag import format_sources, sources_payload

    textgen, path = load_generator(args.checkpoint, device=args.device, dtype=args.dtype, mode=args.mode,
                                   quantize=args.quantize)
    if args.prompts:
        items = read_prompts(Path(args.prompts))
    else:
        items = [(topic, question if textgen.chat else opening) for topic, question, opening in DEFAULT_PROMPTS]
    items = [(t, _as_request_prompt(pr, textgen.chat, args.system)) for t, pr in items]
    sources: list[list] = []
    questions = [_shown(pr) for _, pr in items]
    if retriever:  # each prompt's last message becomes the RAG template with its own sources
        items, sources = rag_items(textgen, retriever, items, args.max_new_tokens)
    print(f"pakar chat-batch | {describe(textgen, path)}")
    print(f"{len(items)} prompts, {'chat' if textgen.chat else 'text'} mode, batch size {args.batch_size}\n")

    def show(row: dict) -> None:
        if sources:
            row["prompt"] = questions[row["index"] - 1]
            row["sources"] = sources_payload(sources[row["index"] - 1])
        head = f"[{row['index']}] {row['topic'] + ': ' if row['topic'] else ''}{row['prompt']}"
        cites = f"\n  sources:\n{format_sources(sources[row['index'] - 1])}" if sources else ""
        print(f"{head}\n  -> {row['answer'].strip() or '(empty answer)'}{cites}\n  ({row['completion_tokens']} "
              f"tokens, {row['tokens_per_s']:.1f} tokens/s, {row['finish_reason']})\n", flush=True)

    rows, wall = run_batch(textgen, items, lambda i: sampling_from_args(args, seed=args.seed + i), args.batch_size,
                           on_done=show)
    total = sum(r["completion_tokens"] for r in rows)
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
    summary = {"checkpoint": str(path), "mode": "chat" if textgen.chat else "text", "prompts": len(rows),
               "batch_size": args.batch_size, "completion_tokens": total, "seconds": round(wall, 3),
               "tokens_per_s": round(total / max(wall, 1e-9), 2),
               "mean_time_to_first_token_s": round(sum(r["time_to_first_token_s"] for r in rows) / len(rows), 4),
               "finish_reasons": reasons,
               "sampling": (f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, "
                            f"repetition penalty {args.repetition_penalty}, max {args.max_new_tokens} new tokens, "
                            f"seed {args.seed}")}
    jsonl, md = write_reports(rows, summary, Path(args.out), path.stem)
    summary |= {"report_jsonl": str(jsonl), "report_md": str(md)}
    print(f"summary: {len(rows)} prompts, {total} tokens in {wall:.1f} s = {summary['tokens_per_s']:.1f} tokens/s "
          f"aggregate; mean time to first token {summary['mean_time_to_first_token_s']:.3f} s; "
          f"finish reasons {', '.join(f'{k} {v}' for k, v in reasons.items())}")
    print(f"reports: {jsonl}, {md}")
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    return 0
