"""Retrieval (pakar index / search), the RAG template in chat, chat-batch, serve and the web page,
reading-comprehension fine-tuning records, and eval-rag.

References are independent of the code under test: passages are checked against the source files
read back with gzip/json, word offsets against str.split of the document, the served sources against
Index.search called directly, the API with the real `openai` client, the page in real Chromium, the
RC loss mask against the tokens of the answer alone.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import pytest

from pakar import PakarError
from pakar.cli import main as cli
from pakar.prompts import NO_ANSWER, rc_messages, render_rag_prompt
from pakar.rag import Retriever, answer_scores, fit_rag_prompt, sources_payload
from pakar.retrieval import Index, IndexSettings, build_index, split_passages

DOCS_A = [
    "Jakarta adalah ibu kota Indonesia. Kota ini terletak di pantai utara Pulau Jawa dan dihuni lebih dari "
    "sepuluh juta orang.",
    "Pembangunan Jembatan Suramadu dimulai pada tahun 2003 dan selesai pada tahun 2009. Jembatan itu "
    "menghubungkan Surabaya di Pulau Jawa dengan Pulau Madura.",
    "Rendang adalah masakan daging bercita rasa pedas dari Sumatera Barat yang dimasak lama dengan santan.",
]
DOCS_B = [  # JSONL text records, gzipped
    "Gunung Bromo adalah gunung berapi aktif di Jawa Timur. Wisatawan datang untuk melihat matahari terbit.",
    "Candi Borobudur dibangun pada abad kedelapan oleh wangsa Syailendra. Candi ini adalah candi Buddha "
    "terbesar di dunia.",
]


def make_corpus(tmp: Path) -> Path:
    folder = tmp / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(DOCS_A) + "\n", encoding="utf-8")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in DOCS_B:
            f.write(json.dumps({"text": d}) + "\n")
        f.write("{not json\n")  # counted and reported, never a crash
    return folder


def source_docs(path: str) -> list[str]:
    """The documents of one source file, read back without pakar (the reference for positions)."""
    if path.endswith(".jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            out = []
            for line in f:
                try:
                    out.append(json.loads(line)["text"])
                except ValueError:
                    pass
            return out
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rag")
    out = tmp / "idx"
    report = build_index([make_corpus(tmp)], out, IndexSettings(), log=lambda s: None)
    assert report["documents"] == len(DOCS_A) + len(DOCS_B)
    assert any("not JSON" in w for w in report["warnings"])  # the bad line is counted and reported
    return out


# --- passages -------------------------------------------------------------------------------------

def test_passages_follow_sentences_respect_sizes_and_offsets():
    sentences = [" ".join(f"kata{i}_{j}" for j in range(n)) + "." for i, n in enumerate([30, 45, 12, 60, 25, 250, 8, 40])]
    doc = " ".join(sentences)
    words = doc.split()
    passages = split_passages(doc, max_words=100, min_words=50, overlap=30)
    assert len(passages) > 3
    covered = set()
    for start, text in passages:
        pw = text.split()
        assert len(pw) <= 100
        assert words[start:start + len(pw)] == pw  # the stored position is the passage's first word
        covered.update(range(start, start + len(pw)))
    assert covered == set(range(len(words)))  # nothing lost
    for (s0, t0), (s1, _) in zip(passages, passages[1:]):
        assert s1 <= s0 + len(t0.split())  # contiguous or overlapping, never a gap
    # a passage ends on a sentence end unless a sentence was longer than max_words
    long_sentence = set(sentences[5].split())
    assert all(t.endswith(".") or t.split()[-1] in long_sentence for _, t in passages)
    # overlap: a short last sentence (20 words <= overlap) opens the next passage again
    s = [" ".join(f"w{i}_{j}" for j in range(n)) + "." for i, n in enumerate([40, 20, 40])]
    assert split_passages(" ".join(s), max_words=100, min_words=50, overlap=30) == [(0, s[0] + " " + s[1]),
                                                                                     (40, s[1] + " " + s[2])]
    assert split_passages(" ".join(s), max_words=100, min_words=50, overlap=10) == [(0, s[0] + " " + s[1]),
                                                                                     (60, s[2])]


def test_search_finds_exact_phrase_and_paraphrase(index_dir):
    index = Index(index_dir)
    exact = index.search("candi Buddha terbesar di dunia", k=3)
    assert "Borobudur" in exact[0].text
    # paraphrase: other word forms (dibangun <- pembangunan, selesai) and no shared phrase
    para = index.search("kapan jembatan ke Madura selesai dibangun?", k=3)
    assert "Suramadu" in para[0].text
    para = index.search("masakan bersantan yang pedas", k=3)
    assert "Rendang" in para[0].text
    assert [h.score for h in exact] == sorted((h.score for h in exact), reverse=True)
    assert index.search("xyzzy tidakada", k=5) == []


def test_query_path_matches_full_analysis_bm25s_scores_and_a_full_sort(index_dir):
    """Index.term_ids / scores / rank take shortcuts for speed; each must equal the slow path:
    unicodedata NFKC + casefold, analyze() with stems.json looked up word by word, bm25s's own
    get_scores_from_ids, and a full sort of all scores (score descending, passage id ascending)."""
    import unicodedata

    import numpy as np

    from pakar.retrieval import analyze, normalize, top_k

    ascii_chars = "".join(map(chr, range(128)))
    for text in (ascii_chars, "Ｊａｋａｒｔａ ﬁlm Straße İstanbul ÉCOLE", "JEMBATAN Suramadu? 2009!"):
        assert normalize(text) == unicodedata.normalize("NFKC", text).casefold()
    index = Index(index_dir)
    stems = json.loads((index_dir / "stems.json").read_text(encoding="utf-8"))
    vocab = json.loads((index_dir / "bm25" / "vocab.index.json").read_text(encoding="utf-8"))
    for query in ("KAPAN Jembatan ke Madura selesai DIBANGUN?", "Ｐｅｍｂａｎｇｕｎａｎ jembatan Suramadu",
                  "siapa yang membangun candi Buddha terbesar di dunia", "xyzzy", "", "rendang rendang pedas"):
        terms = [stems.get(w, w) for w in analyze(query, stem=False, query=True)]
        expected = [vocab[t] for t in terms if t in vocab]
        assert index.term_ids(query) == expected
        reference = index.bm25.get_scores_from_ids(expected) if expected else np.zeros(len(index), np.float32)
        assert np.array_equal(index.scores(query), reference)
    assert index.term_ids("kapan dibangun") == [vocab["bangun"]]  # a corpus word reaches its stem
    # top_k against a full sort, on zero-heavy vectors with many tied scores (the benchmark's shape)
    rng = np.random.default_rng(0)
    for n in (1, 7, 40, 300, 2000):
        scores = (rng.integers(0, 4, n) * (rng.random(n) < 0.3)).astype(np.float32)
        full = np.lexsort((np.arange(n), -scores))
        for k in (1, 5, 20, 50, n, n + 3):
            expected = full[:k][scores[full[:k]] > 0]
            assert top_k(scores, k).tolist() == expected.tolist(), (n, k)
    assert top_k(np.zeros(100, np.float32), 5).tolist() == []


def test_passages_never_cross_documents_and_keep_sources(index_dir):
    index = Index(index_dir)
    rows = [(h.text, h.source, h.doc, h.word) for h in index.passages(range(len(index)))]
    assert len(rows) >= len(DOCS_A) + len(DOCS_B)
    for text, source, doc, word in rows:
        words = source_docs(source)[doc].split()
        assert words[word:word + len(text.split())] == text.split()  # inside its own document, in place
    assert {Path(s).name for _, s, _, _ in rows} == {"a.txt", "b.jsonl.gz"}


def test_index_is_reused_when_unchanged_and_rebuilt_when_changed(tmp_path):
    corpus = make_corpus(tmp_path)
    out = tmp_path / "idx"
    logs: list[str] = []
    assert not build_index([corpus], out, log=logs.append)["reused"]
    assert build_index([corpus], out, log=logs.append)["reused"]
    with open(corpus / "a.txt", "a", encoding="utf-8") as f:
        f.write("Komodo adalah kadal terbesar yang hidup di Pulau Komodo.\n")
    report = build_index([corpus], out, log=logs.append)
    assert not report["reused"] and any("rebuilding" in line and "1 changed" in line for line in logs)
    assert "Komodo" in Index(out).search("kadal terbesar", 1)[0].text
    assert not (tmp_path / "idx.building").exists() and not (tmp_path / "idx.old").exists()


def test_index_files_load_without_pickle(index_dir):
    import numpy as np

    for npy in (index_dir / "bm25").glob("*.npy"):
        np.load(npy, allow_pickle=False)  # raises if any array needed pickle
    assert {p.suffix for p in index_dir.rglob("*") if p.is_file()} <= {".json", ".npy", ".txt"}


def test_search_cli_json_queries_and_errors(index_dir, tmp_path, capsys):
    assert cli(["search", "--index", str(index_dir), "--json", "--k", "2", "gunung berapi di Jawa Timur"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "Bromo" in out["results"][0]["text"]
    assert all({"text", "source", "score"} <= set(r) for r in out["results"]) and len(out["results"]) <= 2
    queries = tmp_path / "q.txt"
    queries.write_text("ibu kota Indonesia\n\nrendang\n", encoding="utf-8")
    assert cli(["search", "--index", str(index_dir), "--queries", str(queries)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["query"] for line in lines] == ["ibu kota Indonesia", "rendang"]
    assert "Jakarta" in lines[0]["results"][0]["text"] and "Rendang" in lines[1]["results"][0]["text"]
    # user mistakes: one line, exit 2
    assert cli(["search", "--index", str(tmp_path / "nope"), "x"]) == 2
    assert cli(["index", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)


# --- the template and the context window ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gen(tmp_path_factory):
    from test_serve import tiny_chat_checkpoint

    from pakar.generate import TextGenerator

    return TextGenerator.from_checkpoint(tiny_chat_checkpoint(tmp_path_factory.getbasetemp()))


@pytest.mark.parametrize("n_words", [5, 40, 150, 400])
def test_prompt_fits_the_window_and_keeps_the_whole_question(tiny_gen, index_dir, n_words):
    gen = tiny_gen
    question = " ".join(["Apa ibu kota Indonesia"] + [f"kata{i}" for i in range(n_words)]) + "?"
    long_passages = [" ".join(["Jakarta adalah kota besar."] * 300), "Rendang enak sekali. " * 200]
    for reserve in (16, 128):
        count = lambda t: len(gen.encode([{"role": "user", "content": t}]))  # noqa: E731
        budget = gen.context_window - reserve
        try:
            text, used = fit_rag_prompt(question, long_passages, budget, count)
        except PakarError as e:  # only when the question alone cannot fit
            assert count(render_rag_prompt(question, [])) > budget, e
            continue
        assert count(text) <= budget
        assert text.endswith(f"Pertanyaan: {question}")  # whole, last
        assert used >= 1 and "[1] Jakarta" in text  # the passage was cut, not the question
    # and through the Retriever with a history, as chat and serve use it
    history = [{"role": "user", "content": "Halo"}, {"role": "assistant", "content": "Halo juga!"}]
    retriever = Retriever(index_dir, k=5)
    try:
        prompt, hits = retriever.prompt(gen, question, history, reserve=64)
    except PakarError:
        assert n_words >= 150
        return
    assert len(gen.encode(prompt)) <= gen.context_window - 64
    assert prompt[:2] == history and prompt[-1]["content"].endswith(question)
    assert len(hits) == prompt[-1]["content"].count("\n[")  # every cited source is in the prompt


def test_rc_record_renders_the_template_and_masks_only_the_answer(sample_tokenizer, tmp_path):
    from pakar.chat_data import load_chat
    from pakar.tokenizer import encode_chat

    tok = sample_tokenizer
    record = {"context": "Jakarta adalah ibu kota Indonesia.", "question": "Apa ibu kota Indonesia?", "answer": "Jakarta"}
    messages = rc_messages(record)
    expected_user = ('Jawab pertanyaan berdasarkan sumber berikut. Jika jawabannya tidak ada di sumber, jawab: '
                     '"Maaf, jawabannya tidak ada di sumber."\n\n[1] Jakarta adalah ibu kota Indonesia.\n\n'
                     'Pertanyaan: Apa ibu kota Indonesia?')
    assert messages == [{"role": "user", "content": expected_user}, {"role": "assistant", "content": "Jakarta"}]
    assert expected_user == render_rag_prompt(record["question"], [record["context"]])  # the RAG path's text
    ids, mask = encode_chat(tok, messages)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("Jakarta") + [tok.im_end_id]  # only the answer and its end marker
    # unanswerable: "" (or null) becomes the documented refusal sentence
    assert rc_messages({**record, "answer": ""})[1]["content"] == NO_ANSWER
    assert rc_messages({**record, "answer": None})[1]["content"] == NO_ANSWER
    # finetune's reader takes RC records next to chat records
    data = tmp_path / "rc.jsonl"
    chat = {"messages": [{"role": "user", "content": "Halo"}, {"role": "assistant", "content": "Hai"}]}
    data.write_text("\n".join(json.dumps(r) for r in [record, {**record, "answer": ""}, chat]) + "\n", encoding="utf-8")
    train, _, stats = load_chat([data], tok, 4096, split=False)
    assert stats.used == 3
    assert [int(i) for i in train[0][0]] == ids and [bool(m) for m in train[0][1]] == mask
    with pytest.raises(PakarError, match="question"):
        rc_messages({"context": "x", "question": "", "answer": "y"})


# --- chat, chat-batch ------------------------------------------------------------------------------

def test_chat_session_prints_sources_under_the_answer(tiny_gen, index_dir):
    from pakar.chat import ChatSession
    from pakar.engine import SamplingParams

    out = io.StringIO()
    session = ChatSession(tiny_gen, SamplingParams(temperature=0, max_new_tokens=8), out=out,
                          retriever=Retriever(index_dir, k=2))
    session.answer("Candi Buddha terbesar di dunia?")
    text = out.getvalue()
    expected = Index(index_dir).search("Candi Buddha terbesar di dunia?", 2)
    assert "sources:\n  [1] " in text and f"{expected[0].source} (document {expected[0].doc + 1}" in text
    assert session.history[0] == {"role": "user", "content": "Candi Buddha terbesar di dunia?"}  # plain question


def test_chat_batch_report_has_sources(tiny_gen, index_dir, tmp_path, capsys):
    from test_serve import tiny_chat_checkpoint

    ckpt = tiny_chat_checkpoint(Path(os.path.dirname(index_dir)).parent)
    prompts = tmp_path / "p.txt"
    prompts.write_text("ibu kota Indonesia\nkapan Suramadu selesai\n", encoding="utf-8")
    rc = cli(["chat-batch", "--checkpoint", str(ckpt), "--prompts", str(prompts), "--index", str(index_dir),
              "--rag-k", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "rep"), "--json", "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in next((tmp_path / "rep").glob("*.jsonl")).read_text().splitlines()]
    index = Index(index_dir)
    for row, q in zip(rows, ["ibu kota Indonesia", "kapan Suramadu selesai"]):
        assert row["prompt"] == q
        assert [s["text"] for s in row["sources"]] == [h.text for h in index.search(q, 2)]
    assert "sources:" in capsys.readouterr().out
    assert "(document" in next((tmp_path / "rep").glob("*.md")).read_text()


# --- serve and the web page --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rag_server(tiny_gen, index_dir):
    from test_serve import LiveServer

    s = LiveServer(None, model_name="tiny-rag", textgen=tiny_gen, retriever=Retriever(index_dir, k=2))
    yield s
    s.close()


def test_api_returns_sources_and_openai_client_parses(rag_server, index_dir):
    import openai

    client = openai.OpenAI(base_url=rag_server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    q = "gunung berapi aktif di Jawa Timur"
    expected = sources_payload(Index(index_dir).search(q, 2))
    resp = client.chat.completions.create(model="tiny-rag", messages=[{"role": "user", "content": q}],
                                          max_tokens=4, temperature=0)
    assert isinstance(resp.choices[0].message.content, str) and resp.usage.total_tokens > 0
    assert resp.model_extra["sources"] == expected and "Bromo" in expected[0]["text"]
    stream = client.chat.completions.create(model="tiny-rag", messages=[{"role": "user", "content": q}],
                                            max_tokens=4, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].model_extra["sources"] == expected
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    # plain completions are not augmented
    plain = client.completions.create(model="tiny-rag", prompt="Jakarta", max_tokens=2)
    assert "sources" not in (plain.model_extra or {})


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium not found at {CHROMIUM}")
def test_web_page_shows_citations(rag_server, index_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_web import CHROMIUM_ARGS

    q = "candi Buddha terbesar"
    expected = Index(index_dir).search(q, 2)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(rag_server.url + "/")
            page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-rag'")
            page.eval_on_selector("#max-tokens", "el => { el.value = 4; el.dispatchEvent(new Event('input')); }")
            page.fill("#input", q)
            page.press("#input", "Enter")
            page.wait_for_selector(".message.sources li")
            items = page.locator(".message.sources li")
            assert items.all_text_contents() == [f"{h.source} (document {h.doc + 1})" for h in expected]
            assert items.first.get_attribute("title") == expected[0].text
            page.reload()  # kept with the conversation
            page.wait_for_selector(".message.sources li")
            assert page.locator(".message.sources li").count() == len(expected)
            assert errors == []
        finally:
            browser.close()


# --- eval-rag ----------------------------------------------------------------------------------------

def test_answer_scores():
    assert answer_scores("Jakarta.", "jakarta") == (1.0, 1.0)
    em, f1 = answer_scores("kota Jakarta", "Jakarta")
    assert em == 0.0 and f1 == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert answer_scores("Bandung", "Jakarta") == (0.0, 0.0)
    assert answer_scores(NO_ANSWER, "") == (1.0, 1.0)
    assert answer_scores("Jakarta", "") == (0.0, 0.0)


def test_eval_rag_cli(index_dir, tiny_gen, tmp_path, capsys):
    from test_serve import tiny_chat_checkpoint

    qa = tmp_path / "qa.jsonl"
    rows = [{"context": DOCS_A[1], "question": "kapan jembatan Suramadu selesai dibangun?", "answer": "2009"},
            {"context": DOCS_B[1], "question": "candi Buddha terbesar di dunia", "answer": "Borobudur"},
            {"context": DOCS_A[2], "question": "siapa presiden pertama", "answer": ""}]
    qa.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    assert cli(["eval-rag", "--index", str(index_dir), "--data", str(qa), "--json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1])
    # the first two find their paragraph first; the third's words are not in its paragraph
    assert res["retrieval"]["recall@1"] == pytest.approx(200 / 3, abs=0.01)
    assert "1 lines" in captured.err
    ckpt = tiny_chat_checkpoint(Path(os.path.dirname(index_dir)).parent)
    assert cli(["eval-rag", "--index", str(index_dir), "--data", str(qa), "--checkpoint", str(ckpt),
                "--max-new-tokens", "4", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("gold", "retrieved", "none"):
        m = res[f"answers_{mode}"]
        assert m["answerable"]["n"] == 2 and m["unanswerable"]["n"] == 1
        assert 0 <= m["answerable"]["f1"] <= 100
