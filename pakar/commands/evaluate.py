"""`pakar eval` (loss, perplexity, bits per byte, expert use) and `pakar eval-rag` (retrieval and answers).

Parsers and flag checks first, then torch and the evaluation modules.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pakar import PakarError
from pakar.corpus import CorpusStats, detect_kind
from pakar.runtime import autocast_dtype, resolve_device


def main_eval(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Validation loss, perplexity and bits per byte of a "
                                "checkpoint on a corpus, and how evenly its experts are used.")
    p.add_argument("--checkpoint", help="model checkpoint (default: the newest checkpoints/model_epoch*.pt "
                   "in the current folder)")
    p.add_argument("--data", nargs="+", required=True, metavar="SPEC",
                   help="text files (one document per line), .gz, JSONL ({\"text\": ...} documents, or chat "
                   "{\"messages\": [...]}: then the assistant tokens of whole conversations are scored), "
                   "folders or globs")
    p.add_argument("--seq-len", type=int, default=None, help="text: tokens of context per window (default: the "
                   "training --seq-len recorded in the checkpoint, else 256; at most the context window)")
    p.add_argument("--batch-size", type=int, default=8, help="windows (text) or conversations (chat) per "
                   "forward pass (default 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens "
                   "(default: all)")
    p.add_argument("--split", default="all", choices=["all", "val"], help="chat data: every conversation, or "
                   "only the held-out slice that pakar finetune validates on (default all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (default auto: bfloat16 autocast on cuda, float32 on cpu); weights "
                   "stay float32")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: evaluate with 8-bit weights (pakar.quant, CPU) and report the change in bits per "
                        "byte against float32 on the same text (evaluates twice) (default: none)")
    p.add_argument("--plot", metavar="PNG", help="also draw the expert load per layer to this PNG file")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object, last")
    args = p.parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise PakarError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.batch_size < 1:
        raise PakarError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise PakarError(f"--plot {args.plot}: give a file name ending in .png")

    # lazy: torch, after the flags are checked
    from pakar.chat_data import evaluate_chat
    from pakar.checkpoint import latest_epoch_checkpoint, load_model
    from pakar.evaluate import evaluate_corpus, expert_table, quantized
    from pakar.plots import plot_experts
    from pakar.quant import check_int8

    path = Path(args.checkpoint) if args.checkpoint else latest_epoch_checkpoint(".")
    device = resolve_device(args.device)
    # weights stay float32; bfloat16 runs as autocast, so the logits and the sums keep their precision
    amp = autocast_dtype(args.dtype, device)
    if args.quantize == "int8":
        check_int8(device, amp)
    model, tokenizer, ckpt = load_model(path, device)
    W = model.config.max_position_embeddings
    kind = detect_kind(args.data)
    stats = CorpusStats()
    tty = sys.stderr.isatty()
    if kind == "chat":
        def run(stats):
            return evaluate_chat(model, tokenizer, args.data, args.batch_size, split=args.split,
                                 max_tokens=args.max_tokens, device=device, autocast_dtype=amp, stats=stats)
        res = quantized(run, model, args.quantize, stats)
        scope = f"assistant tokens of {res['conversations']:,} conversations ({args.split})"
    else:
        trained = ckpt.get("meta", {}).get("seq_len") or ckpt.get("train_args", {}).get("seq_len") or 256
        seq_len = args.seq_len if args.seq_len is not None else min(int(trained), W)
        if not 1 <= seq_len <= W:
            raise PakarError(f"--seq-len {seq_len}: must be between 1 and the model's context window ({W})")

        def progress(done: int, sums) -> None:
            if tty:
                dt = time.perf_counter() - sums.t0
                print(f"\r  {done:,} tokens evaluated ({done / max(dt, 1e-9):,.0f} tokens/s)", end="",
                      file=sys.stderr, flush=True)

        def run(stats):
            return evaluate_corpus(model, tokenizer, args.data, args.batch_size, seq_len, args.max_tokens, device,
                                   amp, stats=stats, progress=progress)
        res = quantized(run, model, args.quantize, stats)
        if tty:
            print(file=sys.stderr)
        res["seq_len"] = seq_len
        scope = f"every token, windows of {seq_len}"
    res |= {"checkpoint": str(path), "data": list(args.data), "corpus": stats.summary()}
    print(f"pakar eval | {path} on {' '.join(args.data)}")
    print(f"corpus: {stats.summary()}")
    for w in stats.warnings() + list(res.get("warnings", [])):
        print(f"warning: {w}")
    print(f"{res['tokens']:,} tokens ({scope}), {res['bytes']:,} bytes, {res['seconds']:.1f} s")
    bpb = res["bits_per_byte"]
    print(f"bits per byte {bpb:.4f} | loss {res['loss']:.4f} nats/token | perplexity {res['perplexity']:.2f}"
          if bpb is not None else f"loss {res['loss']:.4f} nats/token | perplexity {res['perplexity']:.2f}")
    if "float32_bits_per_byte" in res and bpb is not None:
        print(f"int8 vs float32: bits per byte {bpb:.4f} vs {res['float32_bits_per_byte']:.4f} "
              f"({100 * res['bits_per_byte_change']:+.2f}% relative)")
    print(expert_table(res))
    if args.plot:
        plot_experts(res, Path(args.plot), f"{path.name} on {', '.join(Path(d).name for d in args.data)}"[:80])
        print(f"plot: {args.plot}")
        res["plot"] = args.plot
    if args.json:
        print(json.dumps(res, ensure_ascii=False))
    return 0


def main_eval_rag(argv: list[str] | None = None, prog: str = "pakar eval-rag") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Retrieval recall and answer quality on reading-"
                                "comprehension QA ({\"context\", \"question\", \"answer\"} JSONL).")
    p.add_argument("--index", required=True, help="index folder built by `pakar index` over the contexts")
    p.add_argument("--data", required=True, help='JSONL of {"context", "question", "answer"} ("" = unanswerable)')
    p.add_argument("--checkpoint", help="also generate answers: exact match and token F1 with the gold passage, "
                   "retrieved passages and none")
    p.add_argument("--rag-k", type=int, default=3, help="retrieved passages per question in the prompt (default 3)")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit in tokens (default 32)")
    p.add_argument("--batch-size", type=int, default=16, help="questions generated together (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    from pakar.rag import Retriever, answer_metrics, read_qa, retrieval_metrics  # lazy: numpy, after the flags

    rows = read_qa(Path(a.data))[:a.limit]
    retriever = Retriever(a.index, a.rag_k)
    result: dict = {"questions": len(rows), "retrieval": retrieval_metrics(retriever.index, rows)}
    if a.checkpoint:
        from pakar.generate import TextGenerator  # lazy: torch, only with --checkpoint

        textgen = TextGenerator.from_checkpoint(a.checkpoint, device=resolve_device(a.device))
        result["checkpoint"] = a.checkpoint
        result["chat_model"] = textgen.chat
        for mode in ("gold", "retrieved", "none"):
            result[f"answers_{mode}"] = answer_metrics(textgen, retriever, rows, mode, a.max_new_tokens, a.batch_size)
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    r = result["retrieval"]
    print(f"{len(rows)} questions | retrieval: recall@1 {r['recall@1']}  recall@5 {r['recall@5']}  "
          f"recall@20 {r['recall@20']}  MRR {r['mrr']}")
    for mode in ("gold", "retrieved", "none"):
        if f"answers_{mode}" in result:
            m = result[f"answers_{mode}"]
            print(f"answers with {mode:9s} passages: answerable EM {m['answerable']['exact_match']} "
                  f"F1 {m['answerable']['f1']} (n={m['answerable']['n']}); unanswerable abstained "
                  f"{m['unanswerable']['exact_match']}% (n={m['unanswerable']['n']})")
    return 0
