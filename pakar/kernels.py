"""How the model runs fast and lean: the custom autograd functions and kernel checks under model.py and moe.py.

pakar/model.py and pakar/moe.py say what Qwen3-MoE computes; this module holds how parts of it run.
Each function here computes exactly the plain-torch expression named in its docstring (forward and
gradients; tests/test_kernels.py compares each with that expression) and exists only because the
plain expression costs time or memory, measured in benchmarks/bench_model.py (`--ablations` undoes
the choices one at a time). Nothing here knows the model's config or modules.

- Mixed precision is torch.autocast with float32 weights (`compute_dtype` says which dtype the
  matmuls run in). On a CPU, where elementwise passes cost as much as bfloat16 matmuls, two choices
  make bfloat16 pay: the fused head never converts full-size logits to float32, and RMSNorm keeps
  bfloat16 inputs in bfloat16 with a backward that saves only its input (on the CPU, F.rms_norm's
  autograd saves three float32 copies).
- `rms_norm`: F.rms_norm, with that lean backward (`_RMSNormFunction`) where it pays: CPU training.
- `linear_cross_entropy` (`LinearCrossEntropy`): lm_head and cross-entropy in one, chunk by chunk, so
  the (N, V) logits are never stored.
- `cat_cast` and `scatter_rows`: the MoE dispatch's weight cast and its scatter back to token order,
  each in one pass over the data and keeping nothing (cat_cast) or only an index (scatter_rows) for
  backward.
- `grouped_mm_available` and `grouped_mm_aligned`: where torch._grouped_mm can run; elsewhere the
  experts take their per-expert loop.
- Functions that have a torch.compile branch take the plain expression when compiling: the compiler
  fuses it by itself and chooses what to save.

Shape legend: N rows (tokens), D hidden, V vocabulary, C rows in a chunk, F rows in a gradient block,
M rows scattered, P rows they are scattered into.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: the autocast dtype inside an autocast region, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---- RMSNorm ----------------------------------------------------------------------------------------

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (x.shape[-1],), weight, eps): statistics in float32, the result in x's dtype
    (`weight` must already be in it)."""
    if x.device.type == "cpu" and _HAS_FUSED_RMS_NORM and torch.is_grad_enabled() \
            and (x.requires_grad or weight.requires_grad) and not torch.compiler.is_compiling():
        return _RMSNormFunction.apply(x, weight, eps)
    # fused kernels: CUDA's forward and backward, CPU inference; under torch.compile the
    # compiler fuses the decomposition itself and chooses what to save
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# ---- the fused head + loss ----------------------------------------------------------------------------

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


def _auto_chunk_rows(device: torch.device, vocab_size: int) -> int:
    # CPU: 2M logits (8 MiB in float32) per chunk stay in cache and were fastest in
    # benchmarks/bench_model.py (larger chunks lose more to memory traffic than they gain in
    # matmul efficiency); GPU: 32M, fewer and larger matmuls.
    elements = (2 << 20) if device.type == "cpu" else (32 << 20)
    return max(16, elements // vocab_size)


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, count): F.cross_entropy(h_ND @ weight_VD.T, targets_N, ignore_index=-100,
    reduction="sum") in float32, and the number of targets != -100, without the (N, V) logits.
    The matmuls run in the compute dtype (autocast's, if on); `chunk_rows` rows per chunk, None for
    a size that suits the device."""
    dtype = compute_dtype(h_ND)
    with torch.autocast(h_ND.device.type, enabled=False):  # the function picks its own precisions
        return LinearCrossEntropy.apply(h_ND.to(dtype), weight_VD, targets_N,
                                        chunk_rows or _auto_chunk_rows(h_ND.device, weight_VD.shape[0]))


# ---- MoE dispatch helpers -------------------------------------------------------------------------

class _CatCast(torch.autograd.Function):
    """torch.cat(tensors, dim).to(dtype) in one pass over the data (cat-then-cast or cast-then-cat
    would write and re-read an intermediate copy); the backward slices and casts the gradient back."""

    @staticmethod
    def forward(ctx, dim: int, dtype: torch.dtype, *tensors: torch.Tensor) -> torch.Tensor:
        shape = list(tensors[0].shape)
        shape[dim] = sum(t.shape[dim] for t in tensors)
        out = tensors[0].new_empty(shape, dtype=dtype)
        start = 0
        for t in tensors:
            out.narrow(dim, start, t.shape[dim]).copy_(t)
            start += t.shape[dim]
        ctx.dim, ctx.sizes, ctx.dtypes = dim, [t.shape[dim] for t in tensors], [t.dtype for t in tensors]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = grad.split(ctx.sizes, dim=ctx.dim)
        return (None, None, *(g.to(dt) for g, dt in zip(parts, ctx.dtypes)))


def cat_cast(tensors: tuple[torch.Tensor, ...], dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Weights concatenated along `dim` and cast to `dtype` in a single copy. Under autocast every
    weight is cast each step anyway; doing it into one matrix lets several matmuls run as one."""
    if torch.compiler.is_compiling():  # the compiler fuses cat and cast into one kernel by itself
        return torch.cat(tensors, dim=dim).to(dtype)
    return _CatCast.apply(dim, dtype, *tensors)


class _ScatterRows(torch.autograd.Function):
    """out = zeros(rows, D) with out[index] = x, for distinct indices (rows == M: a permutation, no
    zero fill needed). Autograd's index_copy keeps the whole source for its backward; this keeps only
    the index (the backward is a gather)."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, index_M: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index_M)
        out = x_MD.new_empty(rows, x_MD.shape[1]) if rows == x_MD.shape[0] else x_MD.new_zeros(rows, x_MD.shape[1])
        return out.index_copy_(0, index_M, x_MD)

    @staticmethod
    def backward(ctx, grad_PD: torch.Tensor):
        (index_M,) = ctx.saved_tensors
        return grad_PD.index_select(0, index_M), None, None


def scatter_rows(x_MD: torch.Tensor, index_M: torch.Tensor, rows: int) -> torch.Tensor:
    """x_MD.new_zeros(rows, D).index_copy(0, index_M, x_MD), for distinct indices: (P, D), P = rows."""
    return _ScatterRows.apply(x_MD, index_M, rows)


def grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can run on `x`'s device and dtype here: float32/bfloat16 on CPU
    (torch >= 2.8; float32 fails under torch.compile, so compiled float32 takes the loop) and bfloat16
    on Hopper or newer GPUs."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not torch.compiler.is_compiling())
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def grouped_mm_aligned(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned data and row strides (a hidden size of 70 in float32
    is not); such shapes take the loop. Reads only metadata: no device synchronisation. (Under
    torch.compile data pointers do not exist yet; the compiler's buffers are aligned.)"""
    compiling = torch.compiler.is_compiling()
    return all((compiling or t.data_ptr() % 16 == 0)
               and all((st * t.element_size()) % 16 == 0 for st in t.stride() if st != 1) for t in tensors)
