"""Fine-tuning a checkpoint: continued pretraining on domain text, chat SFT on the assistant turns, LoRA.

    pakar finetune --checkpoint run/checkpoints/model_epoch5.pt --data domain.txt --epochs 3
    pakar finetune --checkpoint base.pt --data chat.jsonl [--lora-rank 8 --lora-targets attention experts]

API:
    FinetuneArgs(TrainArgs)                       the training flags plus LoRA and the chat split
    finetune(args, base=None) -> summary dict     run it (pakar.train.train does the work)
    load_chat(specs, tokenizer, max_len, val_fraction) -> (train, val, ChatStats)
    ChatData                                      the loop's data object for conversations
    evaluate_conversations(model, convs, ...) / evaluate_chat(model, tokenizer, specs, ...)
    train_chat(train_args) -> summary             `train.py --init-from X --data chat.jsonl`

Design choices:

- One loop. Everything runs through pakar.train.train() and its extension points, so fine-tuning gets
  the loop's checkpointing, exact resume, validation, logging and data parallelism unchanged: `data`
  (conversations, below), `customize_model` (LoRA), `save_epoch` (adapter files) and `meta`.
- The model and the tokenizer are the checkpoint's; the tokenizer is never retrained (new text is
  tokenized with it, so every id the model knows keeps its meaning).
- The kind of data is detected from its first record (pakar.corpus.detect_kind): plain text is
  continued pretraining, which is exactly pretraining from the checkpoint's weights (token shards
  prepared with its tokenizer in --out); chat JSONL ({"messages": [...]}) is supervised fine-tuning.
- Chat rows: each conversation is rendered with the ChatML template (pakar.tokenizer.encode_chat)
  and is one row of a batch, right-padded. Causal attention never looks right, so no token ever
  attends across conversations or to padding, with no attention mask and the fast causal kernel.
  Targets are -100 everywhere except on each assistant message's content and its <|im_end|>: user
  and system turns, role headers and padding teach nothing. The loop divides the summed loss by the
  number of counted targets of the whole optimizer step, so every assistant token weighs the same.
  (Padding positions still pass through the routers: they count in the MoE balance losses and the
  expert loads, never in the language-model loss.)
- Batches: an epoch shuffles the conversations (numpy PCG64 seeded by (seed, epoch), like the
  pretraining loader), sorts each run of BUCKET global batches by length and cuts it into global
  batches, then shuffles the batch order: rows of a batch have similar lengths, so little compute
  goes to padding, while the order stays random. A global batch is what one optimizer step sees,
  --batch x ranks x --grad-accum conversations: micro-step m of rank r takes its slice m x ranks + r,
  so 2 ranks give the same steps as 1 process with --grad-accum 2 (tests/test_distributed.py). A row
  is padded to a multiple of 8 tokens. The last global batch is completed by wrapping around to the
  start of the epoch's order, so every conversation is seen every epoch. get(epoch, step) is a pure
  function of its arguments (resume).
- Bad records are counted and reported, never fatal one by one: bad JSON and missing fields (the
  corpus reader), unknown roles or empty contents (pakar.tokenizer.validate_messages), conversations
  longer than --seq-len tokens (the context; they are skipped, not cut, since a cut conversation
  teaches answers to questions it lost), conversations without an assistant message, and plain-text
  records in a chat corpus. No usable conversation left is a PakarError listing the reasons.
- Held-out slice: a conversation is validation when pakar.corpus.is_val holds for the doc_hash of
  its canonical JSON (the same rule as text documents), --val-fraction of them (default 5%: chat
  sets are small; text keeps pretraining's 1%); the smallest-hash conversation is always held out,
  so a corpus of two or more has one. Validation loss is per assistant token, on whole
  conversations, exactly as trained.
- Before training (single process, not on --resume) the base model is evaluated on the same held-out
  data, so the log shows the validation loss before and after.
- Learning rate defaults: full fine-tuning a tenth of the preset's pretraining peak (the loop's rule);
  LoRA the pretraining peak itself, since the adapters start at zero and are few (LoRA usually wants
  about ten times the full fine-tuning rate).
- LoRA on chat data also trains the embedding and output rows of <|im_start|> and <|im_end|>
  (pakar.lora token rows, 2 x 2 x hidden_size numbers): a model pretrained on text has never seen
  them, and the adapters alone can neither read nor emit them well (on `small` and id_chat, rank-16
  adapters reach a 0.29 nats lower held-out loss with the rows than without).
- LoRA epoch checkpoints are adapters only (checkpoints/lora_epoch{N}.pt, pakar.lora): the base
  checkpoint is referenced by path and sha256. --merge also writes the merged, self-contained
  checkpoints/model_epoch{N}.pt that chat, eval, export and serve read.
- --out defaults to "finetune" and must not already hold another run's checkpoints (the training loop's
  rule, pakar.train.claim_run_dir: --resume continues it, --overwrite replaces it): fine-tuning into a
  pretraining run directory would overwrite its model_epoch{N}.pt and its state.pt.
- A run stopped by --max-steps (or --time-limit) inside an epoch still ends with a validation ("after")
  and a model: checkpoints/model_step{S}.pt (LoRA: lora_step{S}.pt, and model_step{S}.pt with --merge).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pakar import PakarError
from pakar.corpus import VAL_FRACTION, CorpusStats, detect_kind, doc_hash, is_val, iter_records
from pakar.train import DEFAULT_LR, PRESETS, TrainArgs, add_train_args, args_from_namespace, default_lr

BUCKET = 32  # global batches per length-sorted run
PAD_MULTIPLE = 8
CHAT_VAL_FRACTION = 0.05


# --- arguments ---------------------------------------------------------------------------------------

@dataclass
class FinetuneArgs(TrainArgs):
    out: str = "finetune"
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float | None = None  # None: 2 x rank
    lora_targets: list[str] = field(default_factory=lambda: ["attention"])
    val_fraction: float | None = None  # held-out share; None: 5% of chat conversations, 1% of text documents
    merge: bool = False  # LoRA: also write merged model_epoch{N}.pt

    RESUME_KEYS = TrainArgs.RESUME_KEYS + ("lora_rank", "lora_alpha", "lora_targets", "val_fraction")

    def __post_init__(self):
        super().__post_init__()
        if not self.init_from:
            raise PakarError("fine-tuning needs --checkpoint PATH (the model to start from)")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise PakarError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_rank:
            from pakar.lora import LoraSpec

            if self.lora_alpha is None:
                self.lora_alpha = 2.0 * self.lora_rank
            spec = LoraSpec(self.lora_rank, float(self.lora_alpha), tuple(self.lora_targets))
            self.lora_alpha, self.lora_targets = spec.alpha, list(spec.targets)
        elif self.merge:
            raise PakarError("--merge folds LoRA adapters into the model: it needs --lora-rank R")
        if self.val_fraction is not None and not 0 < self.val_fraction <= 0.5:
            raise PakarError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction}")

    def lora_spec(self):
        from pakar.lora import LoraSpec

        return LoraSpec(self.lora_rank, float(self.lora_alpha), tuple(self.lora_targets)) if self.lora_rank else None


def preset_name(base: dict) -> str:
    """The preset a checkpoint was trained from (for the learning-rate default and the log): its meta's
    config_name, else the preset of the same width and depth, else "default"."""
    name = base.get("meta", {}).get("config_name")
    if name in PRESETS:
        return name
    cfg = base["config"]
    for name, preset in PRESETS.items():
        if (preset.hidden_size, preset.num_hidden_layers) == (cfg.get("hidden_size"), cfg.get("num_hidden_layers")):
            return name
    return "default"


# --- chat data ---------------------------------------------------------------------------------------

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
    from pakar.tokenizer import encode_chat

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
    from pakar.evaluate import EvalMode, EvalSums, dist_info

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
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out: choices.append(out[2]))
             for layer in getattr(model, "module", model).layers]
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
                                             for idx_NK in choices]))
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


# --- running -----------------------------------------------------------------------------------------

def finetune(args: FinetuneArgs, base: dict | None = None, log=print) -> dict:
    """Fine-tune args.init_from on args.data. `base` is that checkpoint already loaded, if the caller
    has it; training takes over its "model" tensors (pakar.train.train's init_ckpt)."""
    from pakar.checkpoint import atomic_save, build_model, model_checkpoint, safe_load
    from pakar.config import ModelConfig
    from pakar.data import file_sha256
    from pakar.distributed import setup
    from pakar.lora import adapter_checkpoint, apply_lora, merge_state, router_buffers, split_state
    from pakar.tokenizer import Tokenizer
    from pakar.train import RunLog, autocast_dtype, claim_run_dir, resolve_device, train

    base = base if base is not None else safe_load(args.init_from)
    cfg = ModelConfig.from_dict(base["config"])
    tokenizer = Tokenizer.from_json(base["tokenizer"])
    base_meta = base.get("meta", {})
    if args.seq_len > cfg.max_position_embeddings:
        raise PakarError(f"--seq-len {args.seq_len} exceeds the checkpoint's context of "
                         f"{cfg.max_position_embeddings} tokens")
    ctx = setup(args)  # the process group (under torchrun): this process's rank, the loop's context
    rank, world_size = ctx.rank, ctx.world_size
    claim_run_dir(args, log, is_main=ctx.is_main)  # the loop's rule: no second run over a first one
    kind = detect_kind(args.data)
    spec = args.lora_spec()
    if spec is not None and kind == "chat" and not cfg.tie_word_embeddings:
        # the ChatML markers are new to a model pretrained on text: train their embedding/output rows too
        spec = dataclasses.replace(spec, token_ids=(tokenizer.im_start_id, tokenizer.im_end_id))
    if spec is not None and args.lr is None:
        args = dataclasses.replace(args, lr=default_lr(args.config, finetune=True, lora=True))
    if args.val_fraction is None:  # explicit, so that the loop's split and the baseline evaluation agree
        args = dataclasses.replace(args, val_fraction=CHAT_VAL_FRACTION if kind == "chat" else VAL_FRACTION)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)

    data = None
    if kind == "chat":
        t0 = time.perf_counter()
        train_convs, val_convs, stats = load_chat(args.data, tokenizer, args.seq_len, args.val_fraction)
        if rank == 0:
            log(f"chat data: {stats.conversations:,} conversations, {stats.used:,} usable -> {len(train_convs):,} "
                f"train, {len(val_convs):,} held out ({args.val_fraction:g} by hash); "
                f"{sum(int(m.sum()) for _, m in train_convs):,} assistant tokens to train on "
                f"({time.perf_counter() - t0:.1f} s)")
            for w in stats.warnings(args.seq_len):
                log(f"warning: {w}")
        data = ChatData(train_convs, val_convs, args.batch, args.seq_len, args.seed, tokenizer.eot_id,
                        chat_data_key(tokenizer, train_convs, val_convs, args.seq_len, args.val_fraction),
                        rank, world_size, args.grad_accum)

    # the base model on the held-out data, for a before/after comparison
    before = None
    if not args.resume and world_size == 1:
        device = resolve_device(args.device)
        amp = autocast_dtype(args.dtype, device)
        model, _ = build_model(base, device)
        if kind == "chat":
            before = data.evaluate(model, tokenizer.token_byte_lengths(), device, amp, args.eval_tokens)
        else:
            from pakar.data import prepare
            from pakar.evaluate import evaluate_tokens

            _, tokens = prepare(args.data, run_dir, val_fraction=args.val_fraction, tokenizer=tokenizer, log=log)
            if len(tokens.val) >= 2:
                before = evaluate_tokens(model, tokens.val, args.batch, args.seq_len, tokenizer.token_byte_lengths(),
                                         args.eval_tokens, device=device, autocast_dtype=amp)
        del model
        if before is not None and before["tokens"]:
            runlog = RunLog(run_dir, True)
            bpb = before.get("bits_per_byte")
            runlog.say(f"validation (base model, before fine-tuning) | loss {before['loss']:.4f} | ppl "
                       f"{before['perplexity']:.2f}" + (f" | bpb {bpb:.4f}" if bpb is not None else "")
                       + f" | {before['tokens']:,} tokens")
            runlog.record(kind="val", step=0, epoch=0, loss=before["loss"], perplexity=before["perplexity"],
                          bits_per_byte=bpb, tokens=before["tokens"], base_model=True)
            runlog.close()

    meta = {"chat": kind == "chat" or bool(base_meta.get("chat", False)),
            "finetune": {"kind": kind, "base": str(Path(args.init_from).resolve()),
                         "lora": spec.to_dict() if spec else None,
                         "val_fraction": args.val_fraction if kind == "chat" else None}}
    customize_model = save_epoch = None
    if spec is not None:
        base_sha = file_sha256(args.init_from)
        logged = []

        def customize_model(model):
            model = apply_lora(model, spec)
            if rank == 0 and not logged:  # the loop may build a second (CPU) copy to sample from
                logged.append(True)
                n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
                n_all = sum(p.numel() for p in model.parameters())
                rows = (f" and the embedding/output rows of {', '.join(tokenizer.decode([i]) for i in spec.token_ids)}"
                        if spec.token_ids else "")
                log(f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on {', '.join(spec.targets)}{rows}: {n_train:,} "
                    f"trainable parameters ({100 * n_train / n_all:.2f}% of {n_all:,}); the base is frozen")
            return model

        def save_epoch(full_state, path_stem: Path, epoch_meta: dict) -> Path:
            base_state, adapters = split_state(full_state)
            path = path_stem.with_name(path_stem.name.replace("model_", "lora_", 1) + ".pt")
            atomic_save(adapter_checkpoint(adapters, router_buffers(base_state), spec, args.init_from, base_sha,
                                           cfg.to_dict(), **epoch_meta), path)
            if args.merge:
                merged = path_stem.with_suffix(".pt")
                state = merge_state(base_state, adapters, spec.scale)  # base_state has the trained router biases
                atomic_save(model_checkpoint(state, cfg, tokenizer.to_json(), **epoch_meta,
                                             merged_lora={"adapter": str(path.resolve()), **spec.to_dict()}), merged)
                log(f"merged the adapters into {merged}")
            return path

    summary = train(args, ctx=ctx, data=data, tokenizer=tokenizer, customize_model=customize_model,
                    save_epoch=save_epoch, meta=meta, init_ckpt=base)
    summary |= {"kind": kind, "lora": spec.to_dict() if spec else None,
                "val_loss_before": before["loss"] if before and before["tokens"] else None,
                "val_bpb_before": before.get("bits_per_byte") if before and before["tokens"] else None}
    # summary["checkpoint"] (the loop's): the last model_/lora_ epoch or step file written by this call
    if spec and args.merge and summary["checkpoint"]:
        name = Path(summary["checkpoint"]).name.replace("lora_", "model_", 1)
        summary["merged_checkpoint"] = str(Path(summary["checkpoint"]).with_name(name))
    return summary


def train_chat(args: TrainArgs) -> dict:
    """`python train.py --init-from CHECKPOINT --data chat.jsonl ...`: chat SFT with the same flags."""
    if not args.init_from:
        raise PakarError("chat data (JSONL with 'messages') fine-tunes a pretrained model: pass --init-from "
                         "CHECKPOINT (or use `pakar finetune --checkpoint CHECKPOINT`); pretrain on plain text first")
    from pakar.checkpoint import safe_load

    base = safe_load(args.init_from)
    ft = FinetuneArgs(**{**dataclasses.asdict(args), "config": preset_name(base)})
    return finetune(ft, base)


# --- pakar finetune ----------------------------------------------------------------------------------

def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, conflict_handler="resolve", description=(
        "Fine-tune a checkpoint: continued pretraining on plain text, or supervised fine-tuning on chat JSONL "
        "(loss on assistant turns only); all weights, or LoRA adapters with --lora-rank."))
    add_train_args(p, FinetuneArgs(init_from="-"))
    # what pretraining chooses and fine-tuning takes from the checkpoint: hidden, refused if given
    for flag in ("--config", "--vocab-size"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", "--init-from", dest="init_from", required=True, metavar="PATH",
                   help="model checkpoint to start from: its weights, architecture and tokenizer")
    p.add_argument("--sample-prompt", default=FinetuneArgs.sample_prompt, help="text data: prompt for the greedy "
                   f"sample at each epoch end (default {FinetuneArgs.sample_prompt!r}; chat data: no sample)")
    p.add_argument("--data", nargs="+", required=True, metavar="SPEC", help="plain text (.txt, .gz, JSONL "
                   "{\"text\"}: continued pretraining) or chat JSONL ({\"messages\": [...]}: supervised "
                   "fine-tuning); files, folders or globs")
    p.add_argument("--out", default="finetune", help="run directory for training.log, checkpoints/ and (text) "
                   "the token cache; must not hold another run (default: finetune)")
    p.add_argument("--seq-len", type=int, default=None, help="text: tokens per training window (default 256); "
                   "chat: the longest conversation kept, in tokens, longer ones are skipped and counted "
                   "(default: the model's context)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: a tenth of the preset's "
                   "pretraining rate, " + ", ".join(f"{k} {v / 10:g}" for k, v in DEFAULT_LR.items())
                   + "; with LoRA the pretraining rate itself)")
    p.add_argument("--val-fraction", type=float, default=None, help="share held out for validation, chosen by "
                   f"content hash (default: {CHAT_VAL_FRACTION:g} of chat conversations, {VAL_FRACTION:g} of text "
                   "documents)")
    p.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters instead of all weights "
                   "(default 0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: updates are scaled by "
                   "alpha/rank (default 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", default=["attention"], help="tensors to adapt: q_proj k_proj v_proj "
                   "o_proj gate_proj up_proj down_proj, or the groups attention, experts (every expert's "
                   "gate/up/down_proj), all (default: attention)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write merged, self-contained "
                   "checkpoints/model_epoch{N}.pt next to the adapters")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object at the end")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from pakar.checkpoint import safe_load

    ns = build_parser(prog).parse_args(argv)
    for flag in ("config", "vocab_size"):
        if getattr(ns, flag) is not None:
            raise PakarError(f"--{flag.replace('_', '-')} does not apply to fine-tuning: the architecture and the "
                             "tokenizer come from --checkpoint")
    del ns.vocab_size  # the tokenizer is the checkpoint's; FinetuneArgs keeps its unused default
    base = safe_load(ns.init_from)
    ns.config = preset_name(base)
    if ns.seq_len is None:
        context = int(base["config"]["max_position_embeddings"])
        ns.seq_len = context if detect_kind(ns.data) == "chat" else min(256, context)
    summary = finetune(args_from_namespace(ns, FinetuneArgs), base)
    if ns.json and int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return 0
