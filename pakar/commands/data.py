"""`pakar tokenizer` and `pakar prepare`: the data stage's commands.

Parsers and flag checks first (pakar.args, no numpy or tokenizers), then the library import.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from pakar.args import DEFAULT_VOCAB, MAX_VOCAB, MIN_VOCAB, check_number, check_out_folder
from pakar.corpus import VAL_FRACTION, embedded_sample_path, human_bytes


def main_tokenizer(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Train a byte-level BPE tokenizer on a corpus "
                                     "and report its compression on held-out documents.")
    parser.add_argument("--data", nargs="+", metavar="SPEC",
                        help="text/JSONL files (.gz ok), folders or globs (default: the embedded sample corpus)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                        help=f"tokens, including 256 bytes and 3 special tokens (default {DEFAULT_VOCAB})")
    parser.add_argument("--out", default=".", help="folder for tokenizer.json (default: current folder)")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON object, last")
    args = parser.parse_args(argv)
    check_number("--vocab-size", args.vocab_size, MIN_VOCAB, MAX_VOCAB)
    check_out_folder("--out", args.out)
    if args.data is None:
        print(f"no --data given: using the embedded sample corpus {embedded_sample_path()}")
    specs = args.data or [embedded_sample_path()]
    from pakar.tokenizer import _WORD_RE, compression_report, train_on_corpus  # lazy: tokenizers, after the flags

    # count the words of the training text as it streams by (first 64 MB), for the word-level comparison
    word_counts: Counter = Counter()
    counted = 0

    def count_words(doc: str) -> None:
        nonlocal counted
        if counted < 64_000_000:
            word_counts.update(_WORD_RE.findall(doc))
            counted += len(doc)

    tokenizer, stats, heldout = train_on_corpus(specs, args.vocab_size, on_train_doc=count_words)
    out = Path(args.out) / "tokenizer.json"
    tokenizer.save(out)
    for w in stats.warnings():
        print(f"warning: {w}")
    print(f"wrote {out}")

    report = {"tokenizer": str(out), "vocab_size": tokenizer.vocab_size, "corpus": stats.summary()}
    if heldout:
        report |= compression_report(tokenizer, heldout, word_counts)
        print(f"held-out text (never trained on): {report['heldout_documents']:,} documents, "
              f"{human_bytes(report['heldout_bytes'])}, {report['heldout_words']:,} words")
        for name, label in (("bpe", "byte-level BPE"), ("word_level", "word-level"),
                            ("word_level_seed", "word-level (seed)")):
            r = report[name]
            print(f"  {label:<18} {r['vocab_size']:>7,} tokens  {r['bytes_per_token']:5.2f} bytes/token  "
                  f"{r['tokens_per_word']:5.2f} tokens/word  {100 * r['unknown_rate']:5.2f}% unknown")
        print("  (word-level counts words and punctuation marks as tokens; unknown words become <unk>, "
              "so its text cannot be recovered)")
    else:
        print("held-out text: none (corpus too small for a held-out document); no compression report")
    if args.json:
        print(json.dumps(report))
    return 0


def main_prepare(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Tokenize a corpus into cached token shards "
                                     "(DIR/data/<key>/train.bin, val.bin, manifest.json).")
    parser.add_argument("--data", nargs="+", metavar="SPEC",
                        help="text/JSONL files (.gz ok), folders or globs (default: the embedded sample corpus)")
    parser.add_argument("--out", default=".", help="run folder (default: current folder)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                        help=f"tokens, if DIR/tokenizer.json must be trained (default {DEFAULT_VOCAB})")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                        help=f"share of documents held out for validation (default {VAL_FRACTION})")
    args = parser.parse_args(argv)
    check_number("--val-fraction", args.val_fraction, 0, 0.5, low_open=True)
    check_number("--vocab-size", args.vocab_size, MIN_VOCAB, MAX_VOCAB)
    check_out_folder("--out", args.out)
    from pakar.data import prepare  # lazy: numpy and tokenizers, after the flags are checked

    _, data = prepare(args.data, Path(args.out), args.vocab_size, args.val_fraction)
    print(f"shards: {data.dir}")
    return 0
