"""Token shards: a corpus tokenized once into memory-mapped arrays, and the batch loaders over them.

API:
    prepare(specs, out_dir, vocab_size, val_fraction, tokenizer, log) -> (Tokenizer, TokenData)
    TokenData(train, val, manifest, dir); TokenData.load(dir)
    BatchLoader(tokens, batch_size, seq_len, seed, rank, world_size, shuffle).get(epoch, step) -> (x, y)

Run directory layout (`--out DIR`):
    DIR/tokenizer.json                  trained on first use, reused afterwards
    DIR/data/<key>/train.bin, val.bin   token ids, uint16 (vocab <= 65,536) or uint32, raw little-endian
    DIR/data/<key>/manifest.json        sources (path, size, mtime, sha256), tokenizer sha256, counts, ...

Design choices:

- Layout. Each split is one flat stream of documents, each followed by <|endoftext|>: the simplest
  thing a memmap can serve, and what nanoGPT trains on.
- Split. A document goes to validation by the hash rule of pakar.corpus.is_val (default 1%): it
  depends on the text alone, so it is the same across runs and file orders, and duplicates never
  straddle train and val. The document with the smallest hash is always in validation (moved there
  at the end if no document qualified), so every corpus of two or more documents gets one; a
  one-document corpus trains on its only document and has an empty val.bin.
- Caching. The key is a hash of the shard format version, the tokenizer's sha256, val_fraction and
  the sha256 of every source file's bytes, in order. Content is hashed on every run rather than
  trusting sizes and mtimes: it costs ~1 s per GB (22 ms for the 22 MB id_legal gzip), cannot be
  fooled by a copy that keeps mtimes, and survives moving the corpus. A hit (manifest present and
  shard sizes matching it) reuses the shards without reading the corpus. A changed source or
  tokenizer gives a new key and a new folder; old folders are left for the user to delete.
- Atomic writes. Shards are written to temporary files and renamed into place, and the manifest
  last, so an interrupted prepare never leaves a manifest pointing at half-written shards.
- Speed and memory. The main thread reads and cleans documents into ~4 MB chunks (a document longer
  than pakar.tokenizer.PIECE_CHARS in exact pieces, so one 50 MB line is no bigger for the encoder
  than many short ones) and writes the finished ones; `tokenizers`' Rust encoder works on up to IN_FLIGHT chunks at once on all cores
  with the GIL released. Memory is bounded by the chunks in flight (about 100 bytes per token inside
  `tokenizers`), not by the corpus. Threads, not processes: nothing to pickle, safe under Windows'
  spawn. On id_legal this matches or beats one encode_batch call over the whole corpus in memory
  (benchmarks/bench_prepare.py).
- Batches. BatchLoader makes the batch a pure function of (seed, epoch, step, rank): exact resume
  needs only the counters, and 1 rank x batch 8 sees the same rows as 2 ranks x batch 4.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from pakar import PakarError
from pakar.args import check_number
from pakar.corpus import (VAL_FRACTION, CorpusStats, doc_hash, embedded_sample_path, is_val, iter_documents,
                          resolve_sources)
from pakar.tokenizer import DEFAULT_VOCAB, Tokenizer, iter_pieces, train_on_corpus

if TYPE_CHECKING:
    import torch  # lazy: imported where batches are made, so `pakar prepare` starts fast and stays small

FORMAT_VERSION = 1
CHUNK_CHARS = 4_000_000  # text per encode_batch call
IN_FLIGHT = 3  # chunks being encoded at once: enough to keep every core busy past a long document
SPLIT_RULE = ("a document is in val when int.from_bytes(sha256(utf8 text)[:8], 'little') % 10**6 < "
              "round(val_fraction * 10**6); the document(s) with the smallest such hash are always in val "
              "unless that would leave train empty")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class TokenData:
    """A prepared corpus: memory-mapped token streams and the manifest describing them."""

    train: np.ndarray  # (N_train,) uint16/uint32 memmap
    val: np.ndarray  # (N_val,)
    manifest: dict
    dir: Path

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def train_bytes(self) -> int:
        """UTF-8 bytes of the train text (of the NFC text the tokens decode to), for bits per byte."""
        return self.manifest["train"]["bytes"]

    @property
    def val_bytes(self) -> int:
        return self.manifest["val"]["bytes"]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TokenData:
        """Opens DIR/data/<key>; PakarError if the manifest is missing or the shards do not match it."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PakarError(f"{directory}: no readable manifest.json ({e.__class__.__name__})") from None
        if manifest.get("version") != FORMAT_VERSION:
            raise PakarError(f"{directory}: shard format {manifest.get('version')}, expected {FORMAT_VERSION}")
        dtype = np.dtype(manifest["dtype"])
        arrays = []
        for split in ("train", "val"):
            path, n = directory / f"{split}.bin", manifest[split]["tokens"]
            if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
                raise PakarError(f"{path}: missing or not the {n:,} tokens its manifest promises")
            arrays.append(np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype))
        return cls(arrays[0], arrays[1], manifest, directory)



def document_chunks(documents: Iterator[str]) -> Iterator[tuple[list[str], list[int], list[bool]]]:
    """The unit prepare hands the encoder: (pieces, hashes, lasts) of about CHUNK_CHARS characters.
    A document longer than PIECE_CHARS comes as several pieces (pakar.tokenizer.iter_pieces, which
    encode to exactly the whole document's ids), possibly spread over several chunks, so one huge
    line never sits in the encoder at once; each piece carries its document's hash (the split rule
    reads the whole text) and whether it is the document's last piece."""
    pieces, hashes, lasts, size = [], [], [], 0
    for doc in documents:
        h = doc_hash(doc)
        parts = iter_pieces(doc)
        part = next(parts)
        while part is not None:
            following = next(parts, None)  # one piece of lookahead: is this the document's last?
            pieces.append(part)
            hashes.append(h)
            lasts.append(following is None)
            size += len(part)
            part = following
            if size >= CHUNK_CHARS:
                yield pieces, hashes, lasts
                pieces, hashes, lasts, size = [], [], [], 0
    if pieces:
        yield pieces, hashes, lasts


class _ShardWriter:
    """Appends tokenized documents to train/val temp files, routing each by its hash."""

    def __init__(self, directory: Path, tokenizer: Tokenizer, val_fraction: float):
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.eot = tokenizer.eot_id
        self.val_fraction = val_fraction
        self.byte_len = np.asarray(tokenizer.token_byte_lengths(), dtype=np.int64)
        self.tmp = {s: directory / f"{s}.bin.tmp-{os.getpid()}" for s in ("train", "val")}
        self.files = {s: open(p, "wb") for s, p in self.tmp.items()}
        self.counts = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in ("train", "val")}
        # the smallest hash among train documents and their [start, end) token ranges in train.bin
        self.min_hash, self.min_ranges = 1 << 64, []
        self.doc_start: int | None = None  # train.bin position of the open document's first piece

    def write(self, pieces_ids: list[list[int]], hashes: list[int], lasts: list[bool]) -> None:
        """Appends encoded pieces (document_chunks); <|endoftext|> follows each document's last piece."""
        out = {"train": [], "val": []}
        for ids, h, last in zip(pieces_ids, hashes, lasts):
            split = "val" if is_val(h, self.val_fraction) else "train"
            if split == "train" and self.doc_start is None:
                self.doc_start = self.counts["train"]["tokens"] + len(out["train"])
            out[split] += ids
            if not last:
                continue
            out[split].append(self.eot)
            self.counts[split]["documents"] += 1
            if split == "train":
                if h <= self.min_hash:
                    if h < self.min_hash:
                        self.min_hash, self.min_ranges = h, []
                    self.min_ranges.append((self.doc_start, self.counts["train"]["tokens"] + len(out["train"])))
                self.doc_start = None
        for split, ids in out.items():
            ids_N = np.array(ids, dtype=self.dtype)
            ids_N.tofile(self.files[split])
            self.counts[split]["tokens"] += len(ids_N)
            self.counts[split]["bytes"] += int(self.byte_len[ids_N].sum())

    def finish(self) -> None:
        """Closes the files and applies the at-least-one-val-document rule."""
        for f in self.files.values():
            f.close()
        train, val = self.counts["train"], self.counts["val"]
        if val["documents"] == 0 and train["documents"] > len(self.min_ranges):
            self._move_min_hash_documents_to_val()

    def _move_min_hash_documents_to_val(self) -> None:
        """No document qualified for val: move the smallest-hash one(s) there, copying train slice by slice."""
        old_N = np.memmap(self.tmp["train"], dtype=self.dtype, mode="r")
        edges = [0, *(e for span in self.min_ranges for e in span), len(old_N)]  # train, val, train, ...
        rewritten = self.tmp["train"].with_name(self.tmp["train"].name + "-moved")
        self.tmp["moved"] = rewritten  # cleaned up on failure
        with open(rewritten, "wb") as f_train, open(self.tmp["val"], "wb") as f_val:
            for i, (a, b) in enumerate(zip(edges, edges[1:])):
                old_N[a:b].tofile(f_val if i % 2 else f_train)
        val_N = np.fromfile(self.tmp["val"], dtype=self.dtype)  # the moved document(s) only
        del old_N  # unmap before replacing the file (Windows refuses otherwise)
        os.replace(rewritten, self.tmp["train"])
        del self.tmp["moved"]
        val, train, n_moved = self.counts["val"], self.counts["train"], len(self.min_ranges)
        val["tokens"], val["documents"], val["bytes"] = len(val_N), n_moved, int(self.byte_len[val_N].sum())
        train["tokens"] -= val["tokens"]
        train["documents"] -= n_moved
        train["bytes"] -= val["bytes"]

    def commit(self, directory: Path) -> None:
        for split, tmp in self.tmp.items():
            os.replace(tmp, directory / f"{split}.bin")

    def cleanup(self) -> None:
        for f in self.files.values():
            f.close()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


def _tokenize(sources: list[Path], tokenizer: Tokenizer, directory: Path, val_fraction: float,
              stats: CorpusStats, log) -> dict:
    """Streams the corpus through the tokenizer into directory/{train,val}.bin; returns the counts."""
    writer = _ShardWriter(directory, tokenizer, val_fraction)
    t0 = last_log = time.time()
    try:
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            pending: deque = deque()

            def drain_one() -> None:
                nonlocal last_log
                future, hashes, lasts = pending.popleft()
                writer.write(future.result(), hashes, lasts)
                if time.time() - last_log > 30:
                    last_log = time.time()
                    n = sum(c["tokens"] for c in writer.counts.values())
                    log(f"  ... {stats.bytes / 1e6:,.0f} MB read, {n / 1e6:,.1f}M tokens, "
                        f"{n / (last_log - t0) / 1e6:.2f}M tokens/s")

            for pieces, hashes, lasts in document_chunks(iter_documents(sources, stats)):
                pending.append((pool.submit(tokenizer.encode_batch, pieces), hashes, lasts))
                if len(pending) >= IN_FLIGHT:
                    drain_one()
            while pending:
                drain_one()
        writer.finish()
        writer.commit(directory)
    finally:
        writer.cleanup()
    return {**writer.counts, "seconds": time.time() - t0}


def describe_sources(sources: list[Path]) -> list[dict]:
    """The manifest's record of each source file; its sha256 goes into the cache key."""
    from pakar.checkpoint import file_sha256  # lazy: it imports torch, which `pakar prepare` never needs

    return [{"path": str(p), "bytes": p.stat().st_size, "mtime": p.stat().st_mtime, "sha256": file_sha256(p)}
            for p in sources]


def cache_key(source_info: list[dict], tokenizer_sha256: str, val_fraction: float) -> str:
    """The token cache's folder name: shard format, tokenizer, split and every source's content."""
    material = json.dumps([FORMAT_VERSION, tokenizer_sha256, val_fraction, [s["sha256"] for s in source_info]])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def find_cached(specs: list[str] | None, out_dir: str | os.PathLike,
                val_fraction: float = VAL_FRACTION) -> tuple[Tokenizer, TokenData] | None:
    """What prepare would reuse without reading the corpus: out_dir's tokenizer and the token shards
    it made of these sources; None when either is missing (prepare would tokenize)."""
    tok_path = Path(out_dir) / "tokenizer.json"
    if not tok_path.exists():
        return None
    tokenizer = Tokenizer.load(tok_path)
    sources = resolve_sources(specs if specs is not None else [str(embedded_sample_path())])
    directory = Path(out_dir) / "data" / cache_key(describe_sources(sources), tokenizer.sha256(), val_fraction)
    if not (directory / "manifest.json").exists():
        return None
    try:
        return tokenizer, TokenData.load(directory)
    except PakarError:
        return None  # damaged shards: prepare rebuilds them


def prepare(specs: list[str] | None, out_dir: str | os.PathLike = ".", vocab_size: int = DEFAULT_VOCAB,
            val_fraction: float = VAL_FRACTION, tokenizer: Tokenizer | None = None,
            log=print) -> tuple[Tokenizer, TokenData]:
    """Tokenizes a corpus into cached shards under out_dir/data/<key>/ (reused when inputs are unchanged).

    specs None uses the embedded sample corpus. The tokenizer is, in order: the one passed in (nothing
    is written), out_dir/tokenizer.json, or a new one trained with `vocab_size` and saved there."""
    check_number("--val-fraction", val_fraction, 0, 0.5, low_open=True)
    if specs is None:
        log(f"no --data given: using the embedded sample corpus {embedded_sample_path()}")
        specs = [str(embedded_sample_path())]
    out_dir = Path(out_dir)
    stats = CorpusStats()  # also counts the junk files and broken links that resolving leaves out
    sources = resolve_sources(specs, stats)
    if tokenizer is None:
        tok_path = out_dir / "tokenizer.json"
        if tok_path.exists():
            tokenizer = Tokenizer.load(tok_path)
            log(f"using {tok_path} ({tokenizer.vocab_size:,} tokens)")
        else:
            tokenizer, _, _ = train_on_corpus(sources, vocab_size, log=log)
            tokenizer.save(tok_path)
            log(f"wrote {tok_path}")

    source_info = describe_sources(sources)
    tok_sha = tokenizer.sha256()
    key = cache_key(source_info, tok_sha, val_fraction)
    directory = out_dir / "data" / key
    if (directory / "manifest.json").exists():
        try:
            data = TokenData.load(directory)
            log(f"cache hit: {directory} ({len(data.train):,} train + {len(data.val):,} val tokens)")
            return tokenizer, data
        except PakarError as e:
            log(f"rebuilding {directory}: {e}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").unlink(missing_ok=True)  # no manifest may describe shards mid-rewrite

    log(f"tokenizing {len(sources)} file(s) into {directory}")
    counts = _tokenize(sources, tokenizer, directory, val_fraction, stats, log)
    warnings = stats.warnings()
    if counts["val"]["documents"] == 0:
        warnings.append("no validation split: the corpus has only one distinct document (val.bin is empty)")
    manifest = {
        "version": FORMAT_VERSION, "key": key, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": source_info, "tokenizer": {"sha256": tok_sha, "vocab_size": tokenizer.vocab_size},
        "dtype": token_dtype(tokenizer.vocab_size).name, "val_fraction": val_fraction, "split_rule": SPLIT_RULE,
        "train": counts["train"], "val": counts["val"], "tokenize_seconds": round(counts["seconds"], 3),
        "corpus": asdict(stats), "warnings": warnings,
    }
    tmp = directory / f"manifest.json.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, directory / "manifest.json")
    finally:  # a failed write (disk full) leaves no temporary file
        tmp.unlink(missing_ok=True)

    n = counts["train"]["tokens"] + counts["val"]["tokens"]
    log(f"read {stats.summary()}")
    for w in warnings:
        log(f"warning: {w}")
    log(f"{n:,} tokens ({counts['train']['tokens']:,} train, {counts['val']['tokens']:,} val in "
        f"{counts['val']['documents']:,} documents) in {counts['seconds']:.1f} s "
        f"({n / max(counts['seconds'], 1e-9) / 1e6:.2f}M tokens/s)")
    return tokenizer, TokenData.load(directory)


# --- batches ----------------------------------------------------------------------------------------

class BatchLoader:
    """Random access: the batch for (epoch, step) is a pure function of (seed, epoch, step, rank), so
    exact resume needs only the counters.

    The stream is cut into windows of seq_len+1 tokens with stride seq_len (consecutive windows share
    one token, every token is a target once per epoch). An epoch visits every window once, in an order
    that is a permutation seeded by (seed, epoch) (numpy's PCG64, the same on every platform). Step s
    takes the global batch of windows [s*G, (s+1)*G) of that order, G = batch_size * world_size, and
    rank r its rows [r*batch_size, (r+1)*batch_size). The incomplete last global batch is dropped.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if batch_size < 1 or seq_len < 1:
            raise PakarError(f"--batch {batch_size} and --seq-len {seq_len} must be positive")
        if not 0 <= rank < world_size:
            raise PakarError(f"rank {rank} is not in [0, world size {world_size})")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.n_windows = max(len(tokens) - 1, 0) // seq_len
        global_batch = batch_size * world_size
        self.steps_per_epoch = self.n_windows // global_batch
        if self.steps_per_epoch == 0:
            raise PakarError(f"the corpus has {len(tokens):,} tokens = {self.n_windows:,} windows of --seq-len "
                             f"{seq_len}, fewer than one global batch of {global_batch} ({batch_size} x "
                             f"{world_size} ranks): use a smaller --batch or --seq-len, or more data")
        self._order_epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """(n_windows,) window indices in the order epoch `epoch` visits them."""
        if epoch != self._order_epoch:  # one permutation per epoch, cached
            self._order_epoch = epoch
            self._order = (np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n_windows)
                           if self.shuffle else np.arange(self.n_windows))
        return self._order

    def get(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (batch_size, seq_len), y = x shifted left by one token."""
        import torch  # lazy: only batches need torch; `pakar prepare` stays torch-free

        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise IndexError(f"step {step} of epoch {epoch} outside [0, {self.steps_per_epoch}) steps")
        first = step * self.batch_size * self.world_size + self.rank * self.batch_size
        windows_B = self.order(epoch)[first:first + self.batch_size]
        idx_BT1 = windows_B[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        seq_BT1 = torch.from_numpy(self.tokens[idx_BT1].astype(np.int64))
        return seq_BT1[:, :-1], seq_BT1[:, 1:]
