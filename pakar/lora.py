"""LoRA: low-rank adapters swapped into a Transformer in place, adapter files, and merging them back.

API:
    LoraSpec(rank, alpha, targets)        validated settings; scale = alpha / rank
    apply_lora(model, spec) -> model      freeze the model, add adapters (in place); only they train
    split_state (pakar.checkpoint)           a LoRA model's state dict -> plain base state + factors
    merge_state(base, adapters, scale) -> state      W + scale * B @ A for every adapted tensor
    adapter_checkpoint(...) / load_adapter(path)     the small adapter file
    merge_adapter_file(adapter, base, out)           `pakar lora-merge`

Design choices:

- Our own ~100 lines rather than PEFT. PEFT 0.21 does handle this model (target_modules for the
  projections, target_parameters for the stacked experts), and the tests use it as the independent
  reference: identical outputs for identical factors. Ours is simpler where it matters here: no
  dependency (PEFT brings transformers and accelerate; pakar's core needs neither); the base keys and
  the module types stay as they are (PEFT renames q_proj.weight to q_proj.base_layer.weight and nests
  the three expert tensors as wrappers, `experts.base_layer.base_layer.lora_A.default.weight`, whose
  keys do not say which tensor they adapt, and which hide attributes such as `use_grouped_mm`); an
  adapter is stored under the name of the tensor it changes, so merging is plain arithmetic on state
  dicts with no model and no PEFT; and the expert parametrization is registered once rather than on
  every forward call.
- Filter-function swap (as nanochat swaps in FP8 layers): the model code knows nothing of LoRA.
  * Projections (q/k/v/o_proj, and a dense model's mlp.gate/up/down_proj; nn.Linear): LoRALinear keeps the base Parameter under the same name
    `weight` and adds lora_A (r, in) and lora_B (out, r); y = x W^T + scale (x A^T) B^T. The low-rank
    path runs on the activations, so the frozen W never gets a full-size gradient.
  * Experts (mlp.experts.gate_proj/up_proj/down_proj, stacked (E, out, in)): a torch parametrization
    W_e + scale B_e A_e with lora_A (E, r, in), lora_B (E, out, r), one adapter per expert. The MoE
    dispatch (grouped matmul or loop) reads the adapted tensor unchanged. The fold runs in float32
    outside autocast (one baddbmm); the cost is that backward forms the full (E, out, in) gradient of
    the adapted tensor before projecting it onto A and B (PEFT's ParamWrapper does the same).
  * Token rows (LoraSpec.token_ids; pakar.finetune sets the ChatML markers for chat data): a
    parametrization of embed_tokens.weight and lm_head.weight adding a trainable (n, D) delta to those
    n rows. A model pretrained on plain text has never seen <|im_start|> or <|im_end|>: their rows are
    still at initialisation, and low-rank adapters on the blocks alone can neither read the markers
    well nor learn to emit <|im_end|> (PEFT's trainable_token_indices addresses the same problem).
- Initialisation (Hu et al. 2021, and PEFT's default): A uniform in +-1/sqrt(in) (nn.Linear's own
  rule), B = 0 and token-row deltas 0, so at initialisation the adapted model computes exactly the
  base model's outputs.
- Frozen: every base parameter (embeddings, norms, router, unadapted tensors); the optimizer only
  sees the adapters. The router's selection biases (buffers that aux-loss-free balancing may still
  move during fine-tuning) are saved with the adapters, so a merged model routes like the trained one.
- Adapter file ("pakar-lora-v1", loads with weights_only=True): {"lora": spec, "adapters": {base
  key: {"lora_A", "lora_B"} or {"rows", "delta"}}, "buffers": {router biases}, "base": {"path",
  "sha256"}, "config", "meta"}. No base weights and no tokenizer: it is a few hundred KB next to a
  base of tens of MB, and merging checks the base's sha256 so an adapter is never folded into the
  wrong model.
- Merge arithmetic in float64, stored in the base tensor's dtype.

Shape legend: E experts, O out features, I in features, R rank.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from pakar import PakarError, __version__
from pakar.args import EXPERT_TARGETS, LoraSpec
from pakar.checkpoint import atomic_save, check_finite, file_sha256, model_checkpoint, safe_load
from pakar.config import ModelConfig
from pakar.moe import Experts

ADAPTER_FORMAT = "pakar-lora-v1"

def _init_A(A: torch.Tensor) -> None:
    """nn.Linear's default weight rule, applied per (R, I) slice: uniform in +-1/sqrt(I)."""
    bound = 1.0 / math.sqrt(A.shape[-1])
    nn.init.uniform_(A, -bound, bound)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = x W^T + scale (x A^T) B^T."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.in_features, self.out_features, self.scale = base.in_features, base.out_features, scale
        self.weight = base.weight  # the same Parameter, so its state-dict key stays "<name>.weight"
        self.bias = base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))  # (R, I)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))  # (O, R)
        _init_A(self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.lora_A.shape[0]}, scale={self.scale:g}"


class ExpertLoRA(nn.Module):
    """Parametrization of a stacked expert tensor W (E, O, I): W + scale * B @ A, one (A, B) per expert."""

    def __init__(self, weight_EOI: torch.Tensor, rank: int, scale: float):
        super().__init__()
        E, O, I = weight_EOI.shape
        kw = {"device": weight_EOI.device, "dtype": weight_EOI.dtype}
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(E, rank, I, **kw))  # (E, R, I)
        self.lora_B = nn.Parameter(torch.zeros(E, O, rank, **kw))  # (E, O, R)
        _init_A(self.lora_A)

    def forward(self, weight_EOI: torch.Tensor) -> torch.Tensor:
        # float32 fold outside autocast (the dispatch casts the result to its compute dtype itself)
        with torch.autocast(weight_EOI.device.type, enabled=False):
            return torch.baddbmm(weight_EOI.float(), self.lora_B.float(), self.lora_A.float(),
                                 alpha=self.scale).to(weight_EOI.dtype)


class TokenRows(nn.Module):
    """Parametrization of an embedding or output matrix W (V, D): W plus a trainable delta on a few rows
    (tokens the base model never learned, such as the chat markers of a model pretrained on text)."""

    def __init__(self, weight_VD: torch.Tensor, token_ids: tuple[int, ...]):
        super().__init__()
        self.register_buffer("rows", torch.tensor(token_ids, dtype=torch.long, device=weight_VD.device))
        self.delta = nn.Parameter(torch.zeros(len(token_ids), weight_VD.shape[1], device=weight_VD.device,
                                              dtype=weight_VD.dtype))  # (n, D), zero: identity at the start

    def forward(self, weight_VD: torch.Tensor) -> torch.Tensor:
        return weight_VD.index_add(0, self.rows, self.delta.to(weight_VD.dtype))


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freeze every parameter of `model` and add adapters on spec.targets (and the token rows of
    spec.token_ids), in place. Returns the model."""
    if any(isinstance(m, LoRALinear) or parametrize.is_parametrized(m) for m in model.modules()):
        raise PakarError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in spec.targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, spec.rank, spec.scale))
                adapted += 1
        if isinstance(module, Experts):
            for name in spec.targets:
                if name in EXPERT_TARGETS:
                    parametrize.register_parametrization(
                        module, name, ExpertLoRA(getattr(module, name), spec.rank, spec.scale))
                    adapted += 1
    if spec.token_ids:
        embed, head = model.embed_tokens, model.lm_head
        if head.weight is embed.weight:
            raise PakarError("LoRA token rows need untied input and output embeddings (tie_word_embeddings false)")
        if max(spec.token_ids) >= embed.weight.shape[0] or min(spec.token_ids) < 0:
            raise PakarError(f"LoRA token rows {spec.token_ids} are outside the vocabulary of {embed.weight.shape[0]}")
        for module in (embed, head):
            parametrize.register_parametrization(module, "weight", TokenRows(module.weight, spec.token_ids))
    if not adapted:
        raise PakarError(f"--lora-targets {' '.join(spec.targets)}: the model has no such tensors")
    return model


def merge_state(base: dict, adapters: dict, scale: float) -> dict:
    """New state dict: base[key] + scale * B @ A for every low-rank adapter, base[key][rows] + delta for
    token rows (float64 arithmetic)."""
    merged = dict(base)
    for key, ab in adapters.items():
        if key not in base:
            raise PakarError(f"adapter for {key!r}, which the base model does not have")
        if "delta" in ab:
            W, rows, delta = base[key], ab["rows"].long(), ab["delta"]
            if delta.shape != (len(rows), W.shape[1]) or int(rows.max()) >= W.shape[0]:
                raise PakarError(f"token rows for {key}: delta {tuple(delta.shape)} does not fit {tuple(W.shape)}")
            merged[key] = W.double().index_add(0, rows, delta.double()).to(W.dtype)
            continue
        W, A, B = base[key], ab["lora_A"], ab["lora_B"]
        if B.shape[:-1] + A.shape[-1:] != W.shape or B.shape[-1] != A.shape[-2]:
            raise PakarError(f"adapter for {key}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit the "
                             f"base tensor {tuple(W.shape)}")
        merged[key] = (W.double() + scale * (B.double() @ A.double())).to(W.dtype)
    return merged


def adapter_checkpoint(adapters: dict, buffers: dict, spec: LoraSpec, base_path: str | os.PathLike,
                       base_sha256: str, config: dict, **meta) -> dict:
    return {"format": ADAPTER_FORMAT, "lora": spec.to_dict(),
            "adapters": {k: {n: t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu()
                             for n, t in ab.items()} for k, ab in adapters.items()},
            "buffers": {k: t.detach().cpu() for k, t in buffers.items()},
            "base": {"path": str(Path(base_path).resolve()), "sha256": base_sha256},
            "config": config, "meta": {"pakar_version": __version__, **meta}}


def router_buffers(base_state: dict) -> dict:
    """The state that fine-tuning may change besides the adapters: the routers' selection biases."""
    return {k: v for k, v in base_state.items() if k.endswith("gate.expert_bias")}


def load_adapter(path: str | os.PathLike) -> dict:
    """An adapter file, loaded with weights_only=True; one-line errors for anything else."""
    adapter = safe_load(path, fmt=ADAPTER_FORMAT, what="LoRA adapter")
    for key, kind in {"lora": dict, "adapters": dict, "buffers": dict, "base": dict, "config": dict}.items():
        if not isinstance(adapter.get(key), kind):
            raise PakarError(f"{path}: not a complete LoRA adapter: its {key!r} entry is missing or not a {kind.__name__}")
    if not isinstance(adapter["base"].get("path"), str) or not isinstance(adapter["base"].get("sha256"), str):
        raise PakarError(f"{path}: its 'base' entry lacks the base checkpoint's path and sha256")
    try:
        LoraSpec.from_dict(adapter["lora"])
    except (KeyError, TypeError, ValueError) as e:
        raise PakarError(f"{path}: unreadable LoRA settings ({type(e).__name__}: {e})") from None
    except PakarError as e:
        raise PakarError(f"{path}: {e}") from None
    for key, ab in adapter["adapters"].items():
        if not isinstance(ab, dict) or not all(isinstance(t, torch.Tensor) for t in ab.values()):
            raise PakarError(f"{path}: adapter {key!r} is not a set of tensors")
        check_finite({f"{key}.{n}": t for n, t in ab.items()}, path)
    return adapter


def merge_adapter_file(adapter_path, base_path=None, out_path=None, log=print) -> Path:
    """Fold an adapter file into its base checkpoint and write a self-contained model checkpoint."""
    adapter = load_adapter(adapter_path)
    base_path = Path(base_path if base_path is not None else adapter["base"]["path"])
    if not base_path.is_file():
        raise PakarError(f"base checkpoint {base_path} (named in the adapter) not found; pass --base PATH")
    sha = file_sha256(base_path)
    if sha != adapter["base"]["sha256"]:
        raise PakarError(f"{base_path} is not the base this adapter was trained on (sha256 {sha[:12]}..., the "
                         f"adapter expects {adapter['base']['sha256'][:12]}...)")
    base = safe_load(base_path)
    if base["config"] != adapter["config"]:
        raise PakarError(f"{base_path}: model config differs from the adapter's")
    spec = LoraSpec.from_dict(adapter["lora"])
    state = merge_state(base["model"], adapter["adapters"], spec.scale)
    for key, value in adapter["buffers"].items():
        if key not in state or state[key].shape != value.shape:
            raise PakarError(f"adapter buffer {key!r} does not fit the base model")
        state[key] = value.to(state[key].dtype)
    meta = {**base.get("meta", {}), **adapter.get("meta", {}),
            "merged_lora": {"adapter": str(Path(adapter_path).resolve()), "base": str(base_path.resolve()),
                            "base_sha256": sha, **spec.to_dict()}}
    meta.pop("pakar_version", None)
    out_path = Path(out_path)
    atomic_save(model_checkpoint(state, ModelConfig.from_dict(base["config"]), base["tokenizer"], **meta), out_path)
    log(f"merged {adapter_path} (rank {spec.rank}, {', '.join(spec.targets)}) into {base_path} -> {out_path}")
    return out_path


