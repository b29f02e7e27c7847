"""Reading a corpus: `--data` specs -> source files -> documents, streaming, with every problem counted.

API:
    resolve_sources(specs) -> list[Path]          files named by --data, sorted and de-duplicated
    iter_documents(specs, stats=None) -> Iterator[str]          plain-text documents (pretraining)
    iter_records(specs, stats=None) -> Iterator[str | list[dict]]   documents and chat conversations
    iter_sourced_documents(specs, stats=None) -> Iterator[(Path, int, str)]   documents with file and number
    detect_kind(specs) -> "text" | "chat"         the kind of the corpus's first record
    CorpusStats                                   counters; .summary() one line, .warnings() lines
    doc_hash(text) -> int, is_val(h, val_fraction) -> bool      the train/validation split rule
    embedded_sample_path() -> Path                the small Indonesian corpus shipped with pakar

Design choices:

- Specs. A spec is a file, a directory (read recursively; hidden files and folders such as .git are
  left out) or a glob (`**` recurses). Sources are sorted by absolute path, so the order of documents
  does not depend on the order of the flags or of the file system. A missing path or a glob that
  matches nothing is a PakarError naming it. Files found in a folder or by a glob (not those named
  one by one) skip what operating systems and editors leave there (desktop.ini, Thumbs.db,
  .DS_Store, Office's ~$ lock files, editor backups ending in ~) and links that lead nowhere (a
  symlink loop, a dangling link); both are counted and reported. Symlinked folders are not followed
  (os.walk's default), so a link back up the tree cannot loop.
- Formats, by file name: `*.jsonl` / `*.jsonl.gz` hold one JSON object per line, either
  {"text": str} (a document), {"messages": [{"role", "content"}, ...]} (a chat conversation)
  or {"context", "question", "answer"} (reading comprehension, rendered by pakar.prompts.rc_messages as a
  conversation in the retrieval prompt template); everything else is plain text with one document
  per line; `*.gz` is decompressed on the fly.
- Streaming. Files are read line by line in binary mode, so memory is one line whatever the corpus
  size. A line longer than MAX_LINE_BYTES (64 MiB; a file with no line breaks) is cut into pieces at
  UTF-8 character boundaries, each its own document, and counted: one line must not exhaust memory.
- Cleaning, always counted, never silent: a UTF-8 byte-order mark is dropped; CRLF line endings become
  LF; NUL bytes are removed; blank lines are skipped. Invalid UTF-8 is decoded with U+FFFD in place of
  the bad bytes (we keep the line: one bad byte should not throw away a 1 MB law text) and the line is
  counted. JSONL lines that are not JSON objects, or that lack a "text" string / "messages" list, are
  skipped and counted. Files with a binary extension, or whose first 4 KB look binary (over 30%
  control bytes or invalid UTF-8: executables, images, archives, UTF-16), are skipped and reported
  by name; a text file with a few stray NULs is still text. Files that yield no record are reported
  by name. A corpus that yields no document at all is a PakarError.
- The split rule lives here because the tokenizer (its held-out compression report) and the token
  shards (the validation split) must agree on it: a document is held out when the 64-bit prefix of
  the sha256 of its UTF-8 text, mod 10^6, is below val_fraction * 10^6. It depends on the text
  alone: the split is stable across runs and file orders, and exact duplicates land on the same side.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

from pakar import PakarError, what_is_there
from pakar.prompts import rc_messages

MAX_LINE_BYTES = 64 << 20
SNIFF_BYTES = 4096
VAL_FRACTION = 0.01  # default share of documents held out for validation

BINARY_SUFFIXES = {
    ".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".npy", ".npz", ".pkl", ".pyc", ".so", ".dll", ".exe",
    ".zip", ".tar", ".tgz", ".7z", ".rar", ".bz2", ".xz", ".zst", ".png", ".jpg", ".jpeg", ".gif", ".webp",
    ".bmp", ".ico", ".pdf", ".mp3", ".mp4", ".wav", ".ogg", ".docx", ".xlsx", ".pptx", ".parquet", ".arrow",
}
# bytes that may appear in text; every other byte below 0x20 counts as a binary sign
_TEXT_CONTROL = b"\t\n\v\f\r\x1b"
# files operating systems and editors drop into folders: never corpus text (compared lower-case)
JUNK_NAMES = {"desktop.ini", "thumbs.db", "ehthumbs.db", ".ds_store", "icon\r", ".directory"}
_CONTROL = bytes(b for b in range(32) if b not in _TEXT_CONTROL)

Record = str | list[dict]


@dataclass
class CorpusStats:
    """What reading a corpus found. Counters add up over every file read with this object."""

    files: int = 0  # text files read (binary ones excluded)
    documents: int = 0  # plain-text documents yielded
    chat_records: int = 0  # chat conversations seen (yielded by iter_records only)
    bytes: int = 0  # UTF-8 bytes of the documents yielded
    blank_lines: int = 0
    bad_utf8_lines: int = 0  # lines with invalid UTF-8, kept with U+FFFD replacing the bad bytes
    nul_bytes: int = 0  # NUL bytes removed
    long_lines_split: int = 0  # cuts made in lines longer than MAX_LINE_BYTES
    bad_json: int = 0  # JSONL lines that are not a JSON object
    missing_field: int = 0  # JSON objects without a "text" string or a "messages" list
    chat_skipped: int = 0  # chat records left out by iter_documents
    empty_files: list[str] = field(default_factory=list)  # files that yielded no record
    binary_files: list[str] = field(default_factory=list)  # files skipped as binary
    junk_files: list[str] = field(default_factory=list)  # OS/editor files in folders (desktop.ini, ~$x.docx, ...)
    bad_links: list[str] = field(default_factory=list)  # symlinks in folders that loop or lead nowhere

    def summary(self) -> str:
        chat = f", {self.chat_records:,} chat conversations" if self.chat_records else ""
        return (f"{self.files:,} file{'s' * (self.files != 1)}, {self.documents:,} documents{chat}, "
                f"{human_bytes(self.bytes)} of text")

    def warnings(self) -> list[str]:
        def names(paths: list[str]) -> str:
            return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

        counted = [
            (self.bad_utf8_lines, "lines had invalid UTF-8 (bad bytes replaced by U+FFFD)"),
            (self.nul_bytes, "NUL bytes were removed"),
            (self.long_lines_split, f"cuts split lines longer than {MAX_LINE_BYTES >> 20} MiB into documents"),
            (self.bad_json, "JSONL lines were not JSON objects (skipped)"),
            (self.missing_field, "JSONL records had no 'text' string or 'messages' list (skipped)"),
            (self.chat_skipped, "chat records ('messages') were skipped: pretraining reads plain text"),
        ]
        out = [f"{n:,} {what}" for n, what in counted if n]
        if self.binary_files:
            out.append(f"skipped {len(self.binary_files)} binary file(s): {names(self.binary_files)}")
        if self.junk_files:
            out.append(f"skipped {len(self.junk_files)} operating-system/editor file(s): {names(self.junk_files)}")
        if self.bad_links:
            out.append(f"skipped {len(self.bad_links)} symlink(s) that loop or lead nowhere: {names(self.bad_links)}")
        if self.empty_files:
            out.append(f"{len(self.empty_files)} file(s) had no documents: {names(self.empty_files)}")
        return out  # blank lines are normal in text files: counted, not warned about


def human_bytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} KB"


def embedded_sample_path() -> Path:
    """The Indonesian sample corpus shipped with pakar (one document per line)."""
    return Path(__file__).parent / "sample_data" / "id_sample.txt"


def doc_hash(text: str) -> int:
    """A document's identity: the first 8 bytes of the sha256 of its UTF-8 text, as an integer."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def is_val(h: int, val_fraction: float) -> bool:
    """The validation rule on a doc_hash: a val_fraction share of documents, chosen by content."""
    return h % 1_000_000 < round(val_fraction * 1_000_000)


def _as_list(specs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    return [os.fspath(specs)] if isinstance(specs, (str, os.PathLike)) else [os.fspath(s) for s in specs]


def _is_junk(name: str) -> bool:
    lower = name.lower()
    return lower in JUNK_NAMES or name.startswith("~$") or (name.endswith("~") and len(name) > 1)


def _keep_found(paths: list[Path], stats: CorpusStats) -> list[Path]:
    """Resolved paths of the files a folder walk or a glob found, minus junk and broken links (counted)."""
    kept = []
    for p in paths:
        if _is_junk(p.name):
            stats.junk_files.append(str(p))
            continue
        try:
            target = p.resolve(strict=True)
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13) or a dangling link
            target = None
        if target is None or not target.is_file():  # (a glob's ** follows folder links until ELOOP)
            stats.bad_links.append(str(p))
        else:
            kept.append(target)
    return kept


def _files_under(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune .git and friends
        files += [Path(root, n) for n in names if not n.startswith(".")]
    return files


def resolve_sources(specs: str | os.PathLike | Sequence[str | os.PathLike],
                    stats: CorpusStats | None = None) -> list[Path]:
    """The files named by `--data` specs (files, directories, globs): absolute, sorted, unique.
    Junk files and broken links found in folders or by globs are left out and counted in `stats`."""
    stats = CorpusStats() if stats is None else stats
    found: set[Path] = set()
    spec_list = _as_list(specs)
    if not spec_list:
        raise PakarError("--data: no files or folders given")
    for spec in spec_list:
        path = Path(spec).expanduser()
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            files = _keep_found(_files_under(path), stats)
            if not files:
                raise PakarError(f"--data {spec}: the folder has no files{_skipped_note(stats)}")
            found.update(files)
        elif any(c in spec for c in "*?["):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True)]
            files = [f for m in matches for f in (_files_under(m) if m.is_dir() else [m] if m.is_file() or m.is_symlink() else [])]
            files = _keep_found(files, stats)
            if not files:
                raise PakarError(f"--data {spec}: the pattern matches no files{_skipped_note(stats)}")
            found.update(files)
        else:
            raise PakarError(f"--data {spec}: no such file or folder {what_is_there(path)}")
    return sorted(found)


def _skipped_note(stats: CorpusStats) -> str:
    return f" ({'; '.join(stats.warnings())})" if stats.junk_files or stats.bad_links else ""


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith((".jsonl", ".jsonl.gz"))


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _looks_binary(head: bytes) -> bool:
    if not head:
        return False
    control = len(head) - len(head.translate(None, _CONTROL))
    invalid = head.decode("utf-8", "replace").count("\ufffd")  # a character cut at 4 KB costs one or two
    return control + invalid > 0.3 * len(head)


def _char_boundary(b: bytes) -> int:
    """Length of the longest prefix of `b` that does not end inside a UTF-8 character."""
    i = len(b) - 1
    while i > 0 and len(b) - i < 4 and b[i] & 0xC0 == 0x80:  # back over continuation bytes to the lead
        i -= 1
    need = 1 if b[i] < 0x80 else 2 if b[i] < 0xE0 else 3 if b[i] < 0xF0 else 4  # the lead's char length
    return len(b) if len(b) - i >= need else i


def _lines(f, stats: CorpusStats) -> Iterator[bytes]:
    """Raw lines (with their line ending); a line over MAX_LINE_BYTES comes in character-aligned pieces."""
    carry = b""
    while piece := f.readline(MAX_LINE_BYTES):
        line, carry = carry + piece, b""
        if len(piece) < MAX_LINE_BYTES or piece.endswith(b"\n"):
            yield line
        else:  # an over-long line: cut it, carrying an incomplete last character into the next piece
            cut = _char_boundary(line)
            line, carry = line[:cut], line[cut:]
            stats.long_lines_split += 1
            yield line
    if carry:
        yield carry


def _decode(raw: bytes, stats: CorpusStats) -> str:
    if b"\0" in raw:
        stats.nul_bytes += raw.count(b"\0")
        raw = raw.replace(b"\0", b"")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.bad_utf8_lines += 1
        text = raw.decode("utf-8", "replace")
    return text[1:] if text.startswith("\ufeff") else text  # a BOM (also one left mid-file by `cat`)


def _parse_json(line: str, stats: CorpusStats) -> Record | None:
    try:
        obj = json.loads(line, strict=False)  # strict=False: tolerate raw tabs/newlines inside strings
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        stats.bad_json += 1
        return None
    if isinstance(obj.get("text"), str):
        return obj["text"].replace("\r\n", "\n")
    if isinstance(obj.get("messages"), list) and obj["messages"]:
        return obj["messages"]
    if "question" in obj and "context" in obj:  # reading comprehension: the RAG template (pakar.rag)
        try:
            return rc_messages(obj)
        except PakarError:
            pass
    stats.missing_field += 1
    return None


def _read_file(path: Path, stats: CorpusStats) -> Iterator[Record]:
    jsonl = _is_jsonl(path)
    yielded = 0
    try:
        with _open(path) as f:
            if path.suffix.lower() in BINARY_SUFFIXES or _looks_binary(f.read(SNIFF_BYTES)):
                stats.binary_files.append(str(path))
                return
            f.seek(0)
            stats.files += 1
            for raw in _lines(f, stats):
                text = _decode(raw.rstrip(b"\r\n"), stats)
                if not text.strip():
                    stats.blank_lines += 1
                    continue
                record = _parse_json(text, stats) if jsonl else text
                if record is None:
                    continue
                if isinstance(record, str):
                    if not record.strip():
                        stats.blank_lines += 1
                        continue
                    stats.documents += 1
                    stats.bytes += len(record.encode("utf-8"))
                else:
                    stats.chat_records += 1
                yielded += 1
                yield record
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise PakarError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    if not yielded:
        stats.empty_files.append(str(path))


def _describe(specs) -> str:
    names = _as_list(specs)
    return "--data " + " ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def iter_records(specs, stats: CorpusStats | None = None) -> Iterator[Record]:
    """Every record of the corpus in source order: a document (str) or a chat conversation (the list of
    message dicts, as read; validate with pakar.tokenizer.encode_chat). Raises PakarError at the end if
    the corpus held no record."""
    stats = CorpusStats() if stats is None else stats
    sources = resolve_sources(specs, stats)
    n_records = 0
    for path in sources:
        for record in _read_file(path, stats):
            n_records += 1
            yield record
    if not n_records:
        raise PakarError(f"{_describe(specs)}: no documents in {len(sources)} file(s) "
                         f"({'; '.join(stats.warnings()) or 'all empty'})")


def iter_documents(specs, stats: CorpusStats | None = None) -> Iterator[str]:
    """The plain-text documents of the corpus, in source order. Chat records are skipped and counted
    (stats.chat_skipped); a corpus with no plain-text document is a PakarError."""
    stats = CorpusStats() if stats is None else stats
    n_docs = n_chats = 0
    for record in iter_records(specs, stats):
        if isinstance(record, str):
            n_docs += 1
            yield record
        else:
            n_chats += 1
            stats.chat_skipped += 1
    if not n_docs:
        raise PakarError(f"{_describe(specs)}: no plain-text documents, only {n_chats:,} chat conversations "
                         "('messages'); use chat data for fine-tuning and a text corpus for pretraining")


def iter_sourced_documents(specs, stats: CorpusStats | None = None) -> Iterator[tuple[Path, int, str]]:
    """iter_documents with each document's source file and its 0-based number among that file's
    documents (a retrieval index cites them). Same counting and the same error on an empty corpus."""
    stats = CorpusStats() if stats is None else stats
    n_docs = 0
    for path in resolve_sources(specs):
        n_in_file = 0
        for record in _read_file(path, stats):
            if isinstance(record, str):
                yield path, n_in_file, record
                n_in_file += 1
            else:
                stats.chat_skipped += 1
        n_docs += n_in_file
    if not n_docs:
        raise PakarError(f"{_describe(specs)}: no plain-text documents "
                         f"({'; '.join(stats.warnings()) or 'all empty'})")


def detect_kind(specs) -> Literal["text", "chat"]:
    """"chat" if the corpus's first record is a conversation ({"messages": [...]}), else "text"."""
    for record in iter_records(specs):
        return "text" if isinstance(record, str) else "chat"
    raise AssertionError("unreachable: iter_records raises on an empty corpus")
