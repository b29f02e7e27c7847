"""Retrieval-augmented answers: the one prompt template, fitting it to the context window, reading-
comprehension records for fine-tuning, and `pakar eval-rag`.

API:
    NO_ANSWER                                 what the model says when the sources lack the answer
    render_rag_prompt(question, passages) -> str         the user message (template below)
    fit_rag_prompt(question, passages, budget, count) -> (str, n_passages_used)
    rc_messages(record) -> list[dict]         {"context","question","answer"} -> a chat conversation
    Retriever(index_dir, k).prompt(textgen, question, history, reserve) -> (messages or text, hits)
    answer_scores(prediction, gold) -> (em, f1); main_eval (`pakar eval-rag`)

The template (one user message; numbered sources, then the question last):

    Jawab pertanyaan berdasarkan sumber berikut. Jika jawabannya tidak ada di sumber, jawab: "<NO_ANSWER>"

    [1] <passage 1>

    [2] <passage 2>

    Pertanyaan: <question>

A chat model sees it as the user turn of its ChatML template and answers as the assistant; a text
(pretrained-only) model gets the same text followed by "\\nJawaban:". Fitting: the question is never
cut. Passages are added best first while the whole prompt (as the model will see it, history included)
leaves `reserve` tokens for the answer; the first passage that does not fit is cut at a word boundary
to the room left, and the rest are left out. If the question alone does not fit, that is a
ContextLengthError, as for any over-long message.

Reading-comprehension records ({"context": str or [str], "question": str, "answer": str}) render to the
same template with the context as the sources and the answer (NO_ANSWER when the answer is "" or null)
as the assistant's reply, so fine-tuning teaches exactly what retrieval asks; the loss mask is the chat
mask (assistant content and its <|im_end|> only).
"""

from __future__ import annotations

import json
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

from pakar import PakarError
from pakar.prompts import NO_ANSWER, rc_messages, render_rag_prompt
from pakar.retrieval import Index, format_source

TEXT_MODE_SUFFIX = "\nJawaban:"


def fit_rag_prompt(question: str, passages: list[str], budget: int, count: Callable[[str], int]) -> tuple[str, int]:
    """The largest template (best passages first, the last one possibly cut) with count(text) <= budget.
    Returns (text, passages used). The question is whole, or ContextLengthError."""
    from pakar.engine import ContextLengthError  # lazy: torch; retrieval alone (search, eval-rag) stays torch-free

    if count(render_rag_prompt(question, [])) > budget:
        raise ContextLengthError(f"the question alone is {count(render_rag_prompt(question, []))} prompt "
                                 f"tokens; the context window leaves room for {budget} (shorten it)")
    kept: list[str] = []
    for p in passages:
        if count(render_rag_prompt(question, kept + [p])) <= budget:
            kept.append(p)
            continue
        words = p.split()
        lo, hi = 0, len(words)  # the most words of p that still fit: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(render_rag_prompt(question, kept + [" ".join(words[:mid]) + " …"])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            kept.append(" ".join(words[:lo]) + " …")
        break
    return render_rag_prompt(question, kept), len(kept)


class Retriever:
    """An opened index and the number of passages to put in each prompt."""

    def __init__(self, index_dir, k: int = 3):
        if k < 1:
            raise PakarError(f"--rag-k {k}: must be at least 1")
        self.index, self.k = Index(index_dir), k

    def prompt(self, textgen, question: str, history: list[dict] | None = None, reserve: int = 128,
               system: str | None = None):
        """(prompt for textgen, hits actually in it). Chat models get messages (system, history, the
        templated question); text models get the template text."""
        hits = self.index.search(question, self.k)
        budget = textgen.context_window - max(1, reserve)
        head = ([{"role": "system", "content": system}] if system else []) + list(history or [])
        if textgen.chat:
            def count(text: str) -> int:
                return len(textgen.encode(head + [{"role": "user", "content": text}]))
        else:
            def count(text: str) -> int:
                return len(textgen.encode(text + TEXT_MODE_SUFFIX))
        text, used = fit_rag_prompt(question, [h.text for h in hits], budget, count)
        prompt = head + [{"role": "user", "content": text}] if textgen.chat else text + TEXT_MODE_SUFFIX
        return prompt, hits[:used]


def sources_payload(hits) -> list[dict]:
    """The documented "sources" list (API field, chat-batch report): number, source, doc, word, score, text."""
    return [{"n": i, "source": h.source, "doc": h.doc, "word": h.word, "score": round(h.score, 4), "text": h.text}
            for i, h in enumerate(hits, 1)]


def format_sources(hits) -> str:
    return "\n".join(f"  [{i}] {format_source(h)}" for i, h in enumerate(hits, 1))


# --- evaluation -----------------------------------------------------------------------------------

def _norm_answer(s: str) -> list[str]:
    s = s.casefold().translate(str.maketrans("", "", string.punctuation))
    return s.split()


def is_no_answer(prediction: str) -> bool:
    return _norm_answer(prediction)[:4] == _norm_answer(NO_ANSWER)[:4]


def answer_scores(prediction: str, gold: str) -> tuple[float, float]:
    """(exact match, token F1) after lower-casing and removing punctuation (SQuAD's rule). An empty
    gold means unanswerable: both scores are 1 when the prediction is the NO_ANSWER sentence, else 0."""
    if not gold.strip() or is_no_answer(gold):
        hit = float(is_no_answer(prediction))
        return hit, hit
    p, g = _norm_answer(prediction), _norm_answer(gold)
    em = float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if not common:
        return em, 0.0
    precision, recall = common / len(p), common / len(g)
    return em, 2 * precision * recall / (precision + recall)


def read_qa(path: Path) -> list[dict]:
    """{"context","question","answer"} records (blank and bad lines counted, reported on stderr)."""
    rows, bad = [], 0
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise PakarError(f"--data {path}: cannot read ({e.strerror})") from None
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rc_messages(obj)  # validates
            rows.append(obj)
        except (ValueError, PakarError):
            bad += 1
    if bad:
        print(f"warning: {bad:,} lines of {path} were not reading-comprehension records (skipped)", file=sys.stderr)
    if not rows:
        raise PakarError(f"--data {path}: no {{\"context\", \"question\", \"answer\"}} records")
    return rows


def _norm_text(s: str) -> str:
    return " ".join(s.split())


def retrieval_metrics(index, rows: list[dict]) -> dict:
    """recall@1/5/20 and MRR of the gold passage: a hit is a retrieved passage inside the gold context
    (or containing it), compared on whitespace-normalised text."""
    found = {1: 0, 5: 0, 20: 0}
    mrr = 0.0
    for r in rows:
        gold = _norm_text(r["context"] if isinstance(r["context"], str) else " ".join(r["context"]))
        hits = index.search(r["question"], 20)
        rank = next((i for i, h in enumerate(hits, 1) if _norm_text(h.text).rstrip(" …") in gold
                     or gold in _norm_text(h.text)), None)
        for k in found:
            found[k] += bool(rank and rank <= k)
        mrr += 1 / rank if rank else 0.0
    n = len(rows)
    return {f"recall@{k}": round(100 * v / n, 2) for k, v in found.items()} | {"mrr": round(mrr / n, 4)}


def answer_metrics(textgen, retriever, rows: list[dict], mode: str, max_new: int, batch_size: int) -> dict:
    """EM/F1 (answerable) and abstention accuracy (unanswerable) with `mode` passages: gold | retrieved | none."""
    # lazy: torch; retrieval alone (search, eval-rag without --checkpoint) stays torch-free
    from pakar.engine import SamplingParams
    from pakar.generate import Request

    prompts = []
    for r in rows:
        if mode == "retrieved":
            prompt, _ = retriever.prompt(textgen, r["question"], reserve=max_new)
        else:
            context = [] if mode == "none" else [r["context"]] if isinstance(r["context"], str) else r["context"]
            budget = textgen.context_window - max_new
            count = (lambda t: len(textgen.encode([{"role": "user", "content": t}]))) if textgen.chat else \
                (lambda t: len(textgen.encode(t + TEXT_MODE_SUFFIX)))
            text, _ = fit_rag_prompt(r["question"], context, budget, count)
            prompt = [{"role": "user", "content": text}] if textgen.chat else text + TEXT_MODE_SUFFIX
        prompts.append(prompt)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new)
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        answers += [c.text for c in textgen.generate([Request(p, params) for p in prompts[i:i + batch_size]])]
    sums = {"answerable": [0, 0.0, 0.0], "unanswerable": [0, 0.0, 0.0]}
    for r, a in zip(rows, answers):
        a = a.strip().split("\n")[0]
        key = "answerable" if (r.get("answer") or "").strip() and not is_no_answer(r["answer"]) else "unanswerable"
        em, f1 = answer_scores(a, r.get("answer") or "")
        s = sums[key]
        s[0] += 1
        s[1] += em
        s[2] += f1
    out = {}
    for key, (n, em, f1) in sums.items():
        out[key] = {"n": n, "exact_match": round(100 * em / n, 2) if n else None,
                    "f1": round(100 * f1 / n, 2) if n else None}
    out["examples"] = [{"question": r["question"], "gold": r.get("answer") or "", "prediction": a}
                       for r, a in list(zip(rows, answers))[:3]]
    return out


