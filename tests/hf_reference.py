"""The independent reference for model tests: Hugging Face's Qwen3MoeForCausalLM (Qwen3ForCausalLM for
a dense model, num_experts = 0) with a pakar model's config and weights.

`hf_model_from_pakar(model)` works with both expert layouts transformers has used:
- transformers 4.x: a ModuleList of per-expert MLPs, `mlp.experts.{i}.gate_proj.weight` (I, D), ...;
- transformers 5.x: stacked tensors with gate and up fused, `mlp.experts.gate_up_proj` (E, 2I, D) =
  cat(gate_proj, up_proj, dim=1), and `mlp.experts.down_proj` (E, D, I).
The layout is read off the Hugging Face model's own state dict, so a future variant fails loudly
(missing/unexpected keys) instead of silently comparing against random weights.
"""

from __future__ import annotations

import torch


def hf_config_from_pakar(config, attn_implementation: str = "eager"):
    from transformers import Qwen3Config, Qwen3MoeConfig

    if config.num_experts == 0:  # dense: Qwen3's own config, the same attention fields
        hc = Qwen3Config(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
            rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
            initializer_range=config.initializer_range, attention_bias=False, attention_dropout=0.0,
            hidden_act="silu", use_sliding_window=False, sliding_window=None,
        )
        hc._attn_implementation = attn_implementation
        return hc
    hc = Qwen3MoeConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
        max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range, router_aux_loss_coef=config.router_aux_loss_coef,
        # every layer sparse, none dense (Qwen3-MoE's defaults, spelled out)
        decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=4 * config.hidden_size,
        attention_bias=False, attention_dropout=0.0, hidden_act="silu", sliding_window=None,
    )
    hc._attn_implementation = attn_implementation  # "eager": the plain matmul-softmax reference
    return hc


@torch.no_grad()
def hf_model_from_pakar(model, attn_implementation: str = "eager"):
    """A float32 Qwen3MoeForCausalLM (Qwen3ForCausalLM if dense; eval mode, on the CPU) holding
    `model`'s weights."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    config = model.config
    for layer in model.layers:
        if config.num_experts and layer.mlp.gate.expert_bias.abs().max() > 0:
            raise ValueError("the model has a non-zero expert selection bias, which Qwen3-MoE cannot represent")
    cls = Qwen3ForCausalLM if config.num_experts == 0 else Qwen3MoeForCausalLM
    hf = cls(hf_config_from_pakar(config, attn_implementation)).float().eval()
    target = hf.state_dict()
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in target)
    sd = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        if name.endswith("expert_bias"):
            continue
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:
                sd[name] = t
            continue
        key = "model." + name
        if ".mlp.experts." in name:
            prefix, proj = key.rsplit(".", 1)  # model.layers.{i}.mlp.experts, gate_proj|up_proj|down_proj
            if fused:
                if proj == "gate_proj":
                    up = model.state_dict()[name.replace("gate_proj", "up_proj")].detach().float().cpu()
                    sd[f"{prefix}.gate_up_proj"] = torch.cat([t, up], dim=1)
                elif proj == "down_proj":
                    sd[f"{prefix}.down_proj"] = t
            else:
                for i in range(t.shape[0]):
                    sd[f"{prefix}.{i}.{proj}.weight"] = t[i]
            continue
        sd[key] = t
    missing = set(target) - set(sd) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unexpected = set(sd) - set(target)
    if missing or unexpected:
        raise KeyError(f"HF Qwen3-MoE layout not understood: missing {sorted(missing)[:4]}, "
                       f"unexpected {sorted(unexpected)[:4]}")
    for k, v in sd.items():
        if target[k].shape != v.shape:
            raise ValueError(f"{k}: HF expects {tuple(target[k].shape)}, pakar has {tuple(v.shape)}")
    hf.load_state_dict(sd, strict=False)
    if config.tie_word_embeddings:
        hf.tie_weights()
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf
