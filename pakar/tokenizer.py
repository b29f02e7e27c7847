"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) and the ChatML chat template.

API:
    train_tokenizer(documents, vocab_size) -> Tokenizer        BPE from an iterable of strings
    train_on_corpus(specs, vocab_size, log) -> (Tokenizer, CorpusStats, heldout: list[str])
    Tokenizer: encode, encode_batch, decode, vocab_size, eot_id, im_start_id, im_end_id,
               to_json/from_json, save/load (tokenizer.json), token_byte_lengths(), sha256()
    CHAT_TEMPLATE (Jinja), render_chat(messages, add_generation_prompt), encode_chat(tok, messages)

Design choices:

- Qwen2's recipe: NFC normalisation, the GPT-4-style split regex with single digits (numbers are
  split digit by digit, as in Qwen2), then byte-level BPE over the 256 byte symbols, so every string
  is encodable and nothing is ever unknown. The vocabulary counts the 256 bytes, the learned merges
  and 3 special tokens; a small corpus may stop short of the requested size (reported).
- Long runs. A pre-token longer than MAX_PRETOKEN_CHARS (a line without spaces, a base64 blob) is
  cut into pieces of that many characters by a second Split step, so BPE training and encoding stay
  linear in the text's length (BPE training is quadratic in a pre-token's length: a 1 MB line without
  spaces took minutes). Ordinary words, numbers, punctuation and whitespace runs are far shorter, so
  the Qwen2 split is unchanged for them; the step is plain tokenizer.json, which transformers loads.
  Long texts are also encoded (and trained on) in pieces of about PIECE_CHARS characters cut just
  before a space that follows a non-space character (split_text): no pre-token of the Qwen2 pattern
  spans such a point, so the ids are exactly those of the whole text, and the memory `tokenizers`
  takes (about 100 bytes per token) stays bounded by the piece, not by the longest line.
- Special tokens sit at ids 0, 1, 2: <|endoftext|> (document separator in the shards), <|im_start|>,
  <|im_end|> (ChatML). Plain text never produces them: `tokenizers` matches added tokens inside
  input text even with add_special_tokens=False, so the wrapper sets `encode_special_tokens = True`,
  which encodes a literal "<|im_end|>" in a document as ordinary byte-level tokens. Special ids
  appear only where code puts them (the shard writer, encode_chat).
- Training streams documents in batches through `train_from_iterator`. A corpus bigger than
  TRAIN_MAX_BYTES (256 MB of text) is sampled uniformly by document hash: BPE merges settle long
  before that, and training memory and time stay bounded. Held-out documents (the validation split of
  pakar.corpus.is_val) are never trained on, so the compression report is honest.
- token_byte_lengths: a byte-level token's string has one character per byte, so its UTF-8 length
  is its string length (0 for specials). Summed over token ids it gives the bytes of the NFC text,
  the denominator of bits per byte.
- sha256 is over canonical JSON (sorted keys), so it identifies the tokenizer, not its formatting.
- Chat (ChatML, Qwen2's template without tools and without a default system prompt): each message is
  "<|im_start|>{role}\\n{content}<|im_end|>\\n", plus "<|im_start|>assistant\\n" for a generation
  prompt. encode_chat inserts the markers as special ids and encodes roles and contents as plain
  text, each piece separately; that is exactly what a model sees when it answers after
  "<|im_start|>assistant\\n". The loss mask covers each assistant content and its <|im_end|>.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from pakar import PakarError
from pakar.args import DEFAULT_VOCAB, MAX_VOCAB, MIN_VOCAB
from pakar.corpus import (VAL_FRACTION, CorpusStats, doc_hash, human_bytes, is_val,
                          iter_documents, resolve_sources)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
assert MIN_VOCAB == 256 + len(SPECIAL_TOKENS)  # pakar.args holds the bounds for the command-line help
# Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, other whitespace
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
MAX_PRETOKEN_CHARS = 256  # longer pre-tokens are cut (see "Long runs" above)
PIECE_CHARS = 1 << 16  # texts longer than this are encoded in pieces (split_text)
ENCODE_GROUP_CHARS = 4_000_000  # characters handed to one encode_batch_fast call at most
TRAIN_MAX_BYTES = 256_000_000
TRAIN_BATCH_DOCS = 256
HELDOUT_MAX_BYTES = 4_000_000  # held-out text kept for the compression report
SEED_WORD_VOCAB = 4754  # the seed's word-level vocabulary, for comparison


class Tokenizer:
    """A trained byte-level BPE tokenizer. Wraps a `tokenizers.Tokenizer` (`.hf`)."""

    def __init__(self, hf: tokenizers.Tokenizer):
        found = tuple(hf.id_to_token(i) for i in range(len(SPECIAL_TOKENS)))
        if found != SPECIAL_TOKENS:
            raise PakarError(f"tokenizer: expected special tokens {SPECIAL_TOKENS} at ids 0-2, found {found}")
        hf.encode_special_tokens = True  # literal "<|im_end|>" in text -> ordinary tokens (not serialised)
        self.hf = hf
        self.eot_id, self.im_start_id, self.im_end_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if len(text) > PIECE_CHARS:
            return self.encode_batch([text])[0]
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes in parallel on all cores (Rust threads, the GIL released); skips offset tracking.
        Long texts go in pieces (split_text) and groups of at most ENCODE_GROUP_CHARS characters."""
        if all(len(t) <= PIECE_CHARS for t in texts) and sum(map(len, texts)) <= ENCODE_GROUP_CHARS:
            return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]
        out: list[list[int]] = [[] for _ in texts]
        group, owners, size = [], [], 0

        def flush() -> None:
            for i, e in zip(owners, self.hf.encode_batch_fast(group, add_special_tokens=False)):
                out[i] += e.ids

        for i, text in enumerate(texts):
            for piece in split_text(text):
                group.append(piece)
                owners.append(i)
                size += len(piece)
                if size >= ENCODE_GROUP_CHARS:
                    flush()
                    group, owners, size = [], [], 0
        if group:
            flush()
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.hf.to_str()

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        """PakarError (one line) when `s` is not a tokenizer.json with pakar's special tokens."""
        if not isinstance(s, str):
            raise PakarError(f"tokenizer: expected tokenizer.json text, got a {type(s).__name__}")
        try:
            hf = tokenizers.Tokenizer.from_str(s)
        except Exception as e:  # `tokenizers` raises a bare Exception on malformed JSON
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PakarError(f"tokenizer: not a valid tokenizer.json ({first[:200]})") from None
        return cls(hf)

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json atomically (shard caches key on it, a torn file must not exist)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(self.to_json(), encoding="utf-8")
            os.replace(tmp, path)
        finally:  # a failed write (disk full) leaves no temporary file
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise PakarError(f"{path}: no such tokenizer file")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise PakarError(f"{path}: cannot read it as a tokenizer.json ({type(e).__name__})") from None
        except PakarError as e:
            raise PakarError(f"{path}: {e}") from None

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token id stands for (0 for special tokens)."""
        lengths = [0] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            lengths[i] = 0 if i < len(SPECIAL_TOKENS) else len(token)
        return lengths

    def sha256(self) -> str:
        canonical = json.dumps(json.loads(self.to_json()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of at most max_chars characters that encode to exactly the ids of the whole:
    each cut is made just before a space (U+0020) that follows a non-space character, where every
    pre-token of the Qwen2 pattern starts or ends. A stretch of max_chars characters with no such
    space (text without spaces) is cut at max_chars, which changes at most the pre-token at the cut."""
    return list(iter_pieces(text, max_chars))


def iter_pieces(text: str, max_chars: int = PIECE_CHARS) -> Iterator[str]:
    """split_text's pieces one at a time (a 50 MB line is not copied whole a second time)."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind(" ", start + 1, end + 1)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _empty_bpe() -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        # cut over-long pre-tokens: keeps BPE training linear on text without spaces
        pre_tokenizers.Split(Regex(rf"[\s\S]{{1,{MAX_PRETOKEN_CHARS}}}"), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


def train_tokenizer(documents: Iterable[str], vocab_size: int = DEFAULT_VOCAB) -> Tokenizer:
    """Byte-level BPE with `vocab_size` tokens (bytes, merges and the 3 specials) from a stream of text."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise PakarError(f"--vocab-size {vocab_size}: must be at least {MIN_VOCAB} "
                         f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    if vocab_size > MAX_VOCAB:
        raise PakarError(f"--vocab-size {vocab_size}: must be at most {MAX_VOCAB}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    n_docs = 0

    def batches() -> Iterator[list[str]]:
        nonlocal n_docs
        batch = []
        for doc in documents:
            n_docs += 1
            for piece in iter_pieces(doc):  # a 50 MB line is trained on in pieces: bounded memory, same words
                batch.append(piece)
                if len(batch) >= TRAIN_BATCH_DOCS:
                    yield batch
                    batch = []
        if batch:
            yield batch

    hf = _empty_bpe()
    hf.train_from_iterator(batches(), trainer)
    if not n_docs:
        raise PakarError("no documents to train the tokenizer on")
    return Tokenizer(hf)


def train_on_corpus(specs, vocab_size: int = DEFAULT_VOCAB, log=print,
                    on_train_doc: Callable[[str], None] | None = None) -> tuple[Tokenizer, CorpusStats, list[str]]:
    """Trains on a corpus's training documents (sampled above TRAIN_MAX_BYTES); returns the tokenizer,
    the corpus stats and up to HELDOUT_MAX_BYTES of held-out documents (never trained on).
    `on_train_doc` sees each training document (the CLI counts words with it)."""
    stats = CorpusStats()
    sources = resolve_sources(specs, stats)
    # estimate the text size from the files (gzip text shrinks ~4x) to set a uniform sampling rate
    estimate = sum(p.stat().st_size * (4 if p.suffix.lower() == ".gz" else 1) for p in sources)
    keep_ppm = round(min(1.0, TRAIN_MAX_BYTES / max(estimate, 1)) * 1_000_000)
    heldout: list[str] = []
    heldout_bytes = trained_bytes = 0

    def training_docs() -> Iterator[str]:
        nonlocal heldout_bytes, trained_bytes
        for doc in iter_documents(sources, stats):
            h, n_bytes = doc_hash(doc), len(doc.encode("utf-8"))
            if is_val(h, VAL_FRACTION):
                if heldout_bytes < HELDOUT_MAX_BYTES:
                    heldout.append(doc)
                    heldout_bytes += n_bytes
            # sample with the hash's high bits, independent of the low bits that is_val reads
            elif (h >> 32) % 1_000_000 < keep_ppm and trained_bytes < TRAIN_MAX_BYTES:
                trained_bytes += n_bytes
                if on_train_doc:
                    on_train_doc(doc)
                yield doc
        if not trained_bytes:  # a tiny corpus that is all held out: train on it, report no compression
            trained_bytes = heldout_bytes
            yield from heldout
            heldout.clear()

    t0 = time.time()
    tokenizer = train_tokenizer(training_docs(), vocab_size)
    sampled = f", a {keep_ppm / 1e4:.1f}% sample" if keep_ppm < 1_000_000 else ""
    log(f"tokenizer: {tokenizer.vocab_size:,} tokens, trained in {time.time() - t0:.1f} s on "
        f"{human_bytes(trained_bytes)} of text{sampled}; corpus: {stats.summary()}")
    if tokenizer.vocab_size < vocab_size:
        log(f"note: the corpus supports only {tokenizer.vocab_size:,} of the {vocab_size:,} tokens asked for")
    return tokenizer, stats, heldout


# --- chat -------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ROLES = ("system", "user", "assistant")


def validate_messages(messages) -> None:
    """PakarError naming the first problem: not a non-empty list, a bad role, or empty content."""
    if not isinstance(messages, list) or not messages:
        raise PakarError("chat record: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PakarError(f"chat message {i}: expected an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise PakarError(f"chat message {i}: role {m.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise PakarError(f"chat message {i} ({m['role']}): 'content' must be a non-empty string")


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation; identical to rendering CHAT_TEMPLATE."""
    validate_messages(messages)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def encode_chat(tokenizer: Tokenizer, messages: list[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of render_chat(messages) and a loss mask, True exactly on each assistant message's
    content tokens and its <|im_end|>. Content is plain text: a literal "<|im_end|>" in it stays text."""
    validate_messages(messages)
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        header = [tokenizer.im_start_id, *tokenizer.encode(m["role"] + "\n")]
        body = [*tokenizer.encode(m["content"]), tokenizer.im_end_id]
        trained = m["role"] == "assistant"
        ids += header + body + newline
        mask += [False] * len(header) + [trained] * len(body) + [False] * len(newline)
    if add_generation_prompt:
        prompt = [tokenizer.im_start_id, *tokenizer.encode("assistant\n")]
        ids += prompt
        mask += [False] * len(prompt)
    return ids, mask


# --- pakar tokenizer --------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+|[^\w\s]")  # a word-level tokenizer: words and punctuation marks


def compression_report(tokenizer: Tokenizer, heldout: list[str], word_counts: Counter) -> dict:
    """Bytes per token and tokens per (whitespace) word on held-out text, for the BPE and for a
    word-level vocabulary of the most frequent training words (same size, and the seed's 4,754)."""
    n_bytes = sum(len(d.encode("utf-8")) for d in heldout)
    n_words = sum(len(d.split()) for d in heldout)
    n_tokens = sum(map(len, tokenizer.encode_batch(heldout)))
    report = {"heldout_documents": len(heldout), "heldout_bytes": n_bytes, "heldout_words": n_words,
              "bpe": {"vocab_size": tokenizer.vocab_size, "bytes_per_token": n_bytes / max(n_tokens, 1),
                      "tokens_per_word": n_tokens / max(n_words, 1), "unknown_rate": 0.0}}
    pieces = [p for d in heldout for p in _WORD_RE.findall(d)]
    for name, size in (("word_level", tokenizer.vocab_size), ("word_level_seed", SEED_WORD_VOCAB)):
        vocab = {w for w, _ in word_counts.most_common(size - 1)}  # one id left for <unk>
        unknown = sum(p not in vocab for p in pieces)
        report[name] = {"vocab_size": size, "bytes_per_token": n_bytes / max(len(pieces), 1),
                        "tokens_per_word": len(pieces) / max(n_words, 1),
                        "unknown_rate": unknown / max(len(pieces), 1)}
    return report
