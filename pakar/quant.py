"""`--quantize int8`: 8-bit weights for CPU inference (chat, chat-batch, serve, eval).

quantize_int8(model) swaps modules in place (STYLE 13): the attention projections and the output head
(nn.Linear) become Int8Linear, each layer's stacked experts become Int8Experts (a dense model's MLP
projections become Int8Linear). The embedding (a row
lookup), the norms and the router (tiny, and it decides which experts run) stay float32.

Design choices:
- Weights: symmetric int8 with one float scale per output channel (per row of each (out, in)
  matrix, per expert): scale = max|w_row| / 127, so each weight is off by at most scale / 2 (63 levels
  instead of 127 on CPUs whose int8 kernels would saturate: weight_levels).
- Kernel of the modules (prefill, and decoding where the C step was not built), chosen by measured speed
  (1 thread, this project's CPU; interleaved against float32 `torch.mv`, per product of `small`):
  `torch._int_mm` (int8 x int8 -> exact int32) with the weight passed as a transposed view of its (O, I)
  storage: ~3-5 µs for a 384x256 product from cache, ~5-11 µs when the weights come from memory (float32
  gemv: ~8 / ~40 µs; the 8192x256 head: ~40-80 µs against ~260-920 µs). Measured slower: fbgemm's
  `quantized.linear_dynamic` (~30 µs a call at one row, fixed overhead, and 7-bit per-tensor
  activations), `torch._weight_int8pack_mm` (slower than float32 at every shape), bfloat16 matrix-vector
  products (slower than float32 here), dequantising to float32 per call (float16 `torch.mv` comes close
  from memory, but it is not 8-bit). The activation each product reads is quantised per row, symmetric,
  to 8 bits (step max|x_row| / 127; int8_matmul): the accuracy cost measured by `pakar eval --quantize
  int8` (bits per byte against float32) and bounded in tests/test_quant.py.
- CPU and float32 only (measured and tested on the CPU). On a GPU `--quantize int8` stops with one
  line (use --dtype bfloat16 there; a GPU is not bound by reading weights at these sizes the same
  way).
- Decoding, chosen by the engine (pakar.engine):
  - Int8Step, where pakar/_int8step.c was compiled at install (setup.py; any C compiler): every step,
    one row or several, is one C call over the model's own int8 buffers. Why: an eager PyTorch step of
    `small` is ~430 operator calls, and their fixed cost, not the arithmetic, was most of its time
    (benchmarks/bench_generate.py's `int8_row_step`); the C step does the same arithmetic in plain
    loops, with its own int8 dot products (int8 weights widened to 16 bits against the int8-level
    input, pairs of products summed in exact 32-bit lanes: AVX-512 VNNI, AVX-512, AVX2 or scalar,
    whichever the compiler was given), so weight_levels' limit does not concern it. Products of more
    than 2^18 multiply-adds are split over PyTorch's thread count (POSIX threads; one thread on
    Windows): a model whose weights do not fit the caches needs several cores' memory bandwidth.
  - Otherwise (no compiler at install), PyTorch ops: Int8Row on the engine's RowDecoder for one row (the
    float32 row step's arithmetic, one `torch._int_mm` per weight product, each input quantised once
    for all the products that read it); several rows through Transformer.decode_step, which calls the
    int8 modules as modules (Int8Experts.swiglu is MoE.forward_chosen's per-expert product).
  Prefill always runs the model's forward, where Int8Experts loops over the experts that received rows.
- Training on a quantised model is refused (no gradients through packed weights).
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from pakar import PakarError
from pakar.model import MLP, Attention, Block, RMSNorm, Transformer
from pakar.moe import MoE, Router

QUANTIZE_CHOICES = ("none", "int8")


INF = float("inf")


@functools.lru_cache(maxsize=None)
def weight_levels() -> int:
    """The largest int8 weight magnitude whose products `torch._int_mm` computes exactly on this CPU:
    127, or 63 where its kernels add pairs of u8 x s8 products in saturating int16 (x86 without VNNI,
    e.g. oneDNN capped to AVX2: wrong at 127, exact at 63 whatever the activations, measured). Probed
    once with the worst case: full-scale activations against full-scale weights of both signs."""
    a = torch.full((1, 64), 127, dtype=torch.int8)
    w = torch.full((2, 64), 127, dtype=torch.int8)
    w[1] = -127
    exact = torch.tensor([[127 * 127 * 64, -127 * 127 * 64]], dtype=torch.int32)
    return 127 if torch.equal(torch._int_mm(a, w.t()), exact) else 63


def quantize_weight(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 (O, I), float32 scale (O,)), w ≈ q * scale[:, None],
    |q| <= weight_levels()."""
    w = w_OI.detach().float()
    scale_O = (w.abs().amax(dim=1) / weight_levels()).clamp_min(1e-12)
    return torch.round(w / scale_O[:, None]).to(torch.int8), scale_O


def int8_matmul(x: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """x (..., I) float32 @ (q_OI * scale_O[:, None]).T -> (..., O) float32: each row of x quantised
    to int8 with its own step max|x_row| / 127 (symmetric), the product in int32 (torch._int_mm, exact),
    then both scales."""
    shape = x.shape
    x_NI = x.reshape(-1, shape[-1])
    step_N1 = torch.linalg.vector_norm(x_NI, INF, dim=1, keepdim=True).div_(127).clamp_min_(1e-30)
    y_NO = torch._int_mm(torch.round(x_NI / step_N1).to(torch.int8), q_OI.t())
    return (y_NO * (step_N1 * scale_O)).view(*shape[:-1], -1)


class Int8Linear(nn.Module):
    """Stands in for a bias-free nn.Linear at inference."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise PakarError("int8: a Linear with a bias is not supported")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight_q, self.scale)


def stacked(*linears: Int8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Several Int8Linears reading the same input as one: (int8 weight rows, their scales), in order
    (q, k and v as one product; a dense MLP's gate and up)."""
    return torch.cat([lin.weight_q for lin in linears]), torch.cat([lin.scale for lin in linears])


class Int8Experts(nn.Module):
    """Stands in for moe.Experts: per expert, int8 [gate; up] (2I, D), one product for both, and
    down (D, I)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        gate_up = torch.cat([experts.gate_proj, experts.up_proj], dim=1)  # (E, 2I, D)
        pairs = [quantize_weight(w) for w in gate_up]
        self.register_buffer("gate_up_q", torch.stack([q for q, _ in pairs]))
        self.register_buffer("gate_up_scale", torch.stack([s for _, s in pairs]))
        pairs = [quantize_weight(w) for w in experts.down_proj]
        self.register_buffer("down_q", torch.stack([q for q, _ in pairs]))
        self.register_buffer("down_scale", torch.stack([s for _, s in pairs]))

    def swiglu(self, x_ND: torch.Tensor, e: int) -> torch.Tensor:
        g, u = int8_matmul(x_ND, self.gate_up_q[e], self.gate_up_scale[e]).chunk(2, dim=-1)
        return int8_matmul(F.silu(g) * u, self.down_q[e], self.down_scale[e])

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (moe.Experts' contract): one int8 SwiGLU per expert that has rows."""
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                outs.append(self.swiglu(x_MD[start:start + n], e))
            start += n
        return torch.cat(outs) if outs else x_MD.new_zeros(x_MD.shape)


class Int8Row:
    """The one-row decode step of an int8 MoE model (pakar.engine.RowDecoder): the float32 row step's
    arithmetic (pakar.model's Transformer.decode_row, whose RowScratch, Attention.attend_row and
    MoE.route_row it shares) with each weight product as one `torch._int_mm` on 1-D buffers.

    Why: at batch 1 each product's fixed cost decides the step. `torch._int_mm` takes a (1, I) int8
    row and the int8 (O, I) weight (transposed view) in a few microseconds (on `small`, 384x256: ~3 µs
    where fbgemm's linear_dynamic takes ~30 µs and a float32 gemv ~8 µs from cache, ~40 µs
    from memory), and its result is exact int32. Each input vector is quantised once to int8 (step
    max|x| / 127, read back as a Python float), however many products read it: q, k and v are one
    (HK + 2GK, D) product, each expert's gate and up one (2I, D) product; both scales and the norm's
    1/rms are applied in one float32 op on the way out, the down and o products straight into the
    residual stream (addcmul). Same quantisation as int8_matmul (per row, symmetric, 8 bits), so it
    computes what the module path (Transformer.decode_step) computes, up to float32 rounding
    (tests/test_quant.py)."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        D, I, V = cfg.hidden_size, cfg.moe_intermediate_size, cfg.vocab_size
        A = cfg.num_attention_heads * cfg.head_dim
        X = A + 2 * cfg.num_key_value_heads * cfg.head_dim

        def buf(n, dtype=torch.float32):  # (1, n) for _int_mm and its 1-D view for the rest
            t = torch.zeros(1, n, dtype=dtype)
            return t, t.view(n)

        self.f_D, self.f_A, self.f_I = torch.empty(D), torch.empty(A), torch.empty(I)
        (self.q_1D, self.q_D), (self.q_1A, self.q_A), (self.q_1I, self.q_I) = (
            buf(n, torch.int8) for n in (D, A, I))
        (self.y_1X, self.y_X), (self.y_1D, self.y_D), (self.y_1J, self.y_J) = (
            buf(n, torch.int32) for n in (X, D, 2 * I))
        self.gu_J = torch.empty(2 * I)
        self.g_I, self.u_I = self.gu_J[:I], self.gu_J[I:]
        self.layers = []
        for layer in model.layers:
            a, moe = layer.self_attn, layer.mlp
            wqkv, sqkv = stacked(a.q_proj, a.k_proj, a.v_proj)  # (X, D): one product
            ex = moe.experts
            experts = [(ex.gate_up_q[e].t(), ex.gate_up_scale[e], ex.down_q[e].t(), ex.down_scale[e])
                       for e in range(ex.gate_up_q.shape[0])]
            self.layers.append((layer.input_layernorm.weight, self.attention, (
                wqkv.t(), sqkv, a.q_norm.weight, a.k_norm.weight, a.o_proj.weight_q.t(), a.o_proj.scale),
                layer.post_attention_layernorm.weight, self.moe, (moe.route_row, moe.router_views(), experts)))
        self.head_w, self.head_scale = model.lm_head.weight_q.t(), model.lm_head.scale

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """An int8 MoE model as quantize_int8 leaves it (dense int8 models take decode_step)."""
        return type(model.lm_head) is Int8Linear and all(
            type(getattr(layer.mlp, "experts", None)) is Int8Experts
            and all(type(getattr(layer.self_attn, n)) is Int8Linear for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            for layer in model.layers)

    @staticmethod
    def quantize(x, f, q) -> float:
        """x (float32, 1-D) into the int8 buffer q (through f), symmetric; returns the step."""
        m = torch.linalg.vector_norm(x, INF).item()
        torch.mul(x, 127.0 / m if m > 0 else 0.0, out=f).round_()
        q.copy_(f)
        return m / 127.0

    def attention(self, x_D, h_D, r: float, s, l: int, views):
        """Attention.decode_row's contract."""
        wqkv, sqkv, qn, kn, wo, so = views
        step = self.quantize(h_D, self.f_D, self.q_D)
        torch._int_mm(self.q_1D, wqkv, out=self.y_1X)
        torch.mul(self.y_X, sqkv, out=s.qkv).mul_(step * r)
        step = self.quantize(Attention.attend_row(s, l, qn, kn), self.f_A, self.q_A)
        torch._int_mm(self.q_1A, wo, out=self.y_1D)
        return torch.addcmul(x_D, self.y_D, so, value=step)

    def moe(self, x_D, h_D, r: float, views, probs_E, gate_I):
        """MoE.decode_row's contract."""
        route, route_views, experts = views
        chosen = route(h_D, r, route_views, probs_E)
        step = self.quantize(h_D, self.f_D, self.q_D) * r
        for e, w in chosen:
            gu, sgu, down, sdown = experts[e]
            torch._int_mm(self.q_1D, gu, out=self.y_1J)
            torch.mul(self.y_J, sgu, out=self.gu_J).mul_(step)
            a = F.silu(self.g_I, inplace=True).mul_(self.u_I)
            step_a = self.quantize(a, self.f_I, self.q_I)
            torch._int_mm(self.q_1I, down, out=self.y_1D)
            x_D = torch.addcmul(x_D, self.y_D, sdown, value=w * step_a)
        return x_D

    def head(self, h_D, r: float):
        """RowScratch's head contract: logits (1, V)."""
        step = self.quantize(h_D, self.f_D, self.q_D)
        return torch.mul(torch._int_mm(self.q_1D, self.head_w), self.head_scale).mul_(step * r)


class _Layer(ctypes.Structure):  # pakar/_int8step.c's Layer, field for field
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "ln1", "ln2", "qkv", "qkv_scale", "q_norm", "k_norm", "o", "o_scale", "router", "bias",
        "gate_up", "gate_up_scale", "down", "down_scale")]


class _Model(ctypes.Structure):  # pakar/_int8step.c's Model
    _fields_ = ([(name, ctypes.c_int64) for name in ("D", "H", "G", "K", "E", "top_k", "I", "V", "L", "norm_topk", "W")]
                + [("eps", ctypes.c_double)]
                + [(name, ctypes.c_void_p) for name in ("embed", "final_norm", "cos", "sin", "head", "head_scale")]
                + [("layers", ctypes.POINTER(_Layer))])


def _c_step():
    """pakar._int8step (built with the package where a C compiler was found), or None."""
    try:
        from pakar import _int8step
    except ImportError:
        return None
    return _int8step


class Int8Step:
    """The decode step of an int8 model (MoE or dense), all rows at once, as one C call (pakar/_int8step.c:
    the arithmetic of Int8Row and of the int8 modules, in plain loops, the big products over PyTorch's
    thread count, the GIL released). The C struct it passes points into the model's own buffers, and into
    the few concatenations (q/k/v, a dense MLP's gate/up) this object keeps alive: weights changed in place
    after it is built are seen, except in those."""

    def __init__(self, model: nn.Module):
        self.lib = _c_step()
        cfg = model.config
        keep = self.keep = []

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.detach().contiguous()
            keep.append(t)
            return t.data_ptr()

        L = cfg.num_hidden_layers
        self.layers = (_Layer * L)()
        for l, layer in enumerate(model.layers):
            a, mlp = layer.self_attn, layer.mlp
            if hasattr(mlp, "experts"):
                ex, gate = mlp.experts, mlp.gate
                ffn = dict(router=ptr(gate.weight),
                           bias=ptr(gate.expert_bias) if bool(gate.expert_bias.any()) else None,
                           gate_up=ptr(ex.gate_up_q), gate_up_scale=ptr(ex.gate_up_scale),
                           down=ptr(ex.down_q), down_scale=ptr(ex.down_scale))
            else:  # a dense MLP: one expert that every row takes
                gate_up, gate_up_scale = stacked(mlp.gate_proj, mlp.up_proj)
                ffn = dict(router=None, bias=None, gate_up=ptr(gate_up), gate_up_scale=ptr(gate_up_scale),
                           down=ptr(mlp.down_proj.weight_q), down_scale=ptr(mlp.down_proj.scale))
            qkv, qkv_scale = stacked(a.q_proj, a.k_proj, a.v_proj)
            self.layers[l] = _Layer(
                ln1=ptr(layer.input_layernorm.weight), ln2=ptr(layer.post_attention_layernorm.weight),
                qkv=ptr(qkv), qkv_scale=ptr(qkv_scale),
                q_norm=ptr(a.q_norm.weight), k_norm=ptr(a.k_norm.weight),
                o=ptr(a.o_proj.weight_q), o_scale=ptr(a.o_proj.scale), **ffn)
        self.model = _Model(
            D=cfg.hidden_size, H=cfg.num_attention_heads, G=cfg.num_key_value_heads, K=cfg.head_dim,
            E=max(cfg.num_experts, 1), top_k=max(cfg.num_experts_per_tok, 1),
            I=cfg.intermediate_size if cfg.dense else cfg.moe_intermediate_size, V=cfg.vocab_size, L=L,
            norm_topk=int(bool(cfg.norm_topk_prob)), W=model.rope_cos.shape[0], eps=cfg.rms_norm_eps,
            embed=ptr(model.embed_tokens.weight), final_norm=ptr(model.norm.weight),
            cos=ptr(model.rope_cos), sin=ptr(model.rope_sin),
            head=ptr(model.lm_head.weight_q), head_scale=ptr(model.lm_head.scale), layers=self.layers)
        self.addr = ctypes.addressof(self.model)
        self.work, self.work_shape = None, None

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """pakar._int8step was built, and `model` is an int8 pakar Transformer as quantize_int8 leaves
        it (no LoRA or other wrapped modules), float32, eval mode, on the CPU."""
        types = {type(m) for m in model.modules()}  # no float32 Linear or Experts left, nothing wrapped
        return (_c_step() is not None and type(model) is Transformer and not model.training
                and types <= {Transformer, nn.ModuleList, nn.Embedding, Block, Attention, RMSNorm, MoE, Router,
                              Int8Experts, MLP, Int8Linear}
                and type(model.lm_head) is Int8Linear
                and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()))

    def __call__(self, tok_B: torch.Tensor, pos_B: torch.Tensor, cache, mask_BC: torch.Tensor | None) -> torch.Tensor:
        """Feed tok_B (int64) at positions pos_B into column cache.pos of every row, attending over the
        columns mask_BC marks (None: each row's last pos + 1 columns); returns the logits (B, V) and
        advances cache.pos."""
        B, S, C = tok_B.shape[0], cache.pos, cache.k.shape[3]
        tok_B = tok_B.contiguous()  # the C step reads raw pointers: contiguous int64, float32, bool
        assert tok_B.dtype == pos_B.dtype == torch.int64 and pos_B.is_contiguous() and cache.k.is_contiguous()
        assert cache.v.is_contiguous() and cache.k.dtype == torch.float32 and cache.k.shape[1] == B
        assert mask_BC is None or (mask_BC.dtype == torch.bool and mask_BC.stride(1) == 1)
        if (B, C) != self.work_shape:  # the scratch a step of this shape needs
            self.work = torch.empty(self.lib.work_bytes(self.addr, B, C), dtype=torch.uint8)
            self.work_shape = (B, C)
        logits = torch.empty(B, self.model.V)
        mask = 0 if mask_BC is None else mask_BC.data_ptr()
        stride = 0 if mask_BC is None else mask_BC.stride(0)
        self.lib.step(self.addr, self.work.data_ptr(), B, S, C, tok_B.data_ptr(), pos_B.data_ptr(), mask, stride,
                      cache.k.data_ptr(), cache.v.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        cache.pos = S + 1
        return logits


def check_int8(device: torch.device | str, dtype: torch.dtype | None) -> None:
    """One-line refusal off the CPU: the int8 path is measured and tested there only (a GPU is not bound
    by reading weights at these sizes, and CUDA's `_int_mm` needs at least 17 rows)."""
    if torch.device(device).type != "cpu":
        raise PakarError(f"--quantize int8 runs on the CPU (PyTorch's int8 matrix products), not on {device}; "
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
    if _c_step() is None:
        print("pakar: int8 decodes through PyTorch operators, several times slower than its compiled step "
              "(pakar._int8step was not built: no C compiler when pakar was installed)", file=sys.stderr)
    return quantize_int8(model)
