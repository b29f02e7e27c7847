"""Training-memory plans: what a run keeps where, predicted from the config alone, and the optimizer
that keeps it so (`--memory-plan auto|full|lowmem|offload`).

- full: float32 weights and gradients, AdamW's two float32 moments (fused): 16 bytes per parameter.
- lowmem: AdamW's moments in 8 bits (blockwise, Dettmers et al.'s dynamic map: pakar.optim.Adam8bit),
  about 2.03 bytes per parameter instead of 8; where bf16 compute is the run's precision on a CUDA GPU
  (pakar.runtime.bf16_auto with bf16 autocast), the matmul weights (attention projections, experts)
  and their gradients are also bfloat16, updated in float32 and stochastically rounded back, so the
  update stays float32-accurate in expectation: about 6 bytes per parameter.
- offload: the float32 master weights and AdamW moments live in CPU memory (pinned transfer buffers
  on CUDA); the accelerator holds only the weights, gradients and activations forward/backward need (bfloat16
  matmul weights on a bf16 CUDA run). On a CPU device the same code runs and saves nothing (it costs
  a second float32 copy of the weights): it is there so the path is tested.
- auto: the fastest plan (full, then lowmem, then offload) whose predicted peak fits the device's
  free memory (and, for offload, the host's available RAM).

A CPU never gets bfloat16 weights from a plan: the plans follow pakar.runtime's one rule (bfloat16
on a CUDA GPU that supports it, float32 elsewhere), so they never move CPU compute to bf16. On a CPU
without native bf16 (no AVX512-BF16/AMX) bf16 training is about 20x slower than float32 (`small`: 68
tokens/s against 1,486), and `--dtype bfloat16` there warns (pakar.runtime.cpu_bf16_warning); on a CPU
with native bf16, `--dtype bfloat16` stays the user's choice (autocast, float32 weights).

The predictions (`predict`) add up, per part: weights, gradients, optimizer state, bf16 autocast
copies (pakar.info's convention), activations (pakar.info.activation_bytes, a census of what autograd
saves), the optimizer step's temporaries, and about 1 GiB of CUDA context on a GPU (in
breakdown["cuda_context"]; torch.cuda.max_memory_allocated does not see it, nvidia-smi does). The
sum is an upper bound of the peak: gradients appear while activations are freed. Not counted:
allocator fragmentation and the data loader. This module does not import torch (pakar info runs
without it); pakar.optim holds the optimizers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pakar import PakarError
from pakar.config import ModelConfig
from pakar.info import activation_bytes

PLANS = ("full", "lowmem", "offload")  # fastest first; --memory-plan also accepts "auto"
PLAN_CHOICES = ("auto",) + PLANS
BLOCK = 256  # elements per 8-bit block (one float32 scale each), as bitsandbytes and torchao
MIN_8BIT = 4096  # smaller tensors (norms) keep float32 moments: the scales would outweigh the saving
CHUNK = 1 << 22  # elements the 8-bit step dequantizes at a time (bounds its float32 temporaries; few launches on a GPU)
CHUNK_TEMPS = 8  # 4-byte temporaries of that size alive at once in the 8-bit step (m, v, w, g, denominator, codes...)
CUDA_CONTEXT_BYTES = 2**30  # the CUDA context and kernels' workspace (about 0.5-1 GiB)


def param_tensors(cfg: ModelConfig) -> list[tuple[str, int, bool, bool]]:
    """(name, elements, weight-decayed, matmul) of every parameter of Transformer(cfg), in its order.
    Decay: matrices except the embedding (pakar.memory.param_groups' rule); matmul: the attention
    projections and experts, the weights a bf16 plan stores in bfloat16 (the router, norms, embedding
    and lm_head stay float32, as under autocast)."""
    D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    out = [("embed_tokens.weight", V * D, False, False)]
    for i in range(L):
        p = f"layers.{i}."
        out += [(p + "input_layernorm.weight", D, False, False),
                (p + "self_attn.q_proj.weight", H * K * D, True, True),
                (p + "self_attn.k_proj.weight", G * K * D, True, True),
                (p + "self_attn.v_proj.weight", G * K * D, True, True),
                (p + "self_attn.o_proj.weight", D * H * K, True, True),
                (p + "self_attn.q_norm.weight", K, False, False),
                (p + "self_attn.k_norm.weight", K, False, False),
                (p + "post_attention_layernorm.weight", D, False, False),
                (p + "mlp.gate.weight", E * D, True, False)]
        out += [(p + f"mlp.experts.{w}", E * I * D, True, True) for w in ("gate_proj", "up_proj", "down_proj")]
    out.append(("norm.weight", D, False, False))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", V * D, True, False))
    return out


def adam8bit_state_bytes(n: int) -> int:
    """Bytes of Adam8bit's two moments for an n-element tensor: 8-bit codes plus a float32 scale per
    block, or two float32 moments below MIN_8BIT elements."""
    return 2 * (n + 4 * math.ceil(n / BLOCK)) if n >= MIN_8BIT else 8 * n


def bf16_weights(plan: str, device_type: str, bf16: bool) -> bool:
    """Whether `plan` stores the matmul weights in bfloat16: lowmem/offload on a bf16 CUDA run only."""
    return plan != "full" and device_type == "cuda" and bf16


def predict(cfg: ModelConfig, plan: str, batch_size: int, seq_len: int, *, device_type: str, bf16: bool,
            activation_checkpointing: bool = False, shards: int = 1) -> dict:
    """The plan's predicted memory: {"name", "peak_bytes" (the accelerator's peak; on a CPU device the
    process's training bytes, everything included), "host_bytes" (the CPU RAM it needs besides, 0 on a
    CPU device), "breakdown": {part: bytes}}. `shards`: GPUs that FSDP/ZeRO-3 divide the weights,
    gradients and optimizer state over (full plan only)."""
    if plan not in PLANS:
        raise PakarError(f"unknown memory plan {plan!r}; choose from {', '.join(PLAN_CHOICES)}")
    tensors = param_tensors(cfg)
    low = bf16_weights(plan, device_type, bf16)
    weights = sum(n * (2 if low and mm else 4) for _, n, _, mm in tensors)
    total = sum(n for _, n, _, _ in tensors)
    matmul = sum(n for _, n, _, mm in tensors if mm)
    largest = max(n for _, n, _, _ in tensors)
    parts = {"weights": weights, "gradients": weights}
    host = {}
    if plan == "full":
        parts["optimizer_state"] = 8 * total
    elif plan == "lowmem":
        parts["optimizer_state"] = sum(adam8bit_state_bytes(n) for _, n, _, _ in tensors)
        parts["step_temporaries"] = 4 * CHUNK_TEMPS * min(CHUNK, largest)
    else:  # offload: float32 master weights and moments on the host, plus pinned gradient buffers on CUDA
        host = {"master_weights": 4 * total, "optimizer_state": 8 * total}
        if device_type == "cuda":
            host["gradient_buffers"] = weights // 2  # the gradients as they come, in their own dtype
        host["step_temporaries"] = 4 * 2 * largest  # one tensor's float32 gradient and update
    if shards > 1:
        for k in ("weights", "gradients", "optimizer_state"):
            parts[k] = math.ceil(parts[k] / shards)
    if bf16 and not low:  # autocast's bfloat16 copies of the float32 matmul weights, kept for backward
        parts["autocast_copies"] = 2 * matmul
    act = activation_bytes(cfg, batch_size, seq_len, bf16)
    parts["activations"] = act["checkpointed" if activation_checkpointing else "total"]
    if device_type == "cuda":
        parts["cuda_context"] = CUDA_CONTEXT_BYTES
    if device_type == "cpu":  # one memory: what the host holds is part of the process's peak
        parts.update({f"host_{k}": v for k, v in host.items()})
        host = {}
    return {"name": plan, "peak_bytes": sum(parts.values()), "host_bytes": sum(host.values()),
            "breakdown": {**parts, **{f"host_{k}": v for k, v in host.items()}}}


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def choose(cfg: ModelConfig, batch_size: int, seq_len: int, *, device_type: str, bf16: bool,
           activation_checkpointing: bool, free_bytes: int, host_free_bytes: int,
           shards: int = 1) -> tuple[str, str]:
    """(plan, one line saying why): the fastest plan whose predicted peak fits `free_bytes` and whose
    host part fits `host_free_bytes`. PakarError naming the smallest plan and the remedies if none fits."""
    kw = dict(device_type=device_type, bf16=bf16, activation_checkpointing=activation_checkpointing)
    preds = [predict(cfg, p, batch_size, seq_len, shards=shards if p == "full" else 1, **kw) for p in PLANS]
    where = "free RAM" if device_type == "cpu" else f"free on the {device_type} device"
    for i, pr in enumerate(preds):
        if pr["peak_bytes"] <= free_bytes and pr["host_bytes"] <= host_free_bytes:
            faster = "".join(f"; {q['name']} would need {gib(q['peak_bytes'])}" for q in preds[:i])
            host = (f" + {gib(pr['host_bytes'])} of host RAM ({gib(host_free_bytes)} available)"
                    if pr["host_bytes"] else "")
            return pr["name"], (f"memory plan {pr['name']}: predicted peak {gib(pr['peak_bytes'])}{host}, "
                                f"{gib(free_bytes)} {where}{faster}")
    smallest = min(preds, key=lambda q: q["peak_bytes"])
    host = (f" and {gib(smallest['host_bytes'])} of host RAM ({gib(host_free_bytes)} available)"
            if smallest["host_bytes"] else "")
    ac = "" if activation_checkpointing else ", --activation-checkpointing"
    raise PakarError(f"no memory plan fits: the smallest, {smallest['name']}, needs {gib(smallest['peak_bytes'])} "
                     f"({gib(free_bytes)} {where}){host}. Remedies: a smaller --batch (keep the global batch "
                     f"with --grad-accum), a shorter --seq-len{ac}, or more GPUs with --fsdp")


def plan_table(cfg: ModelConfig, batch_size: int, seq_len: int, *, device_type: str, bf16: bool,
               activation_checkpointing: bool, free_bytes: int, host_free_bytes: int | None = None) -> list[dict]:
    """Every plan's prediction with "fits" (for `pakar info --gpu-memory`)."""
    rows = []
    for plan in PLANS:
        pr = predict(cfg, plan, batch_size, seq_len, device_type=device_type, bf16=bf16,
                     activation_checkpointing=activation_checkpointing)
        fits = pr["peak_bytes"] <= free_bytes and (host_free_bytes is None or pr["host_bytes"] <= host_free_bytes)
        rows.append({**pr, "fits": fits})
    return rows


def free_memory(device) -> tuple[int, int]:
    """(free bytes on `device`, available host RAM): torch.cuda.mem_get_info on CUDA, the OS's available
    memory for the CPU (pakar.runtime.memory_bytes; 0 where unknown)."""
    from pakar.runtime import memory_bytes

    host = memory_bytes("cpu", available=True) or 0
    return (memory_bytes(device, available=True) or 0) if device.type == "cuda" else host, host


def resolve_plan(args, cfg: ModelConfig, model, device, *, bf16: bool, world_size: int = 1) -> tuple[str, str]:
    """(plan, the line training.log says about it) for a TrainArgs: --memory-plan as given, or auto's
    choice against the free memory measured now, with what this process already holds for the built
    model added back (the prediction counts it); under torchrun the least free memory of all ranks, the
    node's RAM divided among its processes."""
    shards = world_size if args.fsdp else 1
    kw = dict(device_type=device.type, bf16=bf16, activation_checkpointing=args.activation_checkpointing)
    cpu_note = (" (on a CPU device offload saves nothing: the host and the device are the same RAM; it runs "
                "the same code as on a GPU)")
    if args.memory_plan != "auto":
        plan = args.memory_plan
        pr = predict(cfg, plan, args.batch, args.seq_len, shards=shards if plan == "full" else 1, **kw)
        host = f" + {gib(pr['host_bytes'])} of host RAM" if pr["host_bytes"] else ""
        return plan, (f"memory plan {plan} (--memory-plan): predicted peak {gib(pr['peak_bytes'])}{host}"
                      + (cpu_note if plan == "offload" and device.type == "cpu" else ""))
    if args.fsdp or args.deepspeed:
        return "full", "memory plan full: --fsdp/--deepspeed shard (or offload) the optimizer state themselves"
    if args.resume and (saved := saved_plan(Path(args.out) / "checkpoints" / "state.pt")):
        return saved, f"memory plan {saved}: the plan the resumed state was trained with (auto keeps it)"
    import torch  # lazy: pakar info uses this module without torch

    free, host_free = free_memory(device)
    # the processes a launcher started on this node share its RAM (each its own GPU)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    local = int(local) if local.isdigit() and int(local) >= 1 else 1
    host_free //= local
    if device.type == "cpu":
        free //= local
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device) + CUDA_CONTEXT_BYTES  # the context exists already
    budget = torch.tensor([free + held, host_free], dtype=torch.int64, device=device)
    if world_size > 1 and torch.distributed.is_initialized():  # every rank must take the same plan: the tightest's
        torch.distributed.all_reduce(budget, op=torch.distributed.ReduceOp.MIN)
    free, host_free = budget.tolist()
    plan, why = choose(cfg, args.batch, args.seq_len, free_bytes=free, host_free_bytes=host_free, **kw)
    return plan, "auto: " + why + (cpu_note if plan == "offload" and device.type == "cpu" else "")


def saved_plan(path: Path) -> str | None:
    """The plan a state.pt's optimizer was trained with ("full" for states from before plans existed),
    None when it cannot be read (resume's own checks then name the problem). Memory-mapped: the tensors
    are not read."""
    import torch  # lazy: pakar info uses this module without torch

    try:
        groups = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["optimizer"]["param_groups"]
        return groups[0].get("memory_plan", "full")
    except Exception:  # noqa: BLE001 (any unreadable file: resume() reports it properly)
        return None


def make_optimizer(model, plan: str, lr: float, weight_decay: float, device, *, bf16: bool = False):
    """The plan's optimizer over the model's trainable parameters (two groups: decay on matrices except
    the embedding, none on norms, embedding, router bias). lowmem/offload first store the matmul
    weights in bfloat16 where the plan says so (`bf16`: the run autocasts to bfloat16; call it before
    wrapping the model); every group
    carries "memory_plan" so that a resumed state names the plan it was trained with."""
    import torch  # lazy: pakar info uses this module without torch

    from pakar.optim import Adam8bit, OffloadAdamW  # lazy: torch

    if plan not in PLANS:
        raise PakarError(f"unknown memory plan {plan!r}; choose from {', '.join(PLANS)}")
    groups = param_groups(model, weight_decay)
    for g in groups:
        g["memory_plan"] = plan
    betas, eps = (0.9, 0.95), 1e-8
    if plan == "full":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type in ("cuda", "cpu"))
    if bf16_weights(plan, device.type, bf16):
        to_bf16(model)
    if plan == "lowmem":
        return Adam8bit(groups, lr=lr, betas=betas, eps=eps, block=BLOCK, min_8bit=MIN_8BIT, chunk=CHUNK)
    return OffloadAdamW(groups, lr=lr, betas=betas, eps=eps)


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_bf16(model) -> None:
    """Store the matmul weights (param_tensors' matmul=True: attention projections, experts) in bfloat16,
    in place; the embedding, lm_head, router and norms stay float32 (autocast keeps them so)."""
    import torch  # lazy: pakar info uses this module without torch

    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) or ".experts." in name:
            p.data = p.data.to(torch.bfloat16)


def check_resume_plan(optimizer_state: dict, plan: str) -> None:
    """PakarError when state.pt's optimizer was trained with another plan (its moments and master
    weights are kept differently; no conversion: resume with the plan it names)."""
    if not isinstance(optimizer_state, dict):  # (DeepSpeed's own state: always the full plan)
        return
    saved = next((g.get("memory_plan") for g in optimizer_state.get("param_groups", ())), None) or "full"
    if saved != plan:
        raise PakarError(f"cannot resume: the saved state was trained with --memory-plan {saved}, this run "
                         f"uses {plan}; resume with --memory-plan {saved}")
