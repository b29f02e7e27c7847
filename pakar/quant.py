"""`--quantize int8`: 8-bit weights for CPU inference (chat, chat-batch, serve, eval).

quantize_int8(model) swaps modules in place (STYLE 13): the attention projections and the output head
(nn.Linear) become Int8Linear, each layer's stacked experts become Int8Experts (a dense model's MLP
projections become Int8Linear). The embedding (a row
lookup), the norms and the router (tiny, and it decides which experts run) stay float32.

Design choices:
- Weights: symmetric int8 with one float scale per output channel (per row of each (out, in)
  matrix, per expert): scale = max|w_row| / 127, so each weight is off by at most scale / 2.
- Kernel, chosen by measured speed (benchmarks/bench_generate.py; the figures are in its output):
  PyTorch's fbgemm int8 GEMM, `torch.ops.quantized.linear_dynamic`. The weight-only kernel
  `torch._weight_int8pack_mm` measured slower than the float32 matrix-vector product at every
  shape of `small` on this project's CPU (1 thread), so it buys nothing here. fbgemm also
  quantises each call's input activations, per tensor, to 8 bits (with reduce_range, 7 bits, which
  avoids the int16 saturation of its AVX2 kernels); that is the accuracy cost measured by
  `pakar eval --quantize int8` (bits per byte against float32) and bounded in tests/test_quant.py.
- CPU and float32 only: fbgemm is a CPU library. On a GPU `--quantize int8` stops with one line
  (use --dtype bfloat16 there; a GPU is not bound by reading weights at these sizes the same way).
- Decoding: the engine's CPU step for int8 models (Transformer.decode_step, at any batch size) calls
  the model's modules, so it runs the int8 modules as they are (Int8Experts.swiglu is
  MoE.forward_chosen's per-expert product); prefill runs the model's forward, where Int8Experts loops
  over the experts that received rows.
- Training on a quantised model is refused (no gradients through packed weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pakar import PakarError

QUANTIZE_CHOICES = ("none", "int8")


def _pack(w_OI: torch.Tensor):
    """fbgemm-packed int8 weight with per-output-channel scales (symmetric, zero point 0)."""
    w = w_OI.detach().float().contiguous()
    scale_O = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    q = torch.quantize_per_channel(w, scale_O, torch.zeros_like(scale_O, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


def _mm(x: torch.Tensor, packed) -> torch.Tensor:
    """x (..., in) float32 @ W.T through fbgemm's int8 GEMM -> (..., out) float32."""
    shape = x.shape
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).contiguous(), packed, True)
    return y.view(*shape[:-1], y.shape[-1])


class Int8Linear(nn.Module):
    """Stands in for a bias-free nn.Linear at inference."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise PakarError("int8: a Linear with a bias is not supported")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mm(x, self.packed)


class Int8Experts(nn.Module):
    """Stands in for moe.Experts: per expert, int8 gate/up (I, D) and down (D, I)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.packed = [(_pack(g), _pack(u), _pack(d))
                       for g, u, d in zip(experts.gate_proj, experts.up_proj, experts.down_proj)]

    def swiglu(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        g, u, d = self.packed[e]
        return _mm(F.silu(_mm(x_ND, g)) * _mm(x_ND, u), d)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (moe.Experts' contract): one int8 SwiGLU per expert that has rows."""
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                outs.append(self.swiglu(x_MD[start:start + n], e))
            start += n
        return torch.cat(outs) if outs else x_MD.new_zeros(x_MD.shape)


def check_int8(device: torch.device | str, dtype: torch.dtype | None) -> None:
    """One-line refusal where fbgemm's int8 kernels do not run."""
    if torch.device(device).type != "cpu":
        raise PakarError(f"--quantize int8 runs on the CPU (PyTorch's fbgemm int8 kernels), not on {device}; "
                         f"on a GPU use --dtype bfloat16, or add --device cpu")
    if dtype not in (None, torch.float32):
        raise PakarError(f"--quantize int8 computes in float32 between its int8 products; drop --dtype {dtype}")


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap attention projections, experts and the output head of a float32 CPU pakar Transformer
    for int8 modules, in place; returns the model (in eval mode)."""
    p = model.embed_tokens.weight
    check_int8(p.device, p.dtype)
    for layer in model.layers:
        a = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(a, name, Int8Linear(getattr(a, name)))
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts = Int8Experts(layer.mlp.experts)
        else:  # a dense model's MLP (pakar.model.MLP): three plain Linears
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(layer.mlp, name, Int8Linear(getattr(layer.mlp, name)))
    model.lm_head = Int8Linear(model.lm_head)  # tied embeddings: the lookup keeps the float32 table
    for q in model.parameters():
        q.requires_grad_(False)
    return model.eval()


def maybe_quantize(model: nn.Module, quantize: str | None) -> nn.Module:
    """--quantize plumbing for the inference commands: "none"/None leaves the model as it is."""
    if quantize in (None, "none"):
        return model
    if quantize != "int8":
        raise PakarError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    return quantize_int8(model)
