"""Token shards (content, split, cache, atomicity) and the batch loaders."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pakar import PakarError
from pakar.cli import main as cli_main
from pakar.corpus import doc_hash, is_val
from pakar.data import BatchLoader, TokenData, prepare, token_dtype
from pakar.tokenizer import Tokenizer, train_tokenizer

DOCS = [f"Dokumen ke-{i}: kalimat tentang kopi, hujan, dan kereta nomor {i * 7}." for i in range(300)]
quiet = lambda *a: None  # noqa: E731


def write_corpus(path, docs):
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def split_docs(tok, stream):
    """The documents of a shard, from its tokens (documents end with <|endoftext|>)."""
    text = tok.decode(np.asarray(stream).tolist())
    return text.split("<|endoftext|>")[:-1] if text else []


def test_shards_hold_every_document_once(tmp_path, sample_tokenizer):
    src = write_corpus(tmp_path / "a.txt", DOCS)
    tok, data = prepare([str(src)], tmp_path / "run", tokenizer=sample_tokenizer, log=quiet)
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    train, val = split_docs(tok, data.train), split_docs(tok, data.val)
    assert sorted(train + val) == sorted(DOCS)
    assert val == [d for d in DOCS if is_val(doc_hash(d), 0.01)] and len(val) >= 1
    m = data.manifest
    assert m["train"]["tokens"] + m["val"]["tokens"] == sum(len(tok.encode(d)) + 1 for d in DOCS)
    assert (m["train"]["documents"], m["val"]["documents"]) == (len(train), len(val))
    assert data.train_bytes + data.val_bytes == sum(len(d.encode()) for d in DOCS)
    assert m["tokenizer"]["sha256"] == tok.sha256() and m["sources"][0]["sha256"]
    assert data.dir == tmp_path / "run" / "data" / m["key"]
    assert sorted(p.name for p in data.dir.iterdir()) == ["manifest.json", "train.bin", "val.bin"]


def test_dtype_follows_vocab_size():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_trains_tokenizer_once_then_reuses_it(tmp_path):
    src = write_corpus(tmp_path / "a.txt", DOCS)
    logs = []
    tok, _ = prepare([str(src)], tmp_path / "run", vocab_size=280, log=logs.append)
    assert (tmp_path / "run" / "tokenizer.json").exists() and tok.vocab_size == 280
    tok2, _ = prepare([str(src)], tmp_path / "run", vocab_size=999, log=logs.append)
    assert tok2.sha256() == tok.sha256() and any("using" in line for line in logs)


def test_cache_hit_does_not_retokenize(tmp_path, sample_tokenizer, monkeypatch):
    src = write_corpus(tmp_path / "a.txt", DOCS)
    _, first = prepare([str(src)], tmp_path, tokenizer=sample_tokenizer, log=quiet)

    def no_encoding(*args):
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(Tokenizer, "encode_batch", no_encoding)
    logs = []
    _, second = prepare([str(src)], tmp_path, tokenizer=sample_tokenizer, log=logs.append)
    assert second.dir == first.dir and second.manifest == first.manifest
    assert any("cache hit" in line for line in logs)


def test_changed_source_or_tokenizer_rebuilds(tmp_path, sample_tokenizer):
    src = write_corpus(tmp_path / "a.txt", DOCS)
    _, first = prepare([str(src)], tmp_path, tokenizer=sample_tokenizer, log=quiet)
    write_corpus(src, DOCS[:-1] + ["Dokumen yang diubah."])
    _, changed = prepare([str(src)], tmp_path, tokenizer=sample_tokenizer, log=quiet)
    assert changed.key != first.key
    other = train_tokenizer(DOCS, vocab_size=300)
    _, retok = prepare([str(src)], tmp_path, tokenizer=other, log=quiet)
    assert retok.key not in (first.key, changed.key)
    assert retok.manifest["tokenizer"]["sha256"] == other.sha256()


def test_interrupted_prepare_leaves_no_manifest_and_recovers(tmp_path, sample_tokenizer, monkeypatch):
    import pakar.data as data_mod

    src = write_corpus(tmp_path / "a.txt", DOCS * 20)
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 2000)
    calls = 0
    real = Tokenizer.encode_batch

    def crash_on_third_chunk(self, texts):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], tmp_path, tokenizer=sample_tokenizer, log=quiet)
    (key_dir,) = (tmp_path / "data").iterdir()
    assert list(key_dir.iterdir()) == []  # no manifest, no half-written shard, no temp file
    monkeypatch.setattr(Tokenizer, "encode_batch", real)
    _, data = prepare([str(src)], tmp_path, tokenizer=sample_tokenizer, log=quiet)
    assert data.dir == key_dir and len(data.train) > 0


def test_corrupt_shard_is_rebuilt(tmp_path, sample_tokenizer):
    src = write_corpus(tmp_path / "a.txt", DOCS)
    _, data = prepare([str(src)], tmp_path, tokenizer=sample_tokenizer, log=quiet)
    n = len(data.train)
    with open(data.dir / "train.bin", "r+b") as f:
        f.truncate(10)
    logs = []
    _, again = prepare([str(src)], tmp_path, tokenizer=sample_tokenizer, log=logs.append)
    assert len(again.train) == n and any("rebuilding" in line for line in logs)


def test_split_is_independent_of_file_order(tmp_path, sample_tokenizer):
    a = write_corpus(tmp_path / "z.txt", DOCS)
    (tmp_path / "two").mkdir()
    write_corpus(tmp_path / "two" / "b.txt", DOCS[::2])
    write_corpus(tmp_path / "two" / "a.txt", DOCS[1::2][::-1])
    _, d1 = prepare([str(a)], tmp_path / "r1", tokenizer=sample_tokenizer, log=quiet)
    _, d2 = prepare([str(tmp_path / "two")], tmp_path / "r2", tokenizer=sample_tokenizer, log=quiet)
    _, d1_again = prepare([str(a)], tmp_path / "r3", tokenizer=sample_tokenizer, log=quiet)
    val1, val2 = split_docs(sample_tokenizer, d1.val), split_docs(sample_tokenizer, d2.val)
    assert sorted(val1) == sorted(val2) and np.array_equal(d1.val, d1_again.val)


def test_tiny_corpus_still_gets_a_validation_document(tmp_path, sample_tokenizer):
    docs = DOCS[:6]
    src = write_corpus(tmp_path / "a.txt", docs)
    _, data = prepare([str(src)], tmp_path, val_fraction=1e-6, tokenizer=sample_tokenizer, log=quiet)
    assert split_docs(sample_tokenizer, data.val) == [min(docs, key=doc_hash)]
    assert sorted(split_docs(sample_tokenizer, data.train)) == sorted(set(docs) - {min(docs, key=doc_hash)})
    assert data.manifest["val"]["documents"] == 1
    assert data.train_bytes + data.val_bytes == sum(len(d.encode()) for d in docs)

    one = write_corpus(tmp_path / "one.txt", ["satu-satunya dokumen"])
    _, data = prepare([str(one)], tmp_path, val_fraction=1e-6, tokenizer=sample_tokenizer, log=quiet)
    assert len(data.val) == 0 and len(data.train) > 0
    assert any("no validation split" in w for w in data.manifest["warnings"])


def test_corpus_problems_land_in_the_manifest(tmp_path, sample_tokenizer):
    (tmp_path / "c").mkdir()
    write_corpus(tmp_path / "c" / "a.txt", DOCS)
    (tmp_path / "c" / "bad.txt").write_bytes(b"ok\n\xff\xfe rusak\n")
    (tmp_path / "c" / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    _, data = prepare([str(tmp_path / "c")], tmp_path, tokenizer=sample_tokenizer, log=quiet)
    corpus = data.manifest["corpus"]
    assert corpus["bad_utf8_lines"] == 1 and corpus["binary_files"][0].endswith("img.png")
    assert any("img.png" in w for w in data.manifest["warnings"])


def test_bad_val_fraction(tmp_path):
    with pytest.raises(PakarError, match="--val-fraction"):
        prepare(None, tmp_path, val_fraction=0.0)


def test_cli_missing_path_is_exit_2_one_line(tmp_path, capsys):
    assert cli_main(["prepare", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data") and "missing.txt" in err and "\n" not in err


def test_cli_prepares_the_embedded_sample(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pakar.cli", "prepare", "--out", str(tmp_path),
                          "--vocab-size", "400"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "embedded sample" in out.stdout
    manifest = json.loads(next((tmp_path / "data").glob("*/manifest.json")).read_text())
    assert manifest["val"]["documents"] >= 1 and manifest["train"]["tokens"] > 10_000


# --- batches ----------------------------------------------------------------------------------------

TOKENS = np.arange(1001, dtype=np.uint16)  # 1000 targets = 125 windows of 8 tokens


def test_batches_are_shifted_windows():
    loader = BatchLoader(TOKENS, batch_size=4, seq_len=8, seed=0, shuffle=False)
    x, y = loader.get(0, 1)
    assert x.dtype == torch.int64 and x.shape == (4, 8)
    assert torch.equal(x[0], torch.arange(32, 40)) and torch.equal(y, x + 1)
    assert loader.steps_per_epoch == 31  # 125 windows // 4, the incomplete batch dropped


def test_batch_is_a_pure_function_of_the_counters():
    a = BatchLoader(TOKENS, 4, 8, seed=1)
    b = BatchLoader(TOKENS, 4, 8, seed=1)
    assert torch.equal(a.get(2, 5)[0], b.get(2, 5)[0])
    a.get(0, 0)  # visiting other epochs in between changes nothing
    assert torch.equal(a.get(2, 5)[0], b.get(2, 5)[0])
    assert not torch.equal(a.get(0, 0)[0], a.get(1, 0)[0])  # a fresh order each epoch
    assert not torch.equal(a.get(0, 0)[0], BatchLoader(TOKENS, 4, 8, seed=2).get(0, 0)[0])


def test_ranks_split_the_global_batch():
    single = BatchLoader(TOKENS, 8, 8, seed=3)
    ranks = [BatchLoader(TOKENS, 4, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch
    for step in (0, 7, single.steps_per_epoch - 1):
        assert torch.equal(single.get(1, step)[0], torch.cat([r.get(1, step)[0] for r in ranks]))


def test_every_window_once_per_epoch():
    tokens = np.arange(8 * 96 + 1, dtype=np.uint16)  # 96 windows, 12 global batches of 8
    loader = BatchLoader(tokens, 4, 8, seed=4, rank=1, world_size=2)
    other = BatchLoader(tokens, 4, 8, seed=4, rank=0, world_size=2)
    starts = [int(x[i, 0]) for ld in (loader, other) for s in range(ld.steps_per_epoch) for x in [ld.get(0, s)[0]]
              for i in range(4)]
    assert sorted(starts) == list(range(0, 8 * 96, 8))


def test_too_small_corpus_names_the_flags():
    with pytest.raises(PakarError, match="--batch.*--seq-len"):
        BatchLoader(TOKENS[:50], 8, 8, seed=0)
    with pytest.raises(IndexError):
        BatchLoader(TOKENS, 4, 8, seed=0).get(0, 31)


@pytest.mark.slow
def test_id_legal_prepare_peak_memory(tmp_path, shared_data):
    """114 MB with 1.3 MB lines, tokenizer training included: peak RSS must stay under 1.5 GB."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the peak RSS")
    code = ("import sys; from pakar.data import prepare; prepare([sys.argv[1]], sys.argv[2]); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    legal = shared_data / "id_legal" / "train.txt.gz"
    out = subprocess.run([sys.executable, "-c", code, str(legal), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) < 1.5 * 1024 * 1024  # KiB
    data = TokenData.load(next((tmp_path / "data").iterdir()))
    assert data.manifest["train"]["documents"] + data.manifest["val"]["documents"] == 5267


def test_a_huge_line_reaches_the_encoder_in_bounded_exact_pieces(tmp_path, sample_tokenizer, monkeypatch):
    """One long line (the README: memory does not grow with the corpus) is encoded in pieces of at most
    PIECE_CHARS and calls of about CHUNK_CHARS characters, and its tokens in the shard are exactly
    what `tokenizers` gives for the whole line in one call."""
    from pakar.tokenizer import PIECE_CHARS

    line = " ".join(DOCS * 8)  # ~160K characters, one document
    assert len(line) > 2 * PIECE_CHARS
    monkeypatch.setattr("pakar.data.CHUNK_CHARS", 100_000)
    seen = []
    real = Tokenizer.encode_batch

    def recording(self, texts):
        seen.append([len(t) for t in texts])
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", recording)
    corpus = write_corpus(tmp_path / "c.txt", DOCS[:5] + [line] + DOCS[5:10])
    _, data = prepare([str(corpus)], tmp_path, tokenizer=sample_tokenizer, log=quiet)
    assert max(n for call in seen for n in call) <= PIECE_CHARS
    assert max(sum(call) for call in seen) <= 100_000 + PIECE_CHARS
    docs = split_docs(sample_tokenizer, data.train) + split_docs(sample_tokenizer, data.val)
    assert sorted(docs) == sorted(DOCS[:10] + [line])
    stream = np.concatenate([np.asarray(data.train), np.asarray(data.val)]).tolist()
    want = sample_tokenizer.hf.encode(line, add_special_tokens=False).ids + [sample_tokenizer.eot_id]
    assert any(stream[i:i + len(want)] == want for i in range(len(stream) - len(want) + 1) if stream[i] == want[0])
