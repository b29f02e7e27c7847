"""Evaluation: loss, perplexity, bits per byte and expert utilisation on a token stream.

`evaluate_tokens` is the one implementation, shared by `pakar eval` and the training loop's
validation. Design choices:

- Windows. The 1-D token array is cut into windows of seq_len+1 tokens with stride seq_len, so every
  token after the first is predicted exactly once, with the context its window gives it (contexts
  restart at each window, as in training). A final partial window is evaluated at its real length
  rather than padded, so nothing is dropped and nothing is counted twice. `max_tokens` caps the
  number of predicted tokens (the first max_tokens+1 tokens of the array are read).
- Streaming. Windows are sliced from the (memory-mapped) array batch by batch; memory is one batch
  of logits whatever the size of the corpus.
- Exact sums. Per-token cross-entropy is computed in float32 from the logits and summed in float64,
  so a long evaluation does not lose precision; loss, perplexity and bits per byte are derived from
  the sums at the end.
- Bits per byte, the headline number, is tokenizer-independent: total nats / (ln 2 x total UTF-8
  bytes of the predicted tokens), with bytes from `Tokenizer.token_byte_lengths()`. Special tokens
  (0 bytes: <|endoftext|> and the chat markers) are left out of both sums, as in nanochat; `loss`
  and `perplexity` count every predicted token.
- Loss mask. An optional array aligned with `tokens` (`loss_mask[j]` True: token j counts as a
  target) restricts every number to the chosen targets, e.g. assistant tokens of chat data.
- Distributed. When torch.distributed is initialised, rank r evaluates its slice of each global
  batch (batch_size x world_size windows, the training loader's convention) and the sums are
  all-reduced, so every rank returns the same numbers. Every rank runs the same number of forward
  passes (a rank without windows in the last step runs a one-token dummy whose results are thrown
  away), because FSDP and DeepSpeed ZeRO-3 gather parameters collectively inside forward.
- The model is put in eval mode and restored to its previous mode afterwards; gradients are off.
- Expert utilisation: tokens routed to each expert in each layer, summed over every evaluated
  input position (the model reports them per forward in `expert_counts`).

`pakar eval` (pakar.commands.evaluate) reads any corpus. Text is tokenized as a stream in the token shards' layout (each
document followed by <|endoftext|>) and evaluated chunk by chunk (`evaluate_corpus`), giving exactly
what evaluate_tokens gives on the whole stream while memory stays one chunk and `--max-tokens` stops
the reading early. Chat JSONL (first record {"messages": ...}) goes to pakar.finetune.evaluate_chat:
whole conversations one per row, as fine-tuning sees them, scored on the assistant tokens. The
window length defaults to the training --seq-len recorded in the checkpoint, since a model evaluated
at longer contexts than it was trained on is measured out of distribution.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pakar import PakarError
from pakar.corpus import iter_documents
from pakar.quant import quantize_int8

LN2 = math.log(2.0)


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size, initialised and world_size > 1


def _eval_plan(n_targets: int, batch_size: int, seq_len: int, rank: int, world_size: int):
    """Per step, this rank's list of (start, length) windows; `length` counts predicted tokens.
    Full windows come in global batches of batch_size x world_size; the partial tail, if any, is a
    step of its own owned by one rank. Every rank gets the same number of steps (some may be empty)."""
    n_full, tail = divmod(n_targets, seq_len)
    per_step = batch_size * world_size
    steps = []
    for g in range(0, n_full, per_step):
        mine = range(g + rank * batch_size, min(g + (rank + 1) * batch_size, n_full))
        steps.append([(w * seq_len, seq_len) for w in mine])
    if tail:
        owner = len(steps) % world_size  # spread the tail's extra work across ranks
        steps.append([(n_full * seq_len, tail)] if rank == owner else [])
    return steps


class EvalSums:
    """Running float64 sums of one evaluation; several token arrays may add to the same sums."""

    # The slots of `sums`: one tensor rather than four, so distributed evaluation reduces them in one
    # all-reduce. NATS: summed negative log-likelihood; TARGETS: counted targets; NATS_BYTES: the
    # nats of the targets that carry bytes (not special tokens); BYTES: their UTF-8 bytes.
    NATS, TARGETS, NATS_BYTES, BYTES = range(4)

    def __init__(self, device: torch.device, token_bytes):
        self.device = device
        self.bytes_V = (None if token_bytes is None else
                        torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64, device=device))
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.windows = 0
        self.counts_LE: torch.Tensor | None = None
        self.t0 = time.perf_counter()

    def add(self, model, tokens, loss_mask, n_targets: int, batch_size: int, seq_len: int,
            rank: int, world_size: int, progress=None) -> None:
        """Evaluate windows over tokens[:n_targets + 1] (this rank's share) into the sums."""
        steps = _eval_plan(n_targets, batch_size, seq_len, rank, world_size)
        dev = self.device
        for i, rows in enumerate(steps):
            if not rows:  # keep collective forwards in step with the other ranks
                model(torch.zeros(1, 1, dtype=torch.long, device=dev))
                continue
            T = rows[0][1]
            win = np.stack([np.asarray(tokens[s:s + T + 1], dtype=np.int64) for s, _ in rows])
            win = torch.from_numpy(win).to(dev, non_blocking=True)
            x_BT, y_BT = win[:, :-1], win[:, 1:]
            out = model(x_BT)
            nll_BT = F.cross_entropy(out.logits.float().flatten(0, 1), y_BT.reshape(-1),
                                     reduction="none").view(y_BT.shape).double()
            keep_BT = None
            if loss_mask is not None:
                keep = np.stack([np.asarray(loss_mask[s + 1:s + T + 1], dtype=bool) for s, _ in rows])
                keep_BT = torch.from_numpy(keep).to(dev)
                nll_BT = nll_BT * keep_BT
            self.add_targets(nll_BT, y_BT, keep_BT)
            self.add_counts(out.expert_counts)
            self.windows += len(rows)
            if progress is not None:
                progress(i + 1, len(steps))

    def add_targets(self, nll_BT: torch.Tensor, y_BT: torch.Tensor, keep_BT: torch.Tensor | None) -> None:
        """Add a batch's per-target losses (float64, zero where not kept); keep_BT None: every target
        counts. Targets of special tokens (0 bytes) are left out of the bits-per-byte sums."""
        self.sums[self.NATS] += nll_BT.sum()
        self.sums[self.TARGETS] += y_BT.numel() if keep_BT is None else keep_BT.sum()
        if self.bytes_V is not None:
            b_BT = self.bytes_V[y_BT] if keep_BT is None else self.bytes_V[y_BT.clamp(min=0)] * keep_BT
            self.sums[self.NATS_BYTES] += (nll_BT * (b_BT > 0)).sum()
            self.sums[self.BYTES] += b_BT.sum()

    def add_counts(self, counts_LE: torch.Tensor) -> None:
        counts_LE = counts_LE.to(torch.int64)
        self.counts_LE = counts_LE if self.counts_LE is None else self.counts_LE + counts_LE

    def result(self, model, distributed: bool) -> dict:
        counts_LE = self.counts_LE
        if counts_LE is None:  # this rank had no windows at all: contribute zeros of the right shape
            cfg = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
            L = 0 if cfg.dense else cfg.num_hidden_layers  # a dense model has no expert counts: (0, 0)
            counts_LE = torch.zeros(L, cfg.num_experts, dtype=torch.int64, device=self.device)
        counts_LE = counts_LE.to(self.device)
        win_t = torch.tensor([self.windows], dtype=torch.int64, device=self.device)
        sums = self.sums.clone()
        if distributed:
            for t in (sums, counts_LE, win_t):
                dist.all_reduce(t)
        s = sums.tolist()
        nats, n_tok, nats_b, n_bytes = s[self.NATS], s[self.TARGETS], s[self.NATS_BYTES], s[self.BYTES]
        loss = nats / n_tok if n_tok else float("nan")
        counts = counts_LE.cpu()
        per_layer = counts.sum(dim=1, keepdim=True).clamp_min(1)
        mean = counts.double().mean(dim=1).clamp_min(1e-12)
        max_L = counts.double().amax(dim=1) if counts.numel() else torch.zeros(counts.shape[0], dtype=torch.float64)
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "bits_per_byte": (nats_b / (LN2 * n_bytes)) if self.bytes_V is not None and n_bytes else None,
            "tokens": int(n_tok),
            "bytes": int(n_bytes),
            "windows": int(win_t.item()),
            "expert_counts": counts.tolist(),
            "expert_fraction": (counts.double() / per_layer).tolist(),
            "expert_max_over_mean": (max_L / mean).tolist(),
            "seconds": time.perf_counter() - self.t0,
        }


class EvalMode:
    """Eval mode, no gradients and optional autocast for the duration; the previous mode restored."""

    def __init__(self, model, device: torch.device, autocast_dtype):
        self.model, self.device, self.dtype = model, device, autocast_dtype

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                         else nullcontext())
        self.autocast.__enter__()

    def __exit__(self, *exc):
        self.autocast.__exit__(*exc)
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def _check_sizes(batch_size: int, seq_len: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PakarError(f"evaluation batch size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise PakarError(f"evaluation sequence length must be an integer >= 1, got {seq_len!r}")


def evaluate_tokens(
    model: torch.nn.Module,
    tokens,  # 1-D array of token ids (numpy memmap uint16/uint32, numpy array, list or tensor)
    batch_size: int,
    seq_len: int,
    token_bytes=None,  # (V,) UTF-8 bytes per token id (Tokenizer.token_byte_lengths()); None: no bpb
    max_tokens: int | None = None,  # predict at most this many tokens (all ranks together)
    *,
    loss_mask=None,  # optional 1-D bool array aligned with tokens: True = this token is a target
    device: torch.device | str | None = None,  # default: the model's device
    autocast_dtype: torch.dtype | None = None,  # e.g. torch.bfloat16; None = run in the weights' dtype
    rank: int | None = None,  # default: torch.distributed's rank when initialised, else 0
    world_size: int | None = None,
    progress=None,  # optional callable(done_steps, total_steps)
) -> dict:
    """Loss (nats/token), perplexity, bits per byte and expert loads of `model` on `tokens`.

    Returns {"loss", "perplexity", "bits_per_byte" (None without token_bytes), "tokens" (targets
    counted), "bytes", "windows", "expert_counts" (L lists of E ints), "expert_fraction" (per layer,
    share of routed assignments per expert), "expert_max_over_mean" (per layer; 1.0 = perfectly
    balanced), "seconds"}. Numbers are identical on every rank.
    """
    _check_sizes(batch_size, seq_len)
    n = len(tokens)
    if loss_mask is not None and len(loss_mask) != n:
        raise PakarError(f"loss_mask has {len(loss_mask)} entries but there are {n} tokens")
    n_targets = max(n - 1, 0)
    if max_tokens is not None:
        n_targets = min(n_targets, max(int(max_tokens), 0))
    if n_targets == 0:
        raise PakarError(f"nothing to evaluate: {n} token(s) (need at least 2) or max_tokens = 0")
    rank, world_size, distributed = dist_info(rank, world_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sums = EvalSums(device, token_bytes)
    with EvalMode(model, device, autocast_dtype):
        sums.add(model, tokens, loss_mask, n_targets, batch_size, seq_len, rank, world_size, progress)
    return sums.result(model, distributed)


# --- pakar eval ---------------------------------------------------------------------------------------

CHUNK_WINDOWS = 64  # windows per streamed chunk: memory is CHUNK_WINDOWS x seq_len tokens of ids


def iter_corpus_tokens(specs, tokenizer, stats=None, docs_per_batch: int = 256):
    """Token ids (int64 numpy) per batch of documents, in the token shards' layout: every document
    followed by <|endoftext|>. Chat records in a text corpus are skipped and counted, as in the shards."""
    eot = tokenizer.eot_id
    pending: list[str] = []

    def flush():
        ids = [t for doc in tokenizer.encode_batch(pending) for t in (*doc, eot)]
        pending.clear()
        return np.asarray(ids, dtype=np.int64)

    for doc in iter_documents(specs, stats):
        pending.append(doc)
        if len(pending) >= docs_per_batch:
            yield flush()
    if pending:
        yield flush()


def evaluate_corpus(model, tokenizer, specs, batch_size: int, seq_len: int, max_tokens: int | None = None,
                    device=None, autocast_dtype=None, stats=None, progress=None) -> dict:
    """evaluate_tokens over a text corpus read and tokenized as a stream: chunks of CHUNK_WINDOWS
    windows are evaluated as soon as they are tokenized, and reading stops once max_tokens are counted.
    The result equals evaluate_tokens on the whole token stream (same windows, same sums)."""
    _check_sizes(batch_size, seq_len)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sums = EvalSums(device, tokenizer.token_byte_lengths())
    chunk = CHUNK_WINDOWS * seq_len  # targets per chunk, a whole number of windows
    budget = float("inf") if max_tokens is None else max(int(max_tokens), 0)
    buf_ids = np.zeros(0, dtype=np.int64)
    done = 0

    def run(n_targets: int) -> None:
        nonlocal done
        sums.add(model, buf_ids, None, n_targets, batch_size, seq_len, 0, 1)
        done += n_targets
        if progress:
            progress(done, sums)

    with EvalMode(model, device, autocast_dtype):
        for ids in iter_corpus_tokens(specs, tokenizer, stats):
            buf_ids = np.concatenate([buf_ids, ids])
            while len(buf_ids) > chunk and done + chunk <= budget:
                run(chunk)
                # the last token of a chunk is the first input of the next (targets never repeat)
                buf_ids = buf_ids[chunk:]
            if len(buf_ids) > budget - done:
                break  # enough tokens read for what is left of --max-tokens
        last = min(len(buf_ids) - 1, budget - done)
        if last > 0:
            run(int(last))
    if done == 0:
        raise PakarError(f"nothing to evaluate in --data {' '.join(map(str, specs))}: fewer than 2 tokens")
    return sums.result(model, distributed=False) | {"chat": False}


def expert_table(res: dict) -> str:
    """Per-layer expert shares (%), the ideal share, and max/mean (1.00 = perfectly balanced)."""
    frac = res["expert_fraction"]
    if not frac or not frac[0]:
        return "expert load: none (a dense model has no experts)"
    E = len(frac[0])
    head = "layer " + "".join(f"{f'e{e}':>6}" for e in range(E)) + "  max/mean"
    lines = [f"expert load (% of routed tokens per layer; balanced = {100 / E:.1f}% each):", head]
    for layer, (row, mom) in enumerate(zip(frac, res["expert_max_over_mean"])):
        lines.append(f"{layer:>5} " + "".join(f"{100 * x:6.1f}" for x in row) + f"  {mom:8.2f}")
    return "\n".join(lines)


def quantized(run, model, quantize: str, stats) -> dict:
    """run(stats) -> results, as they are, or with --quantize int8: float32 first (its corpus stats
    discarded, the text is read twice), then the int8 model, with the bits-per-byte change."""
    if quantize != "int8":
        return run(stats)
    ref = run(type(stats)())
    quantize_int8(model)
    res = run(stats)
    res["quantize"] = "int8"
    res["float32_bits_per_byte"], res["float32_loss"] = ref["bits_per_byte"], ref["loss"]
    if ref["bits_per_byte"]:
        res["bits_per_byte_change"] = res["bits_per_byte"] / ref["bits_per_byte"] - 1
    return res


