"""The sparse Mixture-of-Experts feed-forward: router, dropless token-choice dispatch, SwiGLU experts.

Design (Qwen3-MoE compatible, torchtitan-style dispatch):
- Router (`gate`): logits and softmax in float32; top-k on the probabilities (plus an optional
  per-expert selection bias, DeepSeek-V3's auxiliary-loss-free balancing, which only changes which
  experts are chosen, never the gate values). `norm_topk_prob` renormalises the chosen k probabilities;
  with top-1 it must stay off or the gate would always be 1.0 and the router would get no gradient
  from the language-model loss.
- Experts are stacked 3-D tensors in nn.Linear's (out, in) layout, so expert i's `gate_proj` is
  `experts.gate_proj[i]` and export to per-expert Hugging Face names is a slice.
- Dispatch is dropless: the (token, expert) pairs are sorted by expert and run as one grouped matmul
  (`torch._grouped_mm`) over contiguous per-expert row blocks, then unsorted and combined with the
  gate weights. Where the grouped matmul is not available the per-expert loop runs instead; it is also
  the test oracle. Both paths give every expert a gradient (zero when it got no tokens) every step,
  so data-parallel gradient reduction never waits for a missing parameter.
- The grouped path needs no host-device synchronisation: offsets stay on the device.

Shapes: N tokens, D hidden, E experts, K top-k, I expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pakar.config import ModelConfig


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))  # (E, D)
        # selection-only bias for aux-loss-free balancing; a buffer, updated by update_expert_bias()
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor):
        with torch.autocast(x_ND.device.type, enabled=False):  # routing decisions in float32
            logits_NE = F.linear(x_ND.float(), self.weight.float())
        probs_NE = logits_NE.softmax(dim=-1)
        # the bias is zero unless balancing is on, and adding zeros leaves the choice unchanged
        idx_NK = torch.topk(probs_NE + self.expert_bias, self.top_k, dim=-1).indices
        weight_NK = probs_NE.gather(-1, idx_NK)
        if self.norm_topk_prob:
            weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
        return logits_NE, probs_NE, idx_NK, weight_NK


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """torch._grouped_mm works for float32/bfloat16 on CPU (torch >= 2.8) and bfloat16 on Hopper+ GPUs.
    float32 on CPU fails under torch.compile, so compiled float32 code takes the loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling())
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


class Experts(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.use_grouped_mm = True  # tests switch it off to compare against the loop

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_MD: rows sorted by expert; counts_E: rows per expert. Returns (M, D)."""
        dtype = torch.get_autocast_dtype(x_MD.device.type) if torch.is_autocast_enabled(x_MD.device.type) else x_MD.dtype
        x_MD = x_MD.to(dtype)
        w_gate, w_up, w_down = (w.to(dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        if self.use_grouped_mm and _grouped_mm_ok(x_MD):
            offs = counts_E.cumsum(0, dtype=torch.int32)
            h_MI = F.silu(torch._grouped_mm(x_MD, w_gate.transpose(-2, -1), offs=offs))
            h_MI = h_MI * torch._grouped_mm(x_MD, w_up.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(h_MI, w_down.transpose(-2, -1), offs=offs)
        return self.forward_loop(x_MD, counts_E, w_gate, w_up, w_down)

    @staticmethod
    def forward_loop(x_MD, counts_E, w_gate, w_up, w_down):
        # Every expert runs, even with zero rows, so that each weight gets a (zero) gradient.
        outs = []
        for e, x_e in enumerate(torch.split(x_MD, counts_E.tolist())):
            h = F.silu(x_e @ w_gate[e].T) * (x_e @ w_up[e].T)
            outs.append(h @ w_down[e].T)
        return torch.cat(outs)


class MoE(nn.Module):
    """Sparse MoE block. forward(x) -> (y, balance_loss, z_loss); per-expert token counts of the last
    call are kept in `last_counts` (detached) for logging and bias balancing."""

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

        # sort the N*K (token, expert) pairs by expert; stable so equal experts keep token order
        idx_flat = idx_NK.reshape(-1)
        order = torch.argsort(idx_flat, stable=True)
        counts_E = torch.bincount(idx_flat, minlength=E)
        y_MD = self.experts(x_ND[order // K], counts_E)
        # unsort back to (N, K, D) and combine with the gate weights
        y_NKD = torch.empty_like(y_MD).index_copy_(0, order, y_MD).view(-1, K, D)
        y_ND = (y_NKD * weight_NK.unsqueeze(-1).to(y_NKD.dtype)).sum(dim=1)

        # Switch load-balancing loss: E * sum_e f_e * P_e, with f_e the fraction of the N*K assignments
        # that went to expert e and P_e its mean router probability; exactly 1.0 when routing is uniform.
        frac_E = counts_E.float() / idx_flat.numel()
        balance_loss = E * (frac_E * probs_NE.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits_NE, dim=-1).square().mean()
        self.last_counts = counts_E.detach()
        return y_ND.view(B, T, D).to(x_BTD.dtype), balance_loss, z_loss


@torch.no_grad()
def update_expert_bias(moes: list[MoE], loads_LE: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing, once per optimizer step: raise the selection bias of
    under-loaded experts and lower it for over-loaded ones by `rate` (sign update), then centre the
    update so the biases keep zero mean. `loads_LE` are token counts summed over the gradient
    accumulation micro-steps (and over ranks, by the caller, in distributed training)."""
    for moe, load_E in zip(moes, loads_LE):
        step = torch.sign(load_E.float().mean() - load_E.float()) * rate
        moe.gate.expert_bias += step - step.mean()
