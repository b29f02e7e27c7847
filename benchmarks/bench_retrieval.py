"""Benchmark pakar's retrieval index against plain bm25s, in the same run.

    python benchmarks/bench_retrieval.py [--limit N] [--rounds R] [--ablations] [--legal]

Task: every question of ../shared/data/id_chat/idkmrc_train.jsonl (its user turn holds "Teks: <paragraph>
\\n\\nPertanyaan: <question>") must find its paragraph among all paragraphs of
../shared/data/id_general/wiki_paragraphs.txt. Each record's paragraph is matched to a wiki line exactly on
NFKC- and whitespace-normalised text (all 10,096 match). Metrics: recall@1/5/20 (gold paragraph among
the top k; pakar ranks passages, a paragraph counts at its best passage's rank) and MRR, queries per
second (single thread, all queries in a loop; every retriever's loop runs once per round, rounds
interleaved so a busy shared machine slows all alike, and the fastest round counts), index build time.

- pakar: `build_index` (passages, NFKC + casefold, Sastrawi stemming) + `Index.rank`, the ranking `pakar
  search` runs (queries_per_s, comparable with the baselines' ranking loops); `search_top5_with_text_per_s`
  adds reading the 5 passages' text, as `pakar search` and chat do.
- baseline (the issue's): plain bm25s over whitespace tokens (`text.lower().split()`, no stemming, no
  stopwords), one document per paragraph, scores from `get_scores`, top 20 by argsort.
- baseline_bm25s_tokenize: bm25s with its own default tokeniser (`bm25s.tokenize`: lower-case, \\w\\w+
  words, no stemming, no stopwords) and `retrieve(k=20)`: a stronger plain baseline, reported too.
- --ablations: pakar's analyzer without stemming, with stopwords, and SQLite FTS5 (bm25 ranking) over the
  same analyzed passages: the measurements behind the choices in pakar/retrieval.py.
- --legal: index ../shared/data/id_legal/train.txt.gz in a child process: MB/s and peak RSS (VmHWM).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / ".." / "shared" / "data"

import numpy as np  # noqa: E402

from pakar.retrieval import Index, IndexSettings, analyze, build_index  # noqa: E402

QA_RE = re.compile(r"\nTeks: (.*)\n\nPertanyaan: (.*)\Z", re.S)


def norm(s: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", s).split())


def load_task(limit: int | None) -> tuple[list[str], list[tuple[str, int]]]:
    paragraphs = (DATA / "id_general" / "wiki_paragraphs.txt").read_text(encoding="utf-8").splitlines()
    by_text = {norm(p): i for i, p in enumerate(paragraphs)}
    questions = []
    for line in (DATA / "id_chat" / "idkmrc_train.jsonl").open(encoding="utf-8"):
        m = QA_RE.search(json.loads(line)["messages"][0]["content"])
        questions.append((m.group(2), by_text[norm(m.group(1))]))
    return paragraphs, questions[:limit]


def metrics(ranked: list[list[int]], gold: list[int]) -> dict:
    out = {f"recall@{k}": 0.0 for k in (1, 5, 20)} | {"mrr": 0.0}
    for docs, g in zip(ranked, gold):
        rank = docs.index(g) + 1 if g in docs else None
        for k in (1, 5, 20):
            out[f"recall@{k}"] += bool(rank and rank <= k)
        out["mrr"] += 1 / rank if rank else 0
    return {k: round(100 * v / len(gold), 2) if k != "mrr" else round(v / len(gold), 4) for k, v in out.items()}


def dedupe_docs(docs: list[int], k: int = 20) -> list[int]:
    return list(dict.fromkeys(docs))[:k]


# Each run_* builds its retriever and returns (facts, loops): loops maps a throughput key to a function
# that answers every question once and returns the ranked paragraph lists of the "queries_per_s" loop
# (recall is scored on those). main() times the loops, interleaved.

def run_pakar(wiki: Path, questions, settings: IndexSettings, tmp: Path, name: str):
    t0 = time.perf_counter()
    build_index([wiki], tmp / name, settings, log=lambda s: None)
    build = time.perf_counter() - t0
    index = Index(tmp / name)
    paragraph_of = index.documents(np.arange(len(index)))[:, 1]  # one source: document number = paragraph

    def top_paragraphs(q: str, k: int = 20) -> list[int]:
        # Paragraphs have 1.17 passages on average: 1.5 k passages hold k distinct paragraphs for all but
        # ~0.1% of the questions, and those rank again with more.
        n = k + k // 2
        while True:
            ids = index.rank(q, n)[0]
            docs = dedupe_docs(paragraph_of[ids].tolist(), k)
            if len(docs) == k or len(ids) < n:
                return docs
            n *= 2

    def rank():  # ranking, as the baselines do: passage ids -> the top 20 distinct paragraph numbers
        return [top_paragraphs(q) for q, _ in questions]

    def search():  # what `pakar search` and chat do: the ranking plus the passages' text
        for q, _ in questions:
            index.search(q, 5)

    return ({"build_s": round(build, 2), "passages": len(index)},
            {"queries_per_s": rank, "search_top5_with_text_per_s": search})


def run_whitespace(paragraphs: list[str], questions):
    import bm25s

    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index([p.lower().split() for p in paragraphs], show_progress=False)
    build = time.perf_counter() - t0
    vocab = retriever.vocab_dict

    def rank():
        ranked = []
        for q, _ in questions:
            ids = [vocab[t] for t in q.lower().split() if t in vocab]
            scores = retriever.get_scores_from_ids(ids) if ids else np.zeros(len(paragraphs), dtype=np.float32)
            top = np.argpartition(-scores, 20)[:20]
            ranked.append(top[np.argsort(-scores[top], kind="stable")].tolist())
        return ranked

    return {"build_s": round(build, 2), "passages": len(paragraphs)}, {"queries_per_s": rank}


def run_baseline(paragraphs: list[str], questions):
    import bm25s

    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(paragraphs, stopwords=None, show_progress=False), show_progress=False)
    build = time.perf_counter() - t0

    def rank():
        ranked = []
        for q, _ in questions:  # one query at a time, as a chat turn would ask
            docs, _ = retriever.retrieve(bm25s.tokenize(q, stopwords=None, show_progress=False), k=20,
                                         show_progress=False, n_threads=1)
            ranked.append(docs[0].tolist())
        return ranked

    return {"build_s": round(build, 2), "passages": len(paragraphs)}, {"queries_per_s": rank}


def run_fts5(wiki: Path, questions, tmp: Path):
    """SQLite FTS5 over the same passages and analyzer (terms pre-analyzed, joined by spaces)."""
    src = Index(tmp / "pakar")  # reuse the built passages
    t0 = time.perf_counter()
    db = sqlite3.connect(tmp / "fts.sqlite")
    db.execute("CREATE VIRTUAL TABLE p USING fts5(terms, doc UNINDEXED)")
    rows = [(h.text, h.doc) for h in src.passages(range(len(src)))]
    db.executemany("INSERT INTO p VALUES (?, ?)", ((" ".join(analyze(t)), d) for t, d in rows))
    db.commit()
    build = time.perf_counter() - t0

    def rank():
        ranked = []
        for q, _ in questions:
            terms = sorted(set(analyze(q, query=True)))
            match = " OR ".join(f'"{t}"' for t in terms)
            docs = [d for (d,) in db.execute("SELECT doc FROM p WHERE p MATCH ? ORDER BY bm25(p) LIMIT 20", (match,))]
            ranked.append(dedupe_docs(docs))
        return ranked

    return {"build_s": round(build, 2) + src.manifest["build_seconds"]}, {"queries_per_s": rank}


def time_loops(runs: dict, questions, rounds: int) -> dict:
    """{name: metrics, throughputs (fastest of `rounds` interleaved rounds), facts} for every run."""
    best: dict = {}
    ranked: dict = {}
    for _ in range(rounds):
        for name, (_, loops) in runs.items():
            for key, loop in loops.items():
                t0 = time.perf_counter()
                out = loop()
                best[name, key] = min(best.get((name, key), float("inf")), time.perf_counter() - t0)
                if key == "queries_per_s":
                    ranked[name] = out
    gold = [g for _, g in questions]
    return {name: {**metrics(ranked[name], gold),
                   **{key: round(len(questions) / best[name, key], 1) for key in loops}, **facts}
            for name, (facts, loops) in runs.items()}


LEGAL_CHILD = """
import sys, time
from pakar.cli import main
t0 = time.perf_counter()
rc = main(["index", "--data", sys.argv[1], "--out", sys.argv[2], "--json"])
wall = time.perf_counter() - t0
peak = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
import resource
r = resource.getrusage(resource.RUSAGE_SELF)
print(f"PEAK_KB {peak} WALL {wall} CPU {r.ru_utime + r.ru_stime}", file=sys.stderr)
"""


def run_legal(tmp: Path) -> dict:
    data = DATA / "id_legal" / "train.txt.gz"
    proc = subprocess.run([sys.executable, "-c", LEGAL_CHILD, str(data), str(tmp / "legal")], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_kb, wall, cpu = re.search(r"PEAK_KB (\d+) WALL ([\d.]+) CPU ([\d.]+)", proc.stderr).groups()
    mb = report["bytes"] / 1e6
    return {"mb": round(mb, 1), "passages": report["passages"], "wall_s": round(float(wall), 1),
            "cpu_s": round(float(cpu), 1), "mb_per_s": round(mb / float(wall), 2),
            "mb_per_cpu_s": round(mb / float(cpu), 2), "peak_rss_mb": round(int(peak_kb) / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, help="use only the first N questions")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of every retriever's loop (default 3)")
    p.add_argument("--ablations", action="store_true", help="also: no stemming, stopwords, SQLite FTS5")
    p.add_argument("--legal", action="store_true", help="also index the 114 MB legal corpus: MB/s, peak RSS")
    a = p.parse_args()
    paragraphs, questions = load_task(a.limit)
    print(f"{len(questions):,} questions over {len(paragraphs):,} paragraphs")
    wiki = DATA / "id_general" / "wiki_paragraphs.txt"
    result: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        runs = {"baseline": run_whitespace(paragraphs, questions),
                "baseline_bm25s_tokenize": run_baseline(paragraphs, questions),
                "pakar": run_pakar(wiki, questions, IndexSettings(), tmp, "pakar")}
        if a.ablations:
            runs["pakar_no_stem"] = run_pakar(wiki, questions, IndexSettings(stem=False), tmp, "nostem")
            runs["pakar_stopwords"] = run_pakar(wiki, questions, IndexSettings(stopwords=True), tmp, "stop")
            runs["fts5_same_analyzer"] = run_fts5(wiki, questions, tmp)
        result.update(time_loops(runs, questions, max(1, a.rounds)))
        if a.legal:
            result["legal_index"] = run_legal(tmp)
    for name, r in result.items():
        print(f"{name:20s} " + "  ".join(f"{k} {v}" for k, v in r.items()))
    q = result["pakar"]
    for name in ("baseline", "baseline_bm25s_tokenize"):
        b = result[name]
        result[f"recall@5_gain_points_vs_{name}"] = gain = round(q["recall@5"] - b["recall@5"], 2)
        result[f"qps_ratio_vs_{name}"] = ratio = round(q["queries_per_s"] / b["queries_per_s"], 2)
        print(f"recall@5: pakar {q['recall@5']} vs {name} {b['recall@5']} ({gain:+} points; target +5 vs "
              f"baseline); queries/s ratio {ratio:.2f} (target >= 1)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
