"""Model configuration: one typed dataclass and the named presets.

Field names are Hugging Face Qwen3-MoE's (`hidden_size`, `num_experts`, `moe_intermediate_size`, ...)
so that export writes them to `config.json` unchanged. Only the last three fields are pakar's own
(training-time load balancing; they do not change the architecture).

Dense baselines: num_experts = 0 makes every feed-forward one SwiGLU MLP of width `intermediate_size`
(Hugging Face Qwen3's dense layer; export writes a `qwen3` folder); the MoE fields are then 0, and an
MoE's `intermediate_size` is 0. Each preset NAME has a `NAME-dense` twin (`dense_variant`) with the
same attention and an MLP of the active width num_experts_per_tok x moe_intermediate_size, so both
have the same active parameters and training FLOPs per token (the router's E x D per layer aside):
the baseline the MoE must beat at equal wall-clock time (benchmarks/bench_moe_vs_dense.py).

Load balancing: the Switch auxiliary loss (router_aux_loss_coef) and the router z-loss are on by
default. DeepSeek-V3's auxiliary-loss-free bias balancing (expert_bias_update_rate > 0, e.g. 0.001)
is off by default: the per-expert selection bias it learns changes which experts a token goes to,
and Qwen3-MoE has no such bias, so a model trained with it no longer routes exactly like its
Hugging Face export (pakar export refuses non-zero biases unless told to drop them).

Presets (the vocabulary comes from the tokenizer at train time; 8192 is the default; figures from
`pakar info --config NAME`, which also gives FLOPs and training memory):
  tiny     1.2M parameters (75K without embeddings); trains in seconds on a 2-core CPU; tests, demo
  small    19.5M total, 8.9M active; minutes on a CPU, meaningful on a few MB of text
  default  the seed's: 22 layers, 16 heads, d_model 1024, 16 experts, top-1; moe_intermediate_size
           1408 puts the active parameters at 170M (the seed's "~150-200M"); 1.60B in total
  3b       the seed's "larger model: 3B config": 2.93B total, 385M active (32 experts, top-2)
  NAME-dense  the dense twin of each (tiny-dense, small-dense, default-dense, 3b-dense)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pakar import PakarError


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    num_key_value_heads: int = 4  # grouped-query attention: heads share K/V in groups
    head_dim: int = 64
    num_experts: int = 16  # 0: a dense model (one MLP of intermediate_size per layer)
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 1408
    intermediate_size: int = 0  # the dense MLP's width; only with num_experts = 0
    # With top-1, renormalising the chosen probability would make it always 1.0 and cut the router
    # off from the language-model gradient (Switch Transformer gating), so the default is False.
    norm_topk_prob: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # load balancing (training only)
    router_aux_loss_coef: float = 0.01  # Switch auxiliary loss; 1.0 x coef under uniform routing
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss: keeps router logits small
    expert_bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing; 0 = off (e.g. 0.001)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise PakarError(f"invalid model config: {msg}")

        def is_int(name: str) -> bool:
            return isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            need(is_int(name) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        moe_fields = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
        for name in moe_fields + ("intermediate_size",):
            need(is_int(name) and getattr(self, name) >= 0,
                 f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.num_experts == 0:  # dense: nothing may suggest experts, so a config means one thing
            need(self.intermediate_size > 0, "a dense model (num_experts = 0) needs intermediate_size > 0, got "
                 f"{self.intermediate_size}")
            need(self.num_experts_per_tok == 0 and self.moe_intermediate_size == 0,
                 "a dense model (num_experts = 0) must have num_experts_per_tok = 0 and moe_intermediate_size = 0")
        else:
            for name in moe_fields[1:]:
                need(getattr(self, name) > 0, f"{name} must be a positive integer, got {getattr(self, name)!r}")
            need(self.intermediate_size == 0, f"intermediate_size is the dense MLP's width; an MoE "
                 f"(num_experts = {self.num_experts}) must have 0, got {self.intermediate_size}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok (top-k = {self.num_experts_per_tok}) must be <= num_experts ({self.num_experts})")
        need(not (self.norm_topk_prob and self.num_experts_per_tok == 1),
             "norm_topk_prob must be false with num_experts_per_tok = 1: the renormalised gate would always "
             "be 1.0 and the router would get no gradient from the language-model loss")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf,
                 f"{name} must be a positive finite number, got {value!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "expert_bias_update_rate"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf,
                 f"{name} must be a finite number >= 0, got {value!r}")
        need(not (self.norm_topk_prob and self.num_experts == 0), "norm_topk_prob must be false for a dense model")
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def dense(self) -> bool:
        return self.num_experts == 0

    def replace(self, **changes) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise PakarError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def dense_variant(cfg: ModelConfig) -> ModelConfig:
    """The dense twin of an MoE config: the same attention, one SwiGLU MLP as wide as the experts a
    token goes through together (num_experts_per_tok x moe_intermediate_size)."""
    return cfg.replace(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0,
                       intermediate_size=cfg.num_experts_per_tok * cfg.moe_intermediate_size)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                        max_position_embeddings=512),
    "small": ModelConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=384,
                         max_position_embeddings=1024),
    "default": ModelConfig(),
    "3b": ModelConfig(hidden_size=1536, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=128, num_experts=32, num_experts_per_tok=2, moe_intermediate_size=768,
                      max_position_embeddings=4096),
}
PRESETS.update({f"{name}-dense": dense_variant(cfg) for name, cfg in list(PRESETS.items())})


def get_config(name: str, **overrides) -> ModelConfig:
    """A copy of preset `name` with `overrides` applied (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise PakarError(f"unknown --config {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
