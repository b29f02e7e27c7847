"""The sparse Mixture-of-Experts feed-forward: router, dropless token-choice dispatch, SwiGLU experts.

Design (Qwen3-MoE compatible, torchtitan-style dispatch):
- Router (`gate`): logits and softmax in float32, also under autocast (routing decisions must not
  flip with the precision); top-k on the probabilities plus an optional per-expert selection bias
  (DeepSeek-V3's auxiliary-loss-free balancing), which only changes which experts are chosen, never
  the gate values. `norm_topk_prob` renormalises the chosen k probabilities; with top-1 the config
  refuses it, because the gate would always be 1.0 and the router would get no gradient from the
  language-model loss.
- Experts are stacked 3-D tensors in nn.Linear's (out, in) layout, so expert i's `gate_proj` is
  `experts.gate_proj[i]` and export to per-expert Hugging Face names is a slice.
- Dispatch is dropless: the N*K (token, expert) pairs are sorted by expert and run as one grouped
  matmul (`torch._grouped_mm`) over contiguous per-expert row blocks, then put back in token order and
  combined with the gate weights. Activations are cast to the compute dtype *before* the gather, so
  under bfloat16 autocast the N*K-row copies move half the bytes; the scatters back
  (pakar.kernels.scatter_rows) keep only their index for backward. Under autocast, gate and up run as
  one grouped matmul over [gate; up], cast into one tensor in one pass (pakar.kernels.cat_cast).
- On the CPU in bfloat16 each expert's rows are padded to a multiple of a bucket (Experts.row_bucket):
  oneDNN builds a kernel per matmul shape, routing changes every expert's row count at every step,
  and without the padding the expert matmuls ran ~6x slower (benchmarks/bench_model.py).
- Where the grouped matmul cannot run (float32 under torch.compile on CPU, float32 or pre-Hopper
  GPUs, old torch, strides that are not 16-byte multiples: pakar.kernels.grouped_mm_available and
  grouped_mm_aligned) the per-expert loop runs instead; it is also the test oracle. Both paths give
  every expert a gradient (zero when it got no tokens) every step, so data-parallel gradient
  reduction never waits for a missing parameter.
- The grouped path needs no host-device synchronisation: expert offsets come from a searchsorted on
  the sorted expert ids and stay on the device (bincount would read its size back to the host on GPU),
  and the padded buffer has a static size.
- The model keeps no load accumulator: the training loop sums `expert_counts` over micro-steps (and
  ranks) and calls `update_expert_bias` once per optimizer step. `expert_load_stats` turns counts into
  the figures logs and `pakar eval` print.

Shapes: N tokens, M = N*K routed rows, P padded rows, D hidden, E experts, K top-k, I expert hidden
size, J = 2I, L layers.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from pakar.config import ModelConfig
from pakar.kernels import cat_cast, compute_dtype, grouped_mm_aligned, grouped_mm_available, scatter_rows


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)
        # selection-only bias for aux-loss-free balancing; a buffer, changed only by update_expert_bias()
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor):
        with torch.autocast(x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.weight.float())
        probs_NE = logits_NE.softmax(dim=-1)
        # the bias is zero unless balancing is on, and adding zeros leaves the choice unchanged
        idx_NK = torch.topk(probs_NE + self.expert_bias, self.top_k, dim=-1).indices
        weight_NK = probs_NE.gather(-1, idx_NK)
        if self.norm_topk_prob:
            weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
        return logits_NE, probs_NE, idx_NK, weight_NK


class Experts(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.use_grouped_mm = True  # tests switch it off to compare against the loop

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """x_MD: rows sorted by expert, in the compute dtype; counts_E: rows per expert; offsets_E
        (int32): their running sum. Returns (M, D) in x_MD's dtype."""
        # each weight read once: under a parametrization (LoRA on the experts) every read recomputes it
        w_gate, w_up, w_down = self.gate_proj, self.up_proj, self.down_proj
        dtype = x_MD.dtype
        I = w_gate.shape[1]
        native = dtype == w_gate.dtype  # else autocast: fresh (aligned) low-precision copies
        if not (self.use_grouped_mm and grouped_mm_available(x_MD) and (I * x_MD.element_size()) % 16 == 0
                and grouped_mm_aligned(x_MD, *((w_gate, w_up, w_down) if native else ()))):
            return self.forward_loop(x_MD, counts_E, w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype))
        bucket = self.row_bucket(x_MD)
        if bucket > 1:
            x_MD, rows_M, counts_E, offsets_E = self._pad_rows(x_MD, counts_E, offsets_E, bucket)
        # (inline, not a helper method: a separate frame could be compiled on its own after a graph
        # break, past the float32 check above)
        if not native:
            # the cast is a copy anyway: concatenate in the same pass and run one grouped matmul
            w_gate_up_EJD = cat_cast((w_gate, w_up), 1, dtype)  # J = 2I
            h_MJ = torch._grouped_mm(x_MD, w_gate_up_EJD.transpose(-2, -1), offs=offsets_E)
            # split, not two slices: backward concatenates the two gradients in one copy, where
            # slices would each zero-fill an (M, 2I) buffer and add them
            g_MI, u_MI = h_MJ.split([I, I], dim=1)
        else:
            g_MI = torch._grouped_mm(x_MD, w_gate.transpose(-2, -1), offs=offsets_E)
            u_MI = torch._grouped_mm(x_MD, w_up.transpose(-2, -1), offs=offsets_E)
        h_MI = F.silu(g_MI) * u_MI
        y_MD = torch._grouped_mm(h_MI, w_down.to(dtype).transpose(-2, -1), offs=offsets_E)
        return y_MD.index_select(0, rows_M) if bucket > 1 else y_MD

    @staticmethod
    def row_bucket(x_MD: torch.Tensor) -> int:
        """Rows per expert are padded to a multiple of this (1: no padding). On the CPU, bfloat16 (and
        float16) matmuls run through oneDNN, which builds a kernel for every new shape: routing gives
        every expert a new row count at every step, and the expert matmuls then ran at ~120 GFLOP/s
        instead of ~900 (2 cores). Padding to multiples of `bucket` (zero rows) leaves at most
        M / bucket + 1 row counts, whose kernels stay cached; bucket = M / 128 (at least 8) keeps
        that at 129 while wasting on average E * bucket / 2 rows, about 3% at M = 4096 and 8 experts.
        float32 (MKL) and GPUs have no such cost."""
        if x_MD.device.type != "cpu" or x_MD.dtype not in (torch.bfloat16, torch.float16):
            return 1
        return 8 * -(-max(8, -(-x_MD.shape[0] // 128)) // 8)

    @staticmethod
    def _pad_rows(x_MD, counts_E, offsets_E, bucket):
        """Each expert's block padded with zero rows to a multiple of `bucket`. Returns the padded
        rows (a static upper bound of M + E * (bucket - 1) rows, so no host synchronisation; rows past
        the last block stay zero and are skipped by the grouped matmul), the padded position of each
        input row, and the padded counts and offsets."""
        M, E = x_MD.shape[0], counts_E.shape[0]
        padded_E = (counts_E + bucket - 1) // bucket * bucket
        ends_E = padded_E.cumsum(0)
        arange_M = torch.arange(M, device=x_MD.device)
        expert_M = torch.searchsorted(offsets_E.to(torch.int64), arange_M, right=True)
        rows_M = (ends_E - padded_E - (offsets_E - counts_E))[expert_M] + arange_M
        x_PD = scatter_rows(x_MD, rows_M, M + E * (bucket - 1))
        return x_PD, rows_M, padded_E, ends_E.to(torch.int32)

    @staticmethod
    def forward_loop(x_MD, counts_E, w_gate_EID, w_up_EID, w_down_EDI):
        """The plain per-expert loop: the fallback and the test oracle. Every expert runs, even on zero
        rows, so that each weight gets a (zero) gradient. Reads the counts on the host (a GPU sync)."""
        outs = []
        for e, x_e in enumerate(torch.split(x_MD, counts_E.tolist())):
            h = F.silu(x_e @ w_gate_EID[e].T) * (x_e @ w_up_EID[e].T)
            outs.append(h @ w_down_EDI[e].T)
        return torch.cat(outs)


def combine(y_NKD: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
    """The gate-weighted sum over each token's K expert outputs: (N, D)."""
    N, K, D = y_NKD.shape
    return (y_NKD * weight_NK.unsqueeze(-1)).sum(dim=1) if K > 1 else y_NKD.view(N, D) * weight_NK


class MoE(nn.Module):
    """Sparse MoE block. forward(x) -> (y, balance_loss, z_loss); the per-expert token counts of the
    last call are kept in `last_counts` (detached) for logging and bias balancing."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = Experts(config)
        self.last_counts: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor):
        B, T, D = x_BTD.shape
        E, K = self.num_experts, self.top_k
        x_ND = x_BTD.reshape(-1, D)
        logits_NE, probs_NE, idx_NK, weight_NK = self.gate(x_ND)

        # Sort the M = N*K (token, expert) pairs by expert; stable, so rows keep token order within
        # an expert. Row m of the sorted block is token order_M[m] // K, its k-th choice.
        expert_M, order_M = torch.sort(idx_NK.reshape(-1), stable=True)
        offsets_E = torch.searchsorted(expert_M, torch.arange(E, device=x_BTD.device), right=True)
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
        dtype = compute_dtype(x_ND)
        y_MD = self.experts(x_ND.to(dtype)[order_M // K], counts_E, offsets_E.to(torch.int32))

        # back to token order (a scatter with distinct indices: its backward is a plain gather),
        # then the gate-weighted sum over each token's K experts
        y_NKD = scatter_rows(y_MD, order_M, y_MD.shape[0]).view(-1, K, D)
        weight_NK = weight_NK.to(y_NKD.dtype)  # low precision: half the bytes; the residual add is float32
        y_ND = combine(y_NKD, weight_NK)

        # Switch load-balancing loss: E * sum_e f_e * P_e, with f_e the fraction of the N*K assignments
        # that went to expert e and P_e its mean router probability; exactly 1.0 when routing is uniform.
        frac_E = counts_E.float() / expert_M.numel()
        balance_loss = E * (frac_E * probs_NE.mean(dim=0)).sum()
        # ST-MoE router z-loss: mean squared log-partition of the router logits
        z_loss = torch.logsumexp(logits_NE, dim=-1).square().mean()
        self.last_counts = counts_E.detach()
        return y_ND.view(B, T, D).to(x_BTD.dtype), balance_loss, z_loss

    def forward_chosen(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The same output as forward() for a handful of tokens at inference: the chosen experts are
        read back to the host and run as three small matmuls each, instead of the sort-by-expert grouped
        matmul that suits thousands of tokens; no losses, no counts. For CPU decoding, where the read-back
        is free and per-operator overhead dominates (pakar.engine uses it); on a GPU it would be a sync."""
        N, D = x_ND.shape
        _, _, idx_NK, weight_NK = self.gate(x_ND)
        K = idx_NK.shape[1]
        chosen = idx_NK.tolist()
        ex = self.experts
        if hasattr(ex, "swiglu"):  # quantised experts (pakar.quant) bring their own product
            swiglu = ex.swiglu
        else:
            w_gate, w_up, w_down = ex.gate_proj, ex.up_proj, ex.down_proj  # each read once (parametrizations)

            def swiglu(x, e):
                return F.linear(F.silu(F.linear(x, w_gate[e])) * F.linear(x, w_up[e]), w_down[e])

        if N == 1:  # the common interactive case: K experts on one row, no gather or scatter
            y_NKD = torch.stack([swiglu(x_ND, e) for e in chosen[0]], dim=1)
        else:  # rows sorted by expert: one gather in, one matmul chain per chosen expert, one scatter out
            pairs = sorted((e, n * K + k) for n, row in enumerate(chosen) for k, e in enumerate(row))
            order_M = torch.tensor([m for _, m in pairs], device=x_ND.device)
            x_MD = x_ND.index_select(0, order_M // K)
            outs, start = [], 0
            for e, group in itertools.groupby(pairs, key=lambda pair: pair[0]):
                n = len(list(group))
                outs.append(swiglu(x_MD[start:start + n], e))
                start += n
            y_NKD = torch.empty(N * K, D, dtype=x_ND.dtype, device=x_ND.device).index_copy_(
                0, order_M, torch.cat(outs)).view(N, K, D)
        return combine(y_NKD, weight_NK)

    def row_views(self):
        """What decode_row reads, taken once per decoder (pakar.model.RowScratch), so that a step looks
        weights up in a tuple rather than through nn.Module attributes: the router's weight, its
        selection bias (None when all zero: adding zeros leaves the choice unchanged), and each
        expert's three matrices as separate views (no per-step indexing)."""
        ex = self.experts
        return self.router_views() + (ex.gate_proj.unbind(0), ex.up_proj.unbind(0), ex.down_proj.unbind(0))

    def router_views(self):
        """What route_row reads (the first three of row_views)."""
        bias = self.gate.expert_bias
        return self.gate.weight, bias if bool(bias.any()) else None, self.gate.norm_topk_prob

    def decode_row(self, x_D, h_D, r: float, views, probs_E, gate_I):
        """x + forward(RMSNorm(x)) for the one row of a float32 CPU decode step (pakar.model's
        Transformer.decode_row), as 1-D vectors: `h_D` is x times the norm's weight and `r` its 1/rms,
        which the router's and the experts' input products take as `alpha`; the top-k is read back
        (free on a CPU) and each chosen expert is three matrix-vector products, the down-projection
        accumulated into x with the gate weight folded into its alpha. `views`: row_views();
        probs_E, gate_I: work buffers."""
        gate, up, down = views[3:]
        for e, w in self.route_row(h_D, r, views, probs_E):
            a = torch.addmv(gate_I, gate[e], h_D, beta=0, alpha=r, out=gate_I)
            a = F.silu(a, inplace=True).mul_(torch.mv(up[e], h_D))
            x_D = torch.addmv(x_D, down[e], a, alpha=w * r)  # (the up product still lacks its r)
        return x_D

    def route_row(self, h_D, r: float, views, probs_E):
        """decode_row's router, shared with the int8 row step (pakar.quant): [(expert, gate weight)]
        of the chosen experts, from the router's product with h_D times r (float32)."""
        wr, bias, norm_topk_prob = views[:3]
        probs = torch.addmv(probs_E, wr, h_D, beta=0, alpha=r, out=probs_E).softmax(-1)
        if bias is None:
            weights, chosen = torch.topk(probs, self.top_k)
        else:  # the bias only picks the experts; gate values stay the probabilities
            chosen = torch.topk(probs + bias, self.top_k).indices
            weights = probs[chosen]
        weights = weights.tolist()
        if norm_topk_prob:
            weights = [w / sum(weights) for w in weights]
        return zip(chosen.tolist(), weights)


@torch.no_grad()
def update_expert_bias(moes: list[MoE], loads_LE: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing, once per optimizer step: raise the selection bias of
    under-loaded experts and lower it for over-loaded ones by `rate` (sign update), then centre the
    update so the biases keep zero mean. `loads_LE` are token counts summed over the gradient
    accumulation micro-steps (and over ranks, by the caller, in distributed training)."""
    if len(moes) != loads_LE.shape[0]:
        raise ValueError(f"loads_LE has {loads_LE.shape[0]} layers, the model has {len(moes)} MoE layers")
    for moe, load_E in zip(moes, loads_LE):
        load_E = load_E.to(moe.gate.expert_bias.device, torch.float32)
        step_E = torch.sign(load_E.mean() - load_E) * rate
        moe.gate.expert_bias += step_E - step_E.mean()


def expert_load_stats(counts_LE) -> dict:
    """Expert-load figures for logs and reports from per-layer token counts (L, E), e.g. a forward's
    `expert_counts` or their sum over steps:
    - "fraction": per layer, the share of the layer's routed tokens each expert got (L lists of E);
    - "imbalance": per layer, max over mean of the counts (1.0 = perfectly even; E = one expert takes
      everything; 0.0 for a layer that saw no tokens);
    - "imbalance_max" (the worst layer) and "imbalance_mean" (over layers);
    - "idle_experts": per layer, how many experts got no token at all."""
    c = torch.as_tensor(counts_LE).detach().to("cpu", torch.float64)
    if c.dim() != 2:
        raise ValueError(f"counts_LE must be (layers, experts), got shape {tuple(c.shape)}")
    if c.numel() == 0:  # a dense model: no MoE layers (0, 0)
        return {"fraction": [[] for _ in range(c.shape[0])], "imbalance": [0.0] * c.shape[0],
                "imbalance_max": 0.0, "imbalance_mean": 0.0, "idle_experts": [0] * c.shape[0]}
    total_L = c.sum(dim=1, keepdim=True)
    frac_LE = torch.where(total_L > 0, c / total_L.clamp(min=1), torch.zeros_like(c))
    mean_L = c.mean(dim=1)
    imb_L = torch.where(mean_L > 0, c.max(dim=1).values / mean_L.clamp(min=1e-300), torch.zeros_like(mean_L))
    return {
        "fraction": frac_LE.tolist(),
        "imbalance": imb_L.tolist(),
        "imbalance_max": float(imb_L.max()) if imb_L.numel() else 0.0,
        "imbalance_mean": float(imb_L.mean()) if imb_L.numel() else 0.0,
        "idle_experts": (c == 0).sum(dim=1).tolist(),
    }
