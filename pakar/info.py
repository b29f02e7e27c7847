"""`pakar info`: parameters, training FLOPs and training memory of a model config.

Everything is computed from the config alone (no model is built), so even the 3B preset answers at
once. The conventions, so that the numbers can be checked:

- Parameters. `total_params` counts every parameter once (a tied lm_head is the embedding).
  `embedding_params` are the vocabulary matrices: embed_tokens, plus lm_head when untied.
  `active_params` are those one token uses: everything except the experts it is not routed to
  (num_experts_per_tok of num_experts per layer). Norm weights are included in both. A dense model
  (num_experts = 0) is counted as one always-active expert of width intermediate_size and no router,
  so a preset and its `-dense` twin differ in active parameters only by the MoE's routers.
- FLOPs. `train_flops_per_token` = forward + backward = 3 x forward, where forward counts 2 FLOPs per
  multiply-add of every matrix a token goes through (attention projections, router, its k experts,
  lm_head; the embedding lookup is free) plus the attention scores and weighted values,
  2 x 2 x seq_len x heads x head_dim per layer over the whole seq_len x seq_len square (PaLM's MFU
  convention; causal masking makes about half of that useful). In short:
  6 x active matmul params + 12 x layers x heads x head_dim x seq_len. Norms, softmaxes and the
  router's top-k are left out (well under 1%).
- Memory to train with AdamW, per GPU. Data parallel (DDP) keeps a full replica on every GPU;
  FSDP / ZeRO-3 divide the weights + gradients + optimizer part by the number of GPUs.
  * weights + gradients + AdamW's two moments: 4 + 4 + 8 = 16 bytes per parameter, in both modes
    (bf16 mixed precision keeps float32 master weights and autocasts the matmuls);
  * bf16 autocast also keeps a bfloat16 copy of every matmul weight alive from forward to backward
    (2 bytes per matmul parameter; the router stays float32);
  * activations: the bytes autograd saves for backward in this implementation, for batch x seq_len
    tokens, with the fused loss head (the training loop passes return_logits=False). The formula
    below is a census of those tensors; tests/test_info.py checks it against a real model's saved
    tensors. With activation checkpointing only each block's input is kept, plus one block's
    activations while it is recomputed.
  Not counted: temporary buffers inside a kernel, allocator fragmentation, the CUDA context (about
  0.5-1 GB), and the data loader.
"""

from __future__ import annotations


from pakar.config import ModelConfig


def ffn_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    """(experts, experts per token, width) of the feed-forward; a dense MLP is (1, 1, intermediate_size)."""
    if cfg.dense:
        return 1, 1, cfg.intermediate_size
    return cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size


def param_counts(cfg: ModelConfig) -> dict:
    """total / active / embedding / matmul parameter counts (see the module docstring)."""
    D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, k, I = ffn_shape(cfg)
    attn = D * H * K + 2 * D * G * K + H * K * D  # q, k, v, o projections
    norms = 2 * D + 2 * K  # input / post-attention layernorms, q_norm, k_norm
    router = 0 if cfg.dense else E * D
    expert = 3 * D * I  # gate, up, down
    embed = V * D
    head = 0 if cfg.tie_word_embeddings else V * D
    per_layer = attn + norms + router + E * expert
    total = L * per_layer + embed + head + D  # + final norm
    active = total - L * (E - k) * expert
    return {
        "total_params": total,
        "active_params": active,
        "embedding_params": embed + head,
        "non_embedding_params": total - embed - head,
        "active_non_embedding_params": active - embed - head,
        "expert_params": 0 if cfg.dense else L * E * expert,
        # matrices a token is multiplied by (2 FLOPs per entry per forward); the lookup is free
        "active_matmul_params": L * (attn + router + k * expert) + V * D,
        # matrices whose bfloat16 autocast copies are kept for backward (all experts; the router stays
        # float32; the fused loss head uses its copy of lm_head within the forward pass)
        "autocast_matmul_params": L * (attn + E * expert),
    }


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * param_counts(cfg)["active_matmul_params"] + attention


def activation_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, bf16: bool, row_bucket: int = 1) -> dict:
    """Bytes autograd keeps for backward: {"layer", "other", "total", "checkpointed"}. `row_bucket`:
    the experts' row padding (pakar.moe.Experts.row_bucket; only bfloat16 on a CPU pads)."""
    D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, k, I = ffn_shape(cfg)
    N = batch_size * seq_len
    M = N * k  # routed rows
    P = M + E * (row_bucket - 1) if row_bucket > 1 else M  # rows the experts run on
    low = 2 if bf16 else 4  # bytes per element of the autocast (matmul) activations
    f32, i64 = 4, 8
    attention = (
        f32 * 2 * N * D  # the residual stream at both norms (float32 in both modes)
        + low * N * D  # the attention projections' input
        + low * (3 * N * H * K + 3 * N * G * K)  # q, k, v before and after norm/rotary, attention output
        + f32 * (N * H + N * (2 + H + G))  # attention log-sum-exp, 1/rms of the four norms
    )
    if cfg.dense:
        ffn = low * (N * D + 4 * N * I)  # the MLP's input; gate, silu(gate), up, their product
    else:
        ffn = (
            f32 * N * D  # the router's input (float32 in both modes)
            + low * (P * D + M * D + 4 * P * I)  # expert inputs, token-order outputs, SwiGLU
            + f32 * (N * E + N) + low * N * k  # router probabilities, z-loss; gate values
            + i64 * (2 * M + N * k + (M if P > M else 0))  # sort order, chosen experts, padded rows
        )
    layer = attention + ffn
    # fused loss head: the float32 head-weight gradient, the hidden-state gradient, the final norm
    other = f32 * V * D + low * N * D + f32 * N * D + i64 * 2 * N
    checkpointed = L * f32 * N * D + layer + other
    return {"layer": layer, "other": other, "total": L * layer + other, "checkpointed": checkpointed}


def train_memory(cfg: ModelConfig, batch_size: int, seq_len: int, bf16: bool) -> dict:
    """Per-GPU bytes to train with AdamW: states, activations, total (with and without checkpointing)."""
    p = param_counts(cfg)
    states = 16 * p["total_params"]
    copies = 2 * p["autocast_matmul_params"] if bf16 else 0
    act = activation_bytes(cfg, batch_size, seq_len, bf16)
    return {"states_bytes": states, "weight_copy_bytes": copies, "activation_bytes": act["total"],
            "total_bytes": states + copies + act["total"],
            "total_bytes_checkpointed": states + copies + act["checkpointed"]}


def info(cfg: ModelConfig, seq_len: int, batch_size: int) -> dict:
    p = param_counts(cfg)
    return {**cfg.to_dict(), **p, "seq_len": seq_len, "batch_size": batch_size,
            "train_flops_per_token": train_flops_per_token(cfg, seq_len),
            "memory_fp32": train_memory(cfg, batch_size, seq_len, bf16=False),
            "memory_bf16": train_memory(cfg, batch_size, seq_len, bf16=True)}


def _n(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(int(x))


def _gb(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def render(name: str, r: dict) -> str:
    fl = r["train_flops_per_token"]
    attn_fl = 12 * r["num_hidden_layers"] * r["num_attention_heads"] * r["head_dim"] * r["seq_len"]
    dense = r["num_experts"] == 0
    ffn = (f"dense MLP {r['intermediate_size']}" if dense else
           f"{r['num_experts']} experts, top-{r['num_experts_per_tok']}, expert hidden {r['moe_intermediate_size']}")
    lines = [
        f"config {name}: {r['num_hidden_layers']} layers, hidden {r['hidden_size']}, "
        f"{r['num_attention_heads']} heads ({r['num_key_value_heads']} key/value, head_dim {r['head_dim']}), "
        f"{ffn}, vocab {r['vocab_size']}{', tied embeddings' if r['tie_word_embeddings'] else ''}",
        f"parameters: total {r['total_params']:,} ({_n(r['total_params'])}), of which embeddings "
        f"{r['embedding_params']:,} ({_n(r['embedding_params'])})"
        + ("" if dense else f" and experts {_n(r['expert_params'])}"),
        f"active per token: {r['active_params']:,} ({_n(r['active_params'])}; "
        f"{_n(r['active_non_embedding_params'])} without embeddings)",
        f"training FLOPs per token at seq_len {r['seq_len']}: {fl / 1e9:.3f} GFLOP "
        f"(6 x {_n(r['active_matmul_params'])} active matmul params + {attn_fl / 1e9:.3f} G attention)",
        f"memory to train with AdamW, per GPU (data parallel), batch {r['batch_size']} x {r['seq_len']} tokens:",
        f"  {'':16s}{'weights+grads+AdamW':>21s}{'bf16 copies':>13s}{'activations':>13s}{'total':>12s}"
        f"{'with --activation-checkpointing':>33s}",
    ]
    for label, key in (("float32", "memory_fp32"), ("bf16 autocast", "memory_bf16")):
        m = r[key]
        lines.append(f"  {label:16s}{_gb(m['states_bytes']):>21s}{_gb(m['weight_copy_bytes']):>13s}"
                     f"{_gb(m['activation_bytes']):>13s}{_gb(m['total_bytes']):>12s}"
                     f"{_gb(m['total_bytes_checkpointed']):>33s}")
    lines.append("  (FSDP / ZeRO-3 over n GPUs divide the first column by n; add ~1 GiB for the CUDA context)")
    return "\n".join(lines)


# The utilisation assumed where a time is computed from FLOPs alone (the reference GPUs of `pakar
# estimate`, train's first estimate line on a GPU): a well-fed MoE training run reaches 30-45% of
# the dense bf16 peak, a small batch less; 30% is the round figure at the low end of that.
ASSUMED_MFU = 0.30


def flop_seconds(tokens: float, flops_per_token: float, peak_flops: float, mfu: float = ASSUMED_MFU) -> float:
    """Seconds to train `tokens` at `mfu` of a device's `peak_flops`."""
    return tokens * flops_per_token / (peak_flops * mfu)


def human_duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 10 min', '4 d 6 h': two units at most, for estimates that are not exact."""
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"

