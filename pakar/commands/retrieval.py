"""`pakar index` (build a passage search index) and `pakar search` (query it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pakar import PakarError


def main_index(argv: list[str] | None = None, prog: str = "pakar index") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Build a passage search index over a corpus.")
    p.add_argument("--data", nargs="+", required=True, help="text files, .gz, .jsonl, folders or globs (as `train`)")
    p.add_argument("--out", required=True, help="index folder to write (reused when the corpus is unchanged)")
    p.add_argument("--max-words", type=int, default=200, help="most words in a passage (default 200)")
    p.add_argument("--min-words", type=int, default=100, help="sentences are packed up to at least this many words (default 100)")
    p.add_argument("--overlap", type=int, default=40, help="repeat the previous passage's last sentence when at most this many words (default 40)")
    p.add_argument("--no-stem", action="store_true", help="do not stem Indonesian words (PySastrawi; stemming is on by default)")
    p.add_argument("--stopwords", action="store_true", help="drop Sastrawi's Indonesian stopwords (off by default: it did not help recall)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    a = p.parse_args(argv)
    from pakar.retrieval import IndexSettings, build_index  # lazy: numpy, after the flags are parsed

    settings = IndexSettings(stem=not a.no_stem, stopwords=a.stopwords, max_words=a.max_words,
                             min_words=a.min_words, overlap=a.overlap)
    report = build_index(a.data, a.out, settings, log=(lambda s: print(s, file=sys.stderr)) if a.json else print)
    if a.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        for w in report["warnings"]:
            print(f"warning: {w}")
        if not report["reused"]:
            print(f"indexed {report['corpus']} -> {report['passages']:,} passages, {report['terms']:,} terms "
                  f"in {report['build_seconds']:.1f} s -> {a.out}")
    return 0


def main_search(argv: list[str] | None = None, prog: str = "pakar search") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Search a passage index built by `pakar index`.")
    p.add_argument("query", nargs="?", help="the query (or use --queries)")
    p.add_argument("--index", required=True, help="index folder written by `pakar index`")
    p.add_argument("--k", type=int, default=5, help="passages to return (default 5)")
    p.add_argument("--queries", help="file with one query per line; prints one JSON object per line")
    p.add_argument("--json", action="store_true", help='print {"results": [{"text", "source", "score", ...}]}')
    a = p.parse_args(argv)
    if a.k < 1:
        raise PakarError(f"--k {a.k}: must be at least 1")
    if (a.query is None) == (a.queries is None):
        raise PakarError("give a query or --queries FILE (one of them)")
    from pakar.retrieval import Index, format_source  # lazy: numpy, after the flags are checked

    index = Index(a.index)
    if a.queries:
        try:
            queries = Path(a.queries).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as e:
            raise PakarError(f"--queries {a.queries}: cannot read ({e.strerror})") from None
        for q in queries:
            if q.strip():
                print(json.dumps({"query": q, "results": [h.to_dict() for h in index.search(q, a.k)]}, ensure_ascii=False))
        return 0
    hits = index.search(a.query, a.k)
    if a.json:
        print(json.dumps({"query": a.query, "results": [h.to_dict() for h in hits]}, ensure_ascii=False))
        return 0
    if not hits:
        print("no passage contains a word of the query")
    for rank, h in enumerate(hits, 1):
        print(f"[{rank}] {h.score:.2f}  {format_source(h)}\n    {h.text[:300]}{'…' * (len(h.text) > 300)}")
    return 0
