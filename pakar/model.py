"""The decoder-only MoE transformer, architecturally identical to Hugging Face's Qwen3-MoE.

embed_tokens -> num_hidden_layers x [x + attn(RMSNorm(x)); x + moe(RMSNorm(x))] -> norm -> lm_head

- Attention: grouped-query attention with Qwen3's per-head RMSNorm on queries and keys (before the
  rotary embedding), rotary embeddings in the rotate-half layout, causal scaled-dot-product attention.
- The feed-forward is the sparse MoE block in pakar/moe.py.
- Parameter names are Qwen3-MoE's minus the leading "model." (pakar/hf.py adds it), so export is a rename.
  In float32 the logits equal transformers' Qwen3MoeForCausalLM to ~1e-7 (tests/test_model.py).
- Single-device code: no torch.distributed, no tokenizer. Parallelism wraps this module from outside.
- Generation-ready: forward() takes an optional KVCache, per-row position ids and a key-padding mask
  (left-padded batches), and can compute logits for the last position only.
- Training-ready: with targets and return_logits=False the head and the cross-entropy run fused,
  chunk by chunk (LinearCrossEntropy), so the (tokens x vocabulary) logits are never stored.
- Mixed precision is torch.autocast with float32 weights. The router, softmaxes, the norms'
  statistics, the loss and the residual stream stay float32. On a CPU, where elementwise passes cost
  as much as bfloat16 matmuls, two choices here make bfloat16 pay (measured in
  benchmarks/bench_model.py): the fused head never converts full-size logits to float32, and RMSNorm
  keeps bfloat16 inputs in bfloat16 with a backward that saves only its input (on the CPU, F.rms_norm's
  autograd saves three float32 copies). The attention input is cast once, not once per projection.
  The experts' share is in pakar/moe.py.

Shape legend: B batch, T new tokens, S cached+new tokens, D hidden, H query heads, G key/value heads,
K head_dim, V vocabulary, L layers, E experts, N tokens in a batch (B x T), C rows in a chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pakar import PakarError
from pakar.config import ModelConfig
from pakar.moe import MoE, compute_dtype


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm for the CPU: one fused forward kernel, and a backward that keeps only the input and the
    per-row 1/rms. (On the CPU, autograd runs F.rms_norm as pow, mean, rsqrt and two multiplies, each
    saving a float32 copy: three activation-sized tensors per norm, upcast even for bfloat16 inputs.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = grad_y.float()
        grad_w = (g * xhat).sum(dim=tuple(range(g.dim() - 1)))
        g = g * weight.float()
        grad_x = rstd * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


_HAS_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalises in float32 whatever the input dtype (as the reference does) and returns the
        # input's dtype: under autocast a bfloat16 input (q_norm, k_norm) stays bfloat16 instead of
        # being promoted to float32 by a float32 weight.
        weight = self.weight.to(x.dtype)
        if x.device.type == "cpu" and _HAS_FUSED_RMS_NORM and torch.is_grad_enabled() \
                and (x.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling():
            return _RMSNormFunction.apply(x, weight, self.eps)
        # fused kernels: CUDA's forward and backward, CPU inference; under torch.compile the
        # compiler fuses the decomposition itself and chooses what to save
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x_BHTK * cos.to(x_BHTK.dtype) + rotate_half(x_BHTK) * sin.to(x_BHTK.dtype)


class KVCache:
    """Preallocated keys and values for all layers; `pos` tokens are filled (the same for every row:
    batches of different prompt lengths are left-padded and masked)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor):
        end = self.pos + k_BGTK.shape[2]
        self.k[layer, :, :, self.pos:end] = k_BGTK
        self.v[layer, :, :, self.pos:end] = v_BGTK
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D, HK, GK = config.hidden_size, self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(D, HK, bias=False)
        self.k_proj = nn.Linear(D, GK, bias=False)
        self.v_proj = nn.Linear(D, GK, bias=False)
        self.o_proj = nn.Linear(HK, D, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x_BTD, cos, sin, kv_cache: KVCache | None, mask, is_causal: bool):
        B, T, _ = x_BTD.shape
        H, G, K = self.n_head, self.n_kv, self.head_dim
        x_BTD = x_BTD.to(compute_dtype(x_BTD))  # autocast would cast (and keep) one copy per projection
        q = self.q_norm(self.q_proj(x_BTD).view(B, T, H, K)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x_BTD).view(B, T, G, K)).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, G, K).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, K), (B, G, T, K)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k.to(kv_cache.k.dtype), v.to(kv_cache.v.dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config)

    def forward(self, x_BTD, cos, sin, kv_cache=None, mask=None, is_causal=True):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, kv_cache, mask, is_causal)
        h_BTD, balance_loss, z_loss = self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD + h_BTD, balance_loss, z_loss


class LinearCrossEntropy(torch.autograd.Function):
    """lm_head and cross-entropy in one, chunk by chunk, never holding the (N, V) logits.

    The forward pass computes each chunk's logits, their float32 log-softmax and loss, and at once
    the chunk's gradient (softmax - one-hot) pushed through the matmul to the hidden states and the
    head weight, so the backward pass is two scalings. The FLOPs are those of lm_head +
    cross_entropy + backward; what is saved is memory traffic: the unfused head writes, converts,
    zero-fills and re-reads float32 (N, V) tensors, which with a small model and an 8192-token
    vocabulary costs more than all the matmuls of the head. The chunk buffers are allocated once and
    reused (a fresh multi-MB tensor per chunk costs page faults and cache misses on a CPU), and in
    low precision the head-weight gradient is accumulated in float32 once per block of chunks (each
    accumulation reads and writes all of V x D). Gradients are only computed when needed. Rows whose
    target is -100 are ignored. Returns the summed loss and the number of counted rows.
    """

    BLOCK_ELEMENTS = 8 << 20  # low precision: gradient rows (x V) gathered before each accumulation

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, chunk: int):
        """h_ND in the compute dtype; weight_VD as stored (cast here, so that its gradient leaves in
        float32 straight from the float32 accumulator, without a round trip through bfloat16)."""
        (N, D), V = h_ND.shape, weight_VD.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w_VD = weight_VD.to(h_ND.dtype)
        low = h_ND.dtype != torch.float32  # matmuls in the compute dtype, the softmax in float32
        valid_N = targets_N != -100
        safe_N = torch.where(valid_N, targets_N, 0)
        C = max(1, min(chunk, N))
        rows_C = torch.arange(C, device=h_ND.device)
        logits_CV = h_ND.new_empty(C, V)
        logits32_CV = torch.empty(C, V, dtype=torch.float32, device=h_ND.device) if low else logits_CV
        logp_CV = torch.empty(C, V, dtype=torch.float32, device=h_ND.device)
        nll_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        if need_grad:
            grad_h_ND = torch.empty_like(h_ND)
            grad_w_VD = torch.zeros(V, D, dtype=torch.float32, device=w_VD.device)
            if low:  # gradient rows of up to `per_block` chunks, then one matmul and one accumulation
                per_block = max(1, LinearCrossEntropy.BLOCK_ELEMENTS // (C * V))
                g_FV = h_ND.new_empty(min(per_block * C, N), V)
                grad_w_low_VD = h_ND.new_empty(V, D)
        block_start = 0
        for s in range(0, N, C):
            c = min(C, N - s)
            h_cD, t_c, v_c, r_c = h_ND[s:s + c], safe_N[s:s + c], valid_N[s:s + c], rows_C[:c]
            torch.mm(h_cD, w_VD.T, out=logits_CV[:c])
            if low:
                logits32_CV[:c].copy_(logits_CV[:c])
            logp_cV = torch.log_softmax(logits32_CV[:c], dim=-1, out=logp_CV[:c])
            nll_N[s:s + c] = -logp_cV[r_c, t_c]
            if not need_grad:
                continue
            p_cV = logp_cV.exp_()  # softmax, in place
            p_cV[r_c, t_c] -= 1.0
            p_cV.mul_(v_c.unsqueeze(1))  # ignored rows: no gradient
            if not low:
                torch.mm(p_cV, w_VD, out=grad_h_ND[s:s + c])
                grad_w_VD.addmm_(p_cV.T, h_cD)
                continue
            g_cV = g_FV[s - block_start:s - block_start + c]
            g_cV.copy_(p_cV)
            torch.mm(g_cV, w_VD, out=grad_h_ND[s:s + c])
            if s + c - block_start == g_FV.shape[0] or s + c == N:  # block full, or the last chunk
                torch.mm(g_FV[:s + c - block_start].T, h_ND[block_start:s + c], out=grad_w_low_VD)
                grad_w_VD += grad_w_low_VD
                block_start = s + c
        if need_grad:
            ctx.save_for_backward(grad_h_ND, grad_w_VD)
        ctx.w_dtype = weight_VD.dtype
        return torch.where(valid_N, nll_N, 0.0).sum(), valid_N.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_count):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        return (grad_h_ND * grad_loss.to(grad_h_ND.dtype), (grad_w_VD * grad_loss).to(ctx.w_dtype), None, None)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V), or (B, 1, V) with last_only; None with return_logits=False
    loss: torch.Tensor | None  # cross-entropy over targets != -100 ("mean" or "sum" per loss_reduction)
    aux_loss: torch.Tensor  # coefficient-weighted load-balancing + z-loss, averaged over layers: add it to loss
    balance_loss: torch.Tensor  # unweighted Switch loss, mean over layers (1.0 = perfectly uniform)
    z_loss: torch.Tensor  # unweighted router z-loss, mean over layers
    expert_counts: torch.Tensor  # (L, E) tokens routed to each expert in this call (detached)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False  # recompute each block in backward to save memory
        self.loss_chunk_rows: int | None = None  # rows per chunk of the fused head; None: automatic
        cos, sin = self._rope_tables(config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def finish_meta_build(self, device) -> None:
        """For a model built on the meta device and then given its weights (to_empty + load_state_dict,
        or load_state_dict(assign=True)): what no state dict carries, on `device`: the head tied to the
        embedding, and the rotary tables (non-persistent float32 buffers)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope_cos, self.rope_sin = (t.to(device) for t in self._rope_tables(self.config.max_position_embeddings))

    def _rope_tables(self, n: int):
        K = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, K, 2, dtype=torch.int64).float() / K))
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: (n, K)
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The whole initialisation scheme, in one place:
        - embeddings, attention projections, router and expert input projections (gate/up):
          normal(0, initializer_range)
        - residual-branch outputs (attention o_proj, expert down_proj): normal(0, initializer_range /
          sqrt(2 * num_hidden_layers)), GPT-2 style, so the residual stream's variance does not grow
          with depth
        - lm_head (when untied): normal(0, initializer_range)
        - every RMSNorm weight: 1; expert selection biases: 0
        """
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj")):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)
        for layer in self.layers:
            layer.mlp.gate.expert_bias.zero_()

    def _auto_chunk_rows(self, x: torch.Tensor) -> int:
        # CPU: 2M logits (8 MiB in float32) per chunk stay in cache and were fastest in
        # benchmarks/bench_model.py (larger chunks lose more to memory traffic than they gain in
        # matmul efficiency); GPU: 32M, fewer and larger matmuls.
        elements = (2 << 20) if x.device.type == "cpu" else (32 << 20)
        return max(16, elements // self.config.vocab_size)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        targets: torch.Tensor | None = None,  # (B, T) int64, -100 = ignore
        *,
        kv_cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,  # (B, T); default: continue from kv_cache.pos
        attention_mask: torch.Tensor | None = None,  # (B, S) bool, False = padding key
        last_only: bool = False,  # logits for the last position only (generation)
        loss_reduction: str = "mean",  # "mean" or "sum" over the counted targets
        return_logits: bool = True,  # False (with targets): fused chunked head + loss, logits=None
    ) -> ModelOutput:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        B, T = input_ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        S = start + T
        if S > self.config.max_position_embeddings:
            raise PakarError(f"a sequence of {S} tokens exceeds the model's context "
                             f"(max_position_embeddings = {self.config.max_position_embeddings})")
        if position_ids is None:
            cos, sin = self.rope_cos[start:S][None, None], self.rope_sin[start:S][None, None]
        else:
            cos, sin = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]

        # The fast causal kernel covers plain training and the first prefill; otherwise an explicit
        # (B|1, 1, T, S) mask: query i sits at absolute position start+i. Every query may always see
        # itself, so a padding row never becomes all -inf (which would put NaNs into the values).
        mask, is_causal = None, T > 1 and start == 0 and attention_mask is None
        if attention_mask is not None or (start > 0 and T > 1):
            q_pos = torch.arange(start, S, device=input_ids.device)[:, None]
            k_pos = torch.arange(S, device=input_ids.device)[None, :]
            mask = (k_pos <= q_pos)[None, None]
            if attention_mask is not None:
                mask = (mask & attention_mask[:, None, None, :].bool()) | (k_pos == q_pos)

        x = self.embed_tokens(input_ids)
        cos, sin = cos.to(compute_dtype(x)), sin.to(compute_dtype(x))  # once, not in every layer
        balance, zl = [], []
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, b, z = checkpoint(layer, x, cos, sin, kv_cache, mask, is_causal, use_reentrant=False)
            else:
                x, b, z = layer(x, cos, sin, kv_cache, mask, is_causal)
            balance.append(b)
            zl.append(z)
        if kv_cache is not None:
            kv_cache.pos = S
        x = self.norm(x[:, -1:] if last_only else x)

        logits, loss = None, None
        if targets is not None and not return_logits:
            dtype = compute_dtype(x)
            with torch.autocast(x.device.type, enabled=False):
                loss_sum, n = LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]).to(dtype),
                                                       self.lm_head.weight, targets.reshape(-1),
                                                       self.loss_chunk_rows or self._auto_chunk_rows(x))
            loss = loss_sum / n if loss_reduction == "mean" else loss_sum
        else:
            logits = self.lm_head(x)
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100, reduction=loss_reduction)
        balance_loss, z_loss = torch.stack(balance).mean(), torch.stack(zl).mean()
        aux_loss = self.config.router_aux_loss_coef * balance_loss + self.config.router_z_loss_coef * z_loss
        counts = torch.stack([layer.mlp.last_counts for layer in self.layers])
        return ModelOutput(logits, loss, aux_loss, balance_loss, z_loss, counts)
