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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pakar import PakarError

LN2 = math.log(2.0)


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    import torch.distributed as dist

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
    if batch_size < 1 or seq_len < 1:
        raise PakarError(f"evaluation needs batch_size >= 1 and seq_len >= 1 (got {batch_size}, {seq_len})")
    n = len(tokens)
    if loss_mask is not None and len(loss_mask) != n:
        raise PakarError(f"loss_mask has {len(loss_mask)} entries but there are {n} tokens")
    n_targets = max(n - 1, 0)
    if max_tokens is not None:
        n_targets = min(n_targets, max(int(max_tokens), 0))
    if n_targets == 0:
        raise PakarError(f"nothing to evaluate: {n} token(s); need at least 2")
    rank, world_size, distributed = _dist_info(rank, world_size)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    bytes_V = None
    if token_bytes is not None:
        bytes_V = torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64, device=device)

    steps = _eval_plan(n_targets, batch_size, seq_len, rank, world_size)
    # float64 sums: [nats, targets, nats over byte-bearing targets, bytes]; windows counted apart
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    windows = 0
    counts_LE = None
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), autocast:
            for i, rows in enumerate(steps):
                if not rows:  # keep collective forwards in step with the other ranks
                    model(torch.zeros(1, 1, dtype=torch.long, device=device))
                    continue
                T = rows[0][1]
                win = np.stack([np.asarray(tokens[s:s + T + 1], dtype=np.int64) for s, _ in rows])
                win = torch.from_numpy(win).to(device, non_blocking=True)
                x_BT, y_BT = win[:, :-1], win[:, 1:]
                out = model(x_BT)
                nll_BT = F.cross_entropy(out.logits.float().flatten(0, 1), y_BT.reshape(-1),
                                         reduction="none").view(y_BT.shape)
                keep_BT = torch.ones_like(y_BT, dtype=torch.bool)
                if loss_mask is not None:
                    m = np.stack([np.asarray(loss_mask[s + 1:s + T + 1], dtype=bool) for s, _ in rows])
                    keep_BT = torch.from_numpy(m).to(device)
                nll64 = nll_BT.double() * keep_BT
                sums[0] += nll64.sum()
                sums[1] += keep_BT.sum()
                if bytes_V is not None:
                    b_BT = bytes_V[y_BT] * keep_BT
                    sums[2] += (nll64 * (b_BT > 0)).sum()
                    sums[3] += b_BT.sum()
                counts = out.expert_counts.to(torch.int64)
                counts_LE = counts if counts_LE is None else counts_LE + counts
                windows += len(rows)
                if progress is not None:
                    progress(i + 1, len(steps))
    finally:
        model.train(was_training)

    if counts_LE is None:  # this rank had no windows at all: contribute zeros of the right shape
        cfg = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
        counts_LE = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.int64, device=device)
    counts_LE = counts_LE.to(device)
    win_t = torch.tensor([windows], dtype=torch.int64, device=device)
    if distributed:
        import torch.distributed as dist

        for t in (sums, counts_LE, win_t):
            dist.all_reduce(t)
    nats, n_tok, nats_b, n_bytes = sums.tolist()
    loss = nats / n_tok if n_tok else float("nan")
    counts = counts_LE.cpu()
    per_layer = counts.sum(dim=1, keepdim=True).clamp_min(1)
    frac = (counts.double() / per_layer).tolist()
    mean = counts.double().mean(dim=1).clamp_min(1e-12)
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": (nats_b / (LN2 * n_bytes)) if bytes_V is not None and n_bytes else None,
        "tokens": int(n_tok),
        "bytes": int(n_bytes),
        "windows": int(win_t.item()),
        "expert_counts": counts.tolist(),
        "expert_fraction": frac,
        "expert_max_over_mean": (counts.double().max(dim=1).values / mean).tolist(),
        "seconds": time.perf_counter() - t0,
    }
