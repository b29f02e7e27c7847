"""Corpus reading: every kind of bad input is either a one-line PakarError or a counted skip."""

import gzip
import json
import os

import pytest

from pakar import PakarError
from pakar import corpus
from pakar.corpus import (CorpusStats, detect_kind, doc_hash, embedded_sample_path, is_val, iter_documents,
                          iter_records, resolve_sources)


def read(specs):
    stats = CorpusStats()
    return list(iter_documents(specs, stats)), stats


def test_sources_from_files_dirs_and_globs(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ".git").mkdir()
    for name in ("a.txt", "b/c.txt", "b/d.jsonl", "b/.hidden.txt", "b/.git/HEAD"):
        (tmp_path / name).write_text("x\n")
    found = resolve_sources([str(tmp_path / "b"), str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    assert found == sorted(found)
    assert [p.name for p in found] == ["a.txt", "c.txt", "d.jsonl"]  # deduplicated, hidden files left out
    assert [p.name for p in resolve_sources(str(tmp_path / "**" / "*.txt"))] == ["a.txt", "c.txt"]


@pytest.mark.parametrize("spec, message", [("nope.txt", "no such file"), ("*.nothing", "matches no files")])
def test_missing_path_and_empty_glob_are_named(tmp_path, spec, message):
    with pytest.raises(PakarError, match=message) as e:
        resolve_sources([str(tmp_path / spec)])
    assert spec in str(e.value) and "\n" not in str(e.value)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(PakarError, match="no files"):
        resolve_sources([str(tmp_path)])


def test_cleaning_is_counted(tmp_path):
    raw = ("\ufeffsatu\r\n".encode() + b"\r\n" + b"   \n" + b"du\x00a\x00\n" + b"ti\xffga\n" + "empat é".encode())
    (tmp_path / "a.txt").write_bytes(raw)
    docs, stats = read(tmp_path / "a.txt")
    assert docs == ["satu", "dua", "ti\ufffdga", "empat é"]  # BOM, CRLF, NULs gone; bad byte replaced
    assert (stats.documents, stats.blank_lines, stats.nul_bytes, stats.bad_utf8_lines) == (4, 2, 2, 1)
    assert stats.bytes == sum(len(d.encode()) for d in docs)
    assert any("invalid UTF-8" in w for w in stats.warnings()) and any("NUL" in w for w in stats.warnings())


def test_gzip_text_and_jsonl(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("pertama\nkedua\n")
    lines = [json.dumps({"text": "baris\r\ndua"}), "not json", json.dumps([1, 2]), json.dumps({"title": "x"}),
             json.dumps({"messages": [{"role": "user", "content": "halo"}]}), json.dumps({"text": "  "})]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    docs, stats = read(tmp_path)
    assert docs == ["pertama", "kedua", "baris\ndua"]
    assert (stats.bad_json, stats.missing_field, stats.chat_skipped, stats.blank_lines) == (2, 1, 1, 1)
    records = list(iter_records(tmp_path / "b.jsonl.gz"))
    assert records[1] == [{"role": "user", "content": "halo"}]


def test_detect_kind(tmp_path, shared_data):
    assert detect_kind(shared_data / "id_chat" / "train.jsonl") == "chat"
    assert detect_kind(embedded_sample_path()) == "text"


def test_chat_only_corpus_is_an_error_for_pretraining(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hai"}]}) + "\n")
    with pytest.raises(PakarError, match="chat conversations"):
        read(tmp_path / "c.jsonl")


def test_empty_files_are_reported_and_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(PakarError, match="no documents") as e:
        read(tmp_path)
    assert "empty.txt" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "good.txt").write_text("isi\n")
    docs, stats = read(tmp_path)
    assert docs == ["isi"] and len(stats.empty_files) == 2


def test_binary_files_are_skipped_by_name(tmp_path):
    (tmp_path / "notes.txt").write_text("catatan\n")
    (tmp_path / "blob.dat").write_bytes(bytes(range(256)) * 20)  # binary content, unknown extension
    (tmp_path / "model.pt").write_bytes(b"looks like text\n")  # binary extension
    (tmp_path / "utf16.txt").write_bytes("halo dunia\n".encode("utf-16"))
    (tmp_path / "stray_nul.txt").write_bytes(b"teks dengan satu\x00 NUL\n")  # still text
    docs, stats = read(tmp_path)
    assert sorted(docs) == ["catatan", "teks dengan satu NUL"]
    assert sorted(os.path.basename(p) for p in stats.binary_files) == ["blob.dat", "model.pt", "utf16.txt"]
    assert any("blob.dat" in w for w in stats.warnings())


def test_corrupt_gzip_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.txt.gz").write_bytes(b"this is not gzip at all\n")
    with pytest.raises(PakarError, match="bad.txt.gz"):
        read(tmp_path / "bad.txt.gz")


def test_long_line_streams_and_over_limit_lines_split_on_characters(tmp_path, monkeypatch):
    long_doc = " ".join(f"pasal{i} ayat é" for i in range(100_000))  # ~1.6 MB, one line
    (tmp_path / "long.txt").write_text(f"pendek\n{long_doc}\nakhir\n", encoding="utf-8")
    docs, stats = read(tmp_path / "long.txt")
    assert docs == ["pendek", long_doc, "akhir"] and stats.long_lines_split == 0
    monkeypatch.setattr(corpus, "MAX_LINE_BYTES", 1001)  # odd: pieces would end inside the 2-byte "é"
    docs, stats = read(tmp_path / "long.txt")
    assert "".join(docs[1:-1]) == long_doc  # cut, never corrupted: no U+FFFD, nothing lost
    assert stats.long_lines_split >= len(long_doc.encode()) // 1001 and stats.bad_utf8_lines == 0
    assert max(len(d.encode()) for d in docs) <= 1001 + 3


def test_id_legal_streams_in_bounded_memory(shared_data):
    """The 114 MB corpus with 1.3 MB lines: memory must not grow with it (read in a child process)."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc to read the peak RSS")
    # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak into a child's ru_maxrss
    code = ("import sys; from pakar.corpus import iter_documents, CorpusStats; s=CorpusStats(); "
            "n=sum(1 for _ in iter_documents(sys.argv[1], s)); "
            "hwm=[l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print(n, s.bytes, hwm)")
    out = subprocess.run([sys.executable, "-c", code, str(shared_data / "id_legal" / "train.txt.gz")],
                         capture_output=True, text=True, check=True).stdout.split()
    n, n_bytes, peak_kib = map(int, out)
    assert n == 5267 and n_bytes > 100e6
    assert peak_kib < 100 * 1024  # a few MB of lines, not the 114 MB corpus


def test_split_rule_is_deterministic_and_about_the_fraction():
    docs = [f"dokumen nomor {i}" for i in range(20_000)]
    assert [doc_hash(d) for d in docs[:5]] == [doc_hash(d) for d in docs[:5]]
    share = sum(is_val(doc_hash(d), 0.01) for d in docs) / len(docs)
    assert 0.008 < share < 0.012


def test_embedded_sample_is_a_real_corpus():
    docs, stats = read(embedded_sample_path())
    assert 400 <= len(docs) <= 600 and 60e3 <= stats.bytes <= 150e3
    assert len(set(docs)) == len(docs) and not stats.warnings()


def test_os_junk_files_in_folders_are_skipped_and_counted(tmp_path):
    """desktop.ini, Thumbs.db, .DS_Store and Office lock files are not text a user meant to train on."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("dokumen satu\n", encoding="utf-8")
    (tmp_path / "c" / "desktop.ini").write_text("[.ShellClassInfo]\nIconResource=x.dll,0\n")
    (tmp_path / "c" / "Thumbs.db").write_text("thumbnail cache text\n")
    (tmp_path / "c" / "~$laporan.docx.txt").write_text("owner lock\n")
    (tmp_path / "c" / "notes.txt~").write_text("editor backup\n")
    for spec in (tmp_path / "c", tmp_path / "c" / "*"):
        docs, stats = read(str(spec))
        assert docs == ["dokumen satu"]
        assert sorted(os.path.basename(p) for p in stats.junk_files) == \
            ["Thumbs.db", "desktop.ini", "notes.txt~", "~$laporan.docx.txt"]
        assert any("skipped 4 operating-system/editor file(s)" in w for w in stats.warnings())
    # named one by one, a file is read whatever its name
    assert read(str(tmp_path / "c" / "desktop.ini"))[0] == ["[.ShellClassInfo]", "IconResource=x.dll,0"]
    # a folder holding only junk says so
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "Thumbs.db").write_text("x\n")
    with pytest.raises(PakarError, match="the folder has no files.*operating-system"):
        resolve_sources(str(tmp_path / "j"))


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this platform")
def test_symlink_loops_and_dangling_links_are_skipped_and_counted(tmp_path):
    (tmp_path / "c" / "sub").mkdir(parents=True)
    (tmp_path / "c" / "a.txt").write_text("dokumen satu\n", encoding="utf-8")
    try:
        os.symlink("loop2", tmp_path / "c" / "loop1")
    except OSError as e:  # Windows without developer mode
        pytest.skip(f"cannot create symlinks here: {e}")
    os.symlink("loop1", tmp_path / "c" / "loop2")
    os.symlink("missing.txt", tmp_path / "c" / "dangling.txt")
    os.symlink("..", tmp_path / "c" / "sub" / "up")  # a folder link back up the tree
    for spec in (tmp_path / "c", tmp_path / "c" / "**" / "*"):
        docs, stats = read(str(spec))
        assert docs == ["dokumen satu"]
        assert {os.path.basename(p) for p in stats.bad_links} >= {"loop1", "loop2", "dangling.txt"}
        assert any("symlink(s) that loop or lead nowhere" in w for w in stats.warnings())
