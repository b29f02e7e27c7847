"""Retrieval-augmented reading, end to end on this machine: pretrain, fine-tune to read, evaluate.

    python benchmarks/bench_rag_e2e.py [--pretrain-minutes 40] [--finetune-minutes 35] [--eval-limit 200]
                                       [--config small] [--out bench_rag_e2e]

Every step is a `pakar` command, as a user would run it:
1. `pakar train`: pretrain on ../shared/data/id_general/ except wiki_paragraphs.txt (the reading-
   comprehension questions are about those paragraphs), for a wall-clock budget.
2. Convert ../shared/data/id_chat/idkmrc_train.jsonl to {"context", "question", "answer"} records (the
   dataset's refusal reply becomes "" = not answerable) and hold out 5% by pakar's own split rule on the
   paragraph's doc_hash, so no held-out paragraph is ever trained on.
3. `pakar finetune` on the training records, for a wall-clock budget.
4. `pakar index` over all of wiki_paragraphs.txt, then `pakar eval-rag` on the held-out records:
   retrieval recall/MRR on all of them, exact match / F1 with the gold passage, retrieved passages
   and none on the first --eval-limit.
The last line is one JSON object with the eval-rag figures and the run's settings.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / ".." / "shared" / "data"

from pakar.corpus import doc_hash, is_val  # noqa: E402

QA_RE = re.compile(r"\nTeks: (.*)\n\nPertanyaan: (.*)\Z", re.S)
REFUSAL = "Maaf, pertanyaan tersebut tidak dapat di"  # the dataset's "not answerable" reply starts so


def pakar(*args: str) -> str:
    """Run one pakar command, echo its last lines, return its stdout (stop on failure)."""
    t0 = time.perf_counter()
    print("$ pakar " + " ".join(args), flush=True)
    res = subprocess.run([sys.executable, "-m", "pakar", *args], capture_output=True, text=True, cwd=REPO)
    tail = (res.stdout + res.stderr).strip().splitlines()[-4:]
    print("  " + "\n  ".join(tail) + f"\n  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if res.returncode:
        sys.exit(f"pakar {args[0]} failed with exit code {res.returncode}")
    return res.stdout


def split_records(out: Path) -> tuple[Path, Path, dict]:
    """idkmrc -> RC records; 5% held out by the paragraph's doc_hash (pakar.corpus.is_val)."""
    train, val, counts = [], [], {"train": 0, "val": 0, "val_paragraphs": set(), "val_unanswerable": 0}
    for line in (DATA / "id_chat" / "idkmrc_train.jsonl").open(encoding="utf-8"):
        msgs = json.loads(line)["messages"]
        context, question = QA_RE.search(msgs[0]["content"]).groups()
        answer = "" if msgs[1]["content"].startswith(REFUSAL) else msgs[1]["content"]
        rec = json.dumps({"context": context, "question": question, "answer": answer}, ensure_ascii=False)
        if is_val(doc_hash(context), 0.05):
            val.append(rec)
            counts["val_paragraphs"].add(context)
            counts["val_unanswerable"] += not answer
        else:
            train.append(rec)
    paths = out / "rc_train.jsonl", out / "rc_val.jsonl"
    for p, rows in zip(paths, (train, val)):
        p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    counts.update(train=len(train), val=len(val), val_paragraphs=len(counts["val_paragraphs"]))
    return *paths, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--pretrain-minutes", type=float, default=40)
    p.add_argument("--finetune-minutes", type=float, default=35)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--out", type=Path, default=REPO / "bench_rag_e2e")
    a = p.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    general = DATA / "id_general"
    pre = json.loads(pakar("train", "--config", a.config, "--data", str(general / "nli_premises.txt"),
                           str(general / "general_sentences.txt"), "--seq-len", "256", "--batch", "8",
                           "--epochs", "100", "--time-limit", str(a.pretrain_minutes), "--out", str(out / "pre"),
                           "--overwrite", "--json").strip().splitlines()[-1])
    rc_train, rc_val, counts = split_records(out)
    print(f"reading comprehension: {counts['train']:,} train, {counts['val']:,} held out "
          f"({counts['val_paragraphs']} paragraphs, {counts['val_unanswerable']} unanswerable)")
    base = sorted((out / "pre" / "checkpoints").glob("model_*.pt"), key=lambda f: f.stat().st_mtime)[-1]
    ft = json.loads(pakar("finetune", "--checkpoint", str(base), "--data", str(rc_train), "--seq-len", "512",
                          "--batch", "8", "--epochs", "100", "--lr", str(a.finetune_lr),
                          "--time-limit", str(a.finetune_minutes), "--out", str(out / "ft"), "--overwrite",
                          "--json").strip().splitlines()[-1])
    pakar("index", "--data", str(general / "wiki_paragraphs.txt"), "--out", str(out / "index"))
    tuned = sorted((out / "ft" / "checkpoints").glob("model_*.pt"), key=lambda f: f.stat().st_mtime)[-1]
    retrieval = json.loads(pakar("eval-rag", "--index", str(out / "index"), "--data", str(rc_val),
                                 "--json").strip().splitlines()[-1])
    answers = json.loads(pakar("eval-rag", "--index", str(out / "index"), "--data", str(rc_val), "--checkpoint",
                               str(tuned), "--limit", str(a.eval_limit), "--json").strip().splitlines()[-1])
    print(json.dumps({"config": a.config, "pretrain": pre, "finetune": ft, "records": counts,
                      "retrieval_all_heldout": retrieval, "answers_first_n": answers}, ensure_ascii=False))


if __name__ == "__main__":
    main()
