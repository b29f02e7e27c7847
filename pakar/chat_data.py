"""Chat data: conversations read, rendered with their loss masks, batched for training, and evaluated.

    load_chat(specs, tokenizer, max_len, val_fraction) -> (train, val, ChatStats)
    ChatData                                      the training loop's data object for conversations
    collate(convs, pad_id, max_len) -> (x, y)     right-padded rows, targets -100 off assistant tokens
    evaluate_conversations(model, convs, ...) / evaluate_chat(model, tokenizer, specs, ...)
    conversation_hash / chat_data_key             the held-out rule and the data's identity for resume

Its own module (it lived in pakar.finetune) so that evaluation (pakar.evaluate's command, `pakar eval`
on chat JSONL) and fine-tuning both use it without importing each other: the imports run
finetune -> chat_data -> evaluate -> model. Reading-comprehension records ({"context", "question",
"answer"}) reach it as chat messages already (pakar.corpus renders them with pakar.rag.rc_messages).
The design choices (rows, masks, length-sorted buckets, the held-out slice, counted skips) are stated in
pakar.finetune's docstring, which is where a reader of `pakar finetune` looks first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pakar import PakarError
from pakar.args import CHAT_VAL_FRACTION
from pakar.corpus import CorpusStats, doc_hash, is_val, iter_records
from pakar.evaluate import EvalMode, EvalSums, dist_info
from pakar.tokenizer import encode_chat

BUCKET = 32  # global batches per length-sorted run
PAD_MULTIPLE = 8


@dataclass
class ChatStats:
    """What reading a chat corpus found; every skipped record is counted under one reason."""

    corpus: CorpusStats = field(default_factory=CorpusStats)
    conversations: int = 0  # chat records read
    used: int = 0
    invalid: int = 0  # unknown role, empty content, not a list of messages
    first_invalid: str = ""
    too_long: int = 0
    longest: int = 0  # tokens of the longest conversation seen
    no_assistant: int = 0
    text_records: int = 0  # {"text": ...} records in a chat corpus

    def warnings(self, max_len: int) -> list[str]:
        out = self.corpus.warnings()
        if self.invalid:
            out.append(f"{self.invalid:,} conversations had invalid messages (skipped; first: {self.first_invalid})")
        if self.too_long:
            out.append(f"{self.too_long:,} conversations were longer than {max_len} tokens (the context, "
                       f"--seq-len; skipped, not cut; the longest has {self.longest:,})")
        if self.no_assistant:
            out.append(f"{self.no_assistant:,} conversations had no assistant message to learn from (skipped)")
        if self.text_records:
            out.append(f"{self.text_records:,} plain-text records in the chat data were skipped")
        return out


def conversation_hash(messages: list) -> int:
    """doc_hash of the conversation's canonical JSON: the validation rule depends on content only."""
    return doc_hash(json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":")))


def load_chat(specs, tokenizer, max_len: int, val_fraction: float = CHAT_VAL_FRACTION, split: bool = True,
              corpus_stats: CorpusStats | None = None):
    """Encode a chat corpus. Returns (train, val, stats), each conversation an (ids int32, mask bool)
    pair of arrays with mask True on the assistant targets; without `split` everything is in train.
    `corpus_stats`, if given, receives the corpus reader's counts."""
    stats = ChatStats(corpus=corpus_stats if corpus_stats is not None else CorpusStats())
    kept: list[tuple[int, np.ndarray, np.ndarray]] = []
    for record in iter_records(specs, stats.corpus):
        if isinstance(record, str):
            stats.text_records += 1
            continue
        stats.conversations += 1
        try:
            ids, mask = encode_chat(tokenizer, record)
        except PakarError as e:
            stats.invalid += 1
            stats.first_invalid = stats.first_invalid or f"conversation {stats.conversations}: {e}"
            continue
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > max_len:
            stats.too_long += 1
            continue
        if not any(mask):
            stats.no_assistant += 1
            continue
        kept.append((conversation_hash(record), np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)))
    stats.used = len(kept)
    if not kept:
        reasons = "; ".join(stats.warnings(max_len)) or "no chat records"
        raise PakarError(f"--data: no usable conversation in {stats.corpus.summary()} ({reasons})")
    if not split:
        return [(i, m) for _, i, m in kept], [], stats
    is_val_K = [is_val(h, val_fraction) for h, _, _ in kept]
    if not any(is_val_K) and len(kept) >= 2:  # always hold out one: the smallest hash
        is_val_K[min(range(len(kept)), key=lambda k: kept[k][0])] = True
    if all(is_val_K):  # a corpus too small to split trains on everything
        is_val_K = [False] * len(kept)
    train = [(i, m) for (_, i, m), v in zip(kept, is_val_K) if not v]
    val = [(i, m) for (_, i, m), v in zip(kept, is_val_K) if v]
    return train, val, stats


def collate(convs, pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows: x (B, T) int64 inputs, y (B, T) int64 next tokens where the mask counts them,
    else -100. T = the longest conversation's length - 1, rounded up to a multiple of PAD_MULTIPLE."""
    T = max(len(ids) for ids, _ in convs) - 1
    T = min(-(-T // PAD_MULTIPLE) * PAD_MULTIPLE, max_len)
    x = np.full((len(convs), T), pad_id, dtype=np.int64)
    y = np.full((len(convs), T), -100, dtype=np.int64)
    for row, (ids, mask) in enumerate(convs):
        n = len(ids) - 1
        x[row, :n] = ids[:-1]
        y[row, :n] = np.where(mask[1:], ids[1:], -100)
    return torch.from_numpy(x), torch.from_numpy(y)


def evaluate_conversations(model, convs, batch_size: int = 8, token_bytes=None, max_tokens: int | None = None,
                           *, device=None, autocast_dtype: torch.dtype | None = None, pad_id: int = 0,
                           max_len: int | None = None) -> dict:
    """Assistant-token loss (nats per target), perplexity and bits per byte of `model` on whole
    conversations ((ids, mask) pairs), one per row as in training; expert loads over the real (not
    padding) input tokens, read from the routers' choices with forward hooks. `max_tokens` stops after
    the conversations (in the given order) whose targets reach it. Under torch.distributed each rank
    takes every world_size-th batch and the sums are all-reduced; every rank runs the same number of
    forward passes (FSDP gathers parameters inside them). Special tokens (0 bytes) are left out of bits
    per byte, as in pakar.evaluate. Returns the keys of pakar.evaluate.evaluate_tokens plus
    "conversations"."""
    rank, world_size, distributed = dist_info(None, None)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    chosen, n_targets = [], 0
    for ids, mask in convs:
        if max_tokens is not None and chosen and n_targets >= max_tokens:
            break
        chosen.append((ids, mask))
        n_targets += int(mask[1:].sum())
    chosen.sort(key=lambda c: len(c[0]))  # similar lengths share a batch: little padding
    batches = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    mine = batches[rank::world_size]
    n_steps = -(-len(batches) // world_size)
    max_len = max_len or max((len(ids) for ids, _ in chosen), default=1)
    cfg = getattr(model, "module", model).config
    sums = EvalSums(device, token_bytes)
    choices: list[torch.Tensor] = []  # each router's (N, K) expert ids of the current forward
    hooks = [moe.gate.register_forward_hook(lambda mod, inp, out: choices.append(out[2]))
             for moe in getattr(model, "module", model).moe_layers()]  # none in a dense model
    try:
        with EvalMode(model, device, autocast_dtype):
            for step in range(n_steps):
                choices.clear()
                if step >= len(mine):  # keep collective forwards in step with the other ranks
                    model(torch.zeros(1, 1, dtype=torch.long, device=device))
                    continue
                x, y = (t.to(device) for t in collate(mine[step], pad_id, max_len))
                logits = model(x).logits
                nll_BT = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                         reduction="none").view(y.shape).double()
                sums.add_targets(nll_BT, y, y != -100)
                # expert loads over the real input tokens only (the routers also see the padding)
                n_B = torch.tensor([len(ids) - 1 for ids, _ in mine[step]], device=device)
                real_N = (torch.arange(x.shape[1], device=device)[None] < n_B[:, None]).flatten()
                sums.add_counts(torch.stack([torch.bincount(idx_NK[real_N].flatten(), minlength=cfg.num_experts)
                                             for idx_NK in choices]) if choices
                                else torch.zeros((0, 0), dtype=torch.int64, device=device))
                sums.windows += len(mine[step])
    finally:
        for h in hooks:
            h.remove()
    return sums.result(model, distributed) | {"conversations": len(chosen)}


def evaluate_chat(model, tokenizer, specs, batch_size: int = 8, max_len: int | None = None, split: str = "all",
                  val_fraction: float = CHAT_VAL_FRACTION, max_tokens: int | None = None, device=None,
                  autocast_dtype=None, stats: CorpusStats | None = None) -> dict:
    """`pakar eval` on chat JSONL: assistant-token loss, perplexity and bits per byte over whole
    conversations. split "all" evaluates every usable conversation, "val" only the held-out slice that
    `pakar finetune --val-fraction F` leaves out of training (the same numbers as its validation).
    Adds the reading stats ("skipped": reason -> count, "warnings")."""
    if split not in ("all", "val"):
        raise PakarError(f"split must be 'all' or 'val', got {split!r}")
    max_len = max_len or model.config.max_position_embeddings
    train, val, chat_stats = load_chat(specs, tokenizer, max_len, val_fraction, split=split == "val",
                                       corpus_stats=stats)
    convs = val if split == "val" else train
    if not convs:
        raise PakarError("no held-out conversation to evaluate: the corpus is too small to split")
    res = evaluate_conversations(model, convs, batch_size, tokenizer.token_byte_lengths(), max_tokens,
                                 device=device, autocast_dtype=autocast_dtype, pad_id=tokenizer.eot_id,
                                 max_len=max_len)
    s = chat_stats
    return res | {"chat": True, "split": split, "warnings": s.warnings(max_len),
                  "skipped": {"invalid": s.invalid, "too_long": s.too_long, "no_assistant": s.no_assistant,
                              "text_records": s.text_records, "bad_json": s.corpus.bad_json,
                              "missing_field": s.corpus.missing_field}}


class ChatData:
    """The training loop's data object for conversations (see the module docstring)."""

    can_sample = False  # the epoch-end sample continues a plain prompt: meaningless for a chat model

    def __init__(self, train, val, batch_size: int, max_len: int, seed: int, pad_id: int, key: str,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        if not train:
            raise PakarError("no training conversations (all were held out or skipped)")
        self.train, self.val = train, val
        self.batch_size, self.max_len, self.seed, self.pad_id = batch_size, max_len, seed, pad_id
        self.rank, self.world_size, self.grad_accum, self.key = rank, world_size, grad_accum, key
        self.lengths = np.array([len(ids) for ids, _ in train])
        self.global_batch = batch_size * world_size * grad_accum  # conversations per optimizer step
        self.steps_per_epoch = -(-len(train) // self.global_batch) * grad_accum  # micro-steps of one rank
        self._plan_epoch, self._plan = -1, None

    def plan(self, epoch: int) -> np.ndarray:
        """(optimizer steps, global batch) conversation indices of epoch `epoch`."""
        if epoch != self._plan_epoch:
            G, steps = self.global_batch, self.steps_per_epoch // self.grad_accum
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            order = np.resize(rng.permutation(len(self.train)), steps * G)  # wrap to fill
            for s in range(0, len(order), G * BUCKET):
                run = order[s:s + G * BUCKET]
                order[s:s + G * BUCKET] = run[np.argsort(self.lengths[run], kind="stable")]
            batches = order.reshape(steps, G)
            self._plan_epoch, self._plan = epoch, batches[rng.permutation(steps)]
        return self._plan

    def get(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `step` of this rank: micro-step step % grad_accum of optimizer step
        step // grad_accum."""
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise IndexError(f"step {step} of epoch {epoch} outside [0, {self.steps_per_epoch}) steps")
        optimizer_step, micro = divmod(step, self.grad_accum)
        start = (micro * self.world_size + self.rank) * self.batch_size
        rows = self.plan(epoch)[optimizer_step][start:start + self.batch_size]
        return collate([self.train[i] for i in rows], self.pad_id, self.max_len)

    def evaluate(self, model, token_bytes=None, device=None, autocast_dtype=None, max_tokens=None, **_) -> dict:
        if not self.val:
            return {"loss": float("nan"), "perplexity": float("nan"), "bits_per_byte": None, "tokens": 0}
        return evaluate_conversations(model, self.val, self.batch_size, token_bytes, max_tokens, device=device,
                                      autocast_dtype=autocast_dtype, pad_id=self.pad_id, max_len=self.max_len)


def chat_data_key(tokenizer, train, val, max_len: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"chat-v1:{tokenizer.sha256()}:{max_len}:{val_fraction}".encode())
    for part, convs in (("train", train), ("val", val)):
        h.update(part.encode())
        for ids, mask in convs:
            h.update(np.int64(len(ids)).tobytes() + ids.tobytes() + np.packbits(mask).tobytes())
    return "chat:" + h.hexdigest()[:16]

