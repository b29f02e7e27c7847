"""The decoder-only MoE transformer, architecturally identical to Hugging Face's Qwen3-MoE.

embed_tokens -> num_hidden_layers x [x + attn(RMSNorm(x)); x + moe(RMSNorm(x))] -> norm -> lm_head

With num_experts = 0 (the `*-dense` presets) each `moe` is a plain SwiGLU MLP instead, and the model
is Hugging Face's dense Qwen3 (Qwen3ForCausalLM: the same attention and names); the dense baseline
for the MoE, sharing every other line of code.

- Attention: grouped-query attention with Qwen3's per-head RMSNorm on queries and keys (before the
  rotary embedding), rotary embeddings in the rotate-half layout, causal scaled-dot-product attention.
- The feed-forward is the sparse MoE block in pakar/moe.py, or the dense MLP below.
- Parameter names are Qwen3-MoE's minus the leading "model." (pakar/hf.py adds it), so export is a rename.
  In float32 the logits equal transformers' Qwen3MoeForCausalLM to ~1e-7 (tests/test_model.py).
- Single-device code: no torch.distributed, no tokenizer. Parallelism wraps this module from outside.
- Generation-ready: forward() takes an optional KVCache, per-row position ids and a key-padding mask
  (left-padded batches), and can compute logits for the last position only.
- CPU decode steps, beside the forward they shortcut (pakar.engine picks one per step and says why):
  `decode_step` is forward for one new token per row minus the losses and counts, with
  MoE.forward_chosen's per-chosen-expert products (modules called as modules, so LoRA wrappers and
  int8 modules run as they are); `decode_row` is the one-row float32 step as 1-D vectors and BLAS
  matrix-vector products, written by each module next to its forward (Attention.decode_row,
  MoE.decode_row, Block.decode_row) over the buffers of a RowScratch. tests/test_engine.py holds
  both to forward's logits and cache.
- Training-ready: with targets and return_logits=False the head and the cross-entropy run fused,
  chunk by chunk (pakar.kernels.linear_cross_entropy), so the (tokens x vocabulary) logits are never
  stored.
- Mixed precision is torch.autocast with float32 weights. The router, softmaxes, the norms'
  statistics, the loss and the residual stream stay float32. The attention input is cast once, not
  once per projection. How the norms and the fused head make bfloat16 pay on a CPU is in
  pakar/kernels.py (with the other custom autograd functions); the experts' share is in pakar/moe.py.

Shape legend: B batch, T new tokens, S cached+new tokens, D hidden, H query heads, G key/value heads,
K head_dim, V vocabulary, L layers, E experts.
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
from pakar.kernels import compute_dtype, linear_cross_entropy, rms_norm
from pakar.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalises in float32 whatever the input dtype (as the reference does) and returns the
        # input's dtype: under autocast a bfloat16 input (q_norm, k_norm) stays bfloat16 instead of
        # being promoted to float32 by a float32 weight.
        return rms_norm(x, self.weight.to(x.dtype), self.eps)


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

    def row_views(self):
        """The weights decode_row reads, taken once per decoder (RowScratch): a step looks them up in a
        tuple, not through nn.Module attributes, whose lookups cost as much as a small torch call."""
        return (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.q_norm.weight,
                self.k_norm.weight, self.o_proj.weight)

    def decode_row(self, x_D, h_D, r: float, s: "RowScratch", l: int, views):
        """x + forward(RMSNorm(x)) for the one row of a float32 CPU decode step, as 1-D vectors (see
        Transformer.decode_row). `h_D` is x times the input norm's weight and `r` that norm's 1/rms,
        which the projections take as their `alpha`; q and k are projected into one buffer, their
        per-head norms computed together and rotated by one (K x K) product (the norm's per-head scale
        commutes with the rotation); the new key and value go to this step's cache column of layer
        `l`, and attention runs over the row's own columns as two small batched products, no mask.
        `views`: row_views()."""
        wq, wk, wv, qn, kn, wo = views
        torch.addmv(s.q, wq, h_D, beta=0, alpha=r, out=s.q)
        torch.addmv(s.k, wk, h_D, beta=0, alpha=r, out=s.k)
        torch.addmv(s.v, wv, h_D, beta=0, alpha=r, out=s.v)
        return torch.addmv(x_D, wo, self.attend_row(s, l, qn, kn))

    @staticmethod
    def attend_row(s: "RowScratch", l: int, qn, kn) -> torch.Tensor:
        """The part of decode_row between the projections, shared with the int8 row step
        (pakar.quant): the per-head norms (weights qn, kn) and rotary embedding of the new q and k in
        s.q and s.k, the new key and value (s.v) into layer l's cache column, attention over the
        row's columns; returns the heads' outputs, s.att (H*K)."""
        r_X1 = torch.add(s.eps_X1, (s.qk_XK * s.qk_XK).sum(-1, keepdim=True), alpha=s.inv_K).rsqrt_()
        s.q_HK.mul_(qn)
        s.k_GK.mul_(kn)
        torch.mm(s.qk_XK, s.rope_KK, out=s.rot_XK).mul_(r_X1)
        s.new_keys[l].copy_(s.k_rot_GK)
        s.new_values[l].copy_(s.v_GK)
        scores = torch.baddbmm(s.zero, s.q_GJK, s.keys_T[l], beta=0, alpha=s.scale)
        torch.bmm(scores.softmax(-1), s.values[l], out=s.att_GJK)
        return s.att


class MLP(nn.Module):
    """Qwen3's dense feed-forward, down(silu(gate(x)) * up(x)), of width I = config.intermediate_size:
    the dense baseline's layer (one expert that every token goes through, without a router)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x_BTD: torch.Tensor):
        """MoE.forward's contract: (output in the input's dtype, balance loss, z-loss); no router, so
        both losses are zero."""
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        return self.forward_chosen(x_BTD).to(x_BTD.dtype), zero, zero

    def forward_chosen(self, x_ND: torch.Tensor) -> torch.Tensor:
        """MoE.forward_chosen's contract (the decode step's feed-forward): every token takes the MLP."""
        x_ND = x_ND.to(compute_dtype(x_ND))  # cast once for both input projections (as the experts do)
        return self.down_proj(F.silu(self.gate_proj(x_ND)) * self.up_proj(x_ND))

    def row_views(self):
        """What decode_row reads (see MoE.row_views)."""
        return self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight

    def decode_row(self, x_D, h_D, r: float, views, probs_E, gate_I):
        """x + forward(RMSNorm(x)) for one float32 decode row (see MoE.decode_row, whose signature it
        shares: `probs_E` is unused)."""
        gate, up, down = views
        a = torch.addmv(gate_I, gate, h_D, beta=0, alpha=r, out=gate_I)
        a = F.silu(a, inplace=True).mul_(torch.mv(up, h_D))
        return torch.addmv(x_D, down, a, alpha=r)  # (the up product still lacks its r)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config) if config.dense else MoE(config)

    def forward(self, x_BTD, cos, sin, kv_cache=None, mask=None, is_causal=True):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, kv_cache, mask, is_causal)
        h_BTD, balance_loss, z_loss = self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD + h_BTD, balance_loss, z_loss

    def decode(self, x_B1D, cos, sin, kv_cache: KVCache, mask):
        """forward() for one new token per row at inference: the same attention, the feed-forward's
        forward_chosen (an MoE's in place of its sort-based dispatch), no losses or counts (see
        Transformer.decode_step)."""
        B, _, D = x_B1D.shape
        x_B1D = x_B1D + self.self_attn(self.input_layernorm(x_B1D), cos, sin, kv_cache, mask, False)
        h_BD = self.post_attention_layernorm(x_B1D).view(B, D)
        y_BD = self.mlp.forward_chosen(h_BD)
        return x_B1D + y_BD.view(B, 1, D).to(x_B1D.dtype)

    def row_views(self):
        """What decode_row reads, taken once per decoder (RowScratch): the norms' weights, and the
        attention's and the feed-forward's (MoE or MLP) row steps with their own row_views (an int8
        model's decoder puts pakar.quant's steps and views in their place)."""
        return (self.input_layernorm.weight, self.self_attn.decode_row, self.self_attn.row_views(),
                self.post_attention_layernorm.weight, self.mlp.decode_row, self.mlp.row_views())

    def decode_row(self, x_D, s: "RowScratch", l: int):
        """forward() for the one row of a float32 CPU decode step (see Transformer.decode_row): each
        RMSNorm as the product of x with its weight and a scalar 1/rms that the next products take."""
        ln1, attn_row, attn_views, ln2, ffn_row, ffn_views = s.layers[l]
        x_D = attn_row(x_D, x_D * ln1, s.inv_rms(x_D), s, l, attn_views)
        return ffn_row(x_D, x_D * ln2, s.inv_rms(x_D), ffn_views, s.probs_E, s.gate_I)


class RowScratch:
    """What Transformer.decode_row reuses from step to step: work buffers and views of them, views of
    the weights (each module's `row_views`, e.g. each expert's matrices unbound once and whether a
    layer has a non-zero selection bias, read once), the rotary embedding as (K x K) matrices, and per
    step the cache's per-layer views. Views, not copies, so in-place weight updates (an optimizer step, a LoRA merge)
    are seen. One per model, used from one thread (pakar.engine.RowDecoder holds it). `layers` and
    `head` replace the float32 steps and views (pakar.quant's int8 row step passes its own): per
    layer what Block.row_views returns, and head(h_D, r) -> logits (1, V) of the final-normed row
    h_D / r."""

    def __init__(self, model: "Transformer", layers=None, head=None):
        cfg = model.config
        H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        HK, GK, half = H * K, G * K, K // 2
        self.D, self.eps, self.scale, self.inv_K = cfg.hidden_size, cfg.rms_norm_eps, 1.0 / math.sqrt(K), 1.0 / K
        self.embed, self.final_norm = model.embed_tokens.weight, model.norm.weight
        self.cos, self.sin = model.rope_cos, model.rope_sin
        # y @ (diag(cos) + swap * sin) = y * cos + rotate_half(y) * sin
        i = torch.arange(half)
        self.swap = torch.zeros(K, K)
        self.swap[i + half, i], self.swap[i, i + half] = -1.0, 1.0
        self.eye = torch.eye(K)
        self.qkv = qkv = torch.empty(HK + 2 * GK)
        self.q, self.k, self.v = qkv[:HK], qkv[HK:HK + GK], qkv[HK + GK:]
        self.qk_XK = qkv[:HK + GK].view(H + G, K)  # X = H + G heads
        self.q_HK, self.k_GK, self.v_GK = self.qk_XK[:H], self.qk_XK[H:], self.v.view(G, K)
        self.rot_XK = torch.empty(H + G, K)  # q and k after the rotary embedding
        self.q_GJK, self.k_rot_GK = self.rot_XK[:H].view(G, H // G, K), self.rot_XK[H:]  # J = H / G
        self.att_GJK = torch.empty(G, H // G, K)
        self.att = self.att_GJK.view(HK)
        self.eps_X1 = torch.full((H + G, 1), cfg.rms_norm_eps)
        self.zero = torch.zeros(1, 1, 1)  # baddbmm's ignored input
        self.probs_E = torch.empty(cfg.num_experts)
        self.gate_I = torch.empty(cfg.intermediate_size if cfg.dense else cfg.moe_intermediate_size)
        self.layers = layers if layers is not None else [layer.row_views() for layer in model.layers]
        if head is None:
            w_VD = model.lm_head.weight

            def head(h_D, r):
                return torch.mv(w_VD, h_D).mul_(r).view(1, -1)
        self.head = head
        self.rope_KK = self.new_keys = self.new_values = self.keys_T = self.values = None  # set per step

    def begin(self, cache: KVCache, n: int) -> None:
        """Views for a step that feeds the n-th token of the cache's only row into column cache.pos."""
        S = cache.pos
        self.rope_KK = torch.addcmul(self.eye * self.cos[n - 1], self.swap, self.sin[n - 1])
        self.new_keys, self.new_values = cache.k[:, 0, :, S].unbind(0), cache.v[:, 0, :, S].unbind(0)  # (G, K)
        self.keys_T = cache.k[:, 0, :, S + 1 - n:S + 1].transpose(-1, -2).unbind(0)  # (G, K, n) each
        self.values = cache.v[:, 0, :, S + 1 - n:S + 1].unbind(0)  # (G, n, K) each

    def inv_rms(self, x_D) -> float:
        """1 / rms(x) of the residual stream, as an RMSNorm's scalar: one dot product, the root in Python."""
        return (torch.dot(x_D, x_D).item() / self.D + self.eps) ** -0.5


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V), or (B, 1, V) with last_only; None with return_logits=False
    loss: torch.Tensor | None  # cross-entropy over targets != -100 ("mean" or "sum" per loss_reduction)
    aux_loss: torch.Tensor  # coefficient-weighted load-balancing + z-loss, averaged over layers: add it to loss
    balance_loss: torch.Tensor  # unweighted Switch loss, mean over layers (1.0 = perfectly uniform; 0 dense)
    z_loss: torch.Tensor  # unweighted router z-loss, mean over layers (0 dense)
    expert_counts: torch.Tensor  # (L, E) tokens routed to each expert in this call (detached); (0, 0) dense


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
        - embeddings, attention projections, router and expert (or dense MLP) input projections
          (gate/up): normal(0, initializer_range)
        - residual-branch outputs (attention o_proj, expert or MLP down_proj): normal(0, initializer_range /
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
            elif name.endswith(("o_proj.weight", "down_proj", "down_proj.weight")):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)
        for moe in self.moe_layers():
            moe.gate.expert_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        """The MoE blocks, one per layer; none in a dense model."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

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
            loss_sum, n = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight,
                                               targets.reshape(-1), self.loss_chunk_rows)
            loss = loss_sum / n if loss_reduction == "mean" else loss_sum
        else:
            logits = self.lm_head(x)
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100, reduction=loss_reduction)
        balance_loss, z_loss = torch.stack(balance).mean(), torch.stack(zl).mean()
        aux_loss = self.config.router_aux_loss_coef * balance_loss + self.config.router_z_loss_coef * z_loss
        moes = self.moe_layers()
        counts = (torch.stack([moe.last_counts for moe in moes]) if moes
                  else torch.zeros((0, 0), dtype=torch.int64, device=x.device))
        return ModelOutput(logits, loss, aux_loss, balance_loss, z_loss, counts)

    def decode_step(self, tok_B1: torch.Tensor, kv_cache: KVCache, position_ids_B1: torch.Tensor | None,
                    attention_mask_BS: torch.Tensor | None) -> torch.Tensor:
        """One new token per row at inference on the CPU: next-token logits (B, V). The same computation
        as forward(tok_B1, kv_cache=..., position_ids=..., attention_mask=..., last_only=True), minus what
        decoding does not need: the losses, the expert counts, the general mask construction (one
        query at the newest column sees exactly the valid columns) and the sort-based expert dispatch,
        replaced by MoE.forward_chosen (it reads the choice back to the host: a sync on a GPU)."""
        S = kv_cache.pos
        if position_ids_B1 is None:
            cos, sin = self.rope_cos[S:S + 1][None, None], self.rope_sin[S:S + 1][None, None]
        else:
            cos, sin = self.rope_cos[position_ids_B1][:, None], self.rope_sin[position_ids_B1][:, None]
        mask = None if attention_mask_BS is None else attention_mask_BS[:, None, None, :]
        x_B1D = self.embed_tokens(tok_B1)
        for layer in self.layers:
            x_B1D = layer.decode(x_B1D, cos, sin, kv_cache, mask)
        kv_cache.pos = S + 1
        return self.lm_head(self.norm(x_B1D)).view(x_B1D.shape[0], -1)

    def decode_row(self, token: int, kv_cache: KVCache, n: int, s: RowScratch) -> torch.Tensor:
        """The decode step of a cache with one row, float32 on the CPU, written for the fewest PyTorch
        operators the arithmetic allows (why: pakar.engine.RowDecoder): feed `token` as the row's n-th
        token (its earlier n - 1 fill the last n - 1 columns; any before are left padding); returns
        the next-token logits (1, V). The same computation as forward() (tests/test_engine.py holds it
        to forward's logits and cache), with 1-D vectors and BLAS matrix-vector products."""
        s.begin(kv_cache, n)
        x_D = s.embed[token]
        for l, layer in enumerate(self.layers):
            x_D = layer.decode_row(x_D, s, l)
        kv_cache.pos += 1
        return s.head(x_D * s.final_norm, s.inv_rms(x_D))
