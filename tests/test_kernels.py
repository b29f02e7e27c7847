"""Each function in pakar/kernels.py against the plain-torch expression it replaces (forward values and
gradients, float32 and bfloat16), and what each promises to keep for backward (autograd's saved
tensors, read through torch.autograd.graph.saved_tensors_hooks)."""

import pytest
import torch
import torch.nn.functional as F

from pakar.kernels import (LinearCrossEntropy, cat_cast, compute_dtype, grouped_mm_aligned, linear_cross_entropy,
                           rms_norm, scatter_rows)

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


def saved_by(fn):
    """fn()'s result and the tensors autograd saved for its backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def leaf(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


# ---- rms_norm -------------------------------------------------------------------------------------

def rms_norm_formula(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The definition, in float64."""
    x, w = x.double(), w.double()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


@DTYPES
def test_rms_norm_forward_and_gradients_match_the_formula(dtype):
    x, w, eps = leaf(3, 7, 64, dtype=dtype, seed=1), leaf(64, dtype=dtype, seed=2), 1e-6
    g = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = rms_norm(x, w, eps)
    assert type(y.grad_fn).__name__ == "_RMSNormFunctionBackward"  # the lean path runs on the CPU
    assert y.dtype == dtype
    gx, gw = torch.autograd.grad(y, (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = rms_norm_formula(x64, w64, eps)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x64, w64), g.double())
    # float32: rounding only; bfloat16: one rounding of each result (statistics are float32 inside)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in (("y", y, ref), ("x.grad", gx, gx_ref), ("w.grad", gw, gw_ref)):
        assert a.dtype == dtype, name
        assert rel_err(a, b) < tol, name
    torch.testing.assert_close(y, F.rms_norm(x, (64,), w, eps))  # training = inference forward
    with torch.no_grad():  # inference runs F.rms_norm itself
        torch.testing.assert_close(rms_norm(x, w, eps), F.rms_norm(x, (64,), w, eps), rtol=0, atol=0)


@DTYPES
def test_rms_norm_backward_keeps_only_its_input(dtype):
    x, w = leaf(4, 9, 32, dtype=dtype), leaf(32, dtype=dtype)
    _, saved = saved_by(lambda: rms_norm(x, w, 1e-6))
    activation_sized = [t for t in saved if t.numel() == x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0].dtype == dtype  # x itself, not a float32 copy
    assert sum(t.numel() for t in saved) == x.numel() + w.numel() + 4 * 9  # + weight, + 1/rms per row


# ---- linear_cross_entropy -------------------------------------------------------------------------

N, D, V = 50, 24, 97


def head_inputs(ignored: int = 6):
    h, w = leaf(N, D, seed=4), leaf(V, D, seed=5)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(6))
    t[:ignored] = -100
    return h, w, t


def plain_head(h, w, t):
    """The expression the fused head replaces, in float64: (loss sum, its gradients)."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.T, t, ignore_index=-100, reduction="sum")
    return loss, torch.autograd.grad(loss, (h64, w64))


@pytest.mark.parametrize("chunk", [1, 7, N, 1000, None], ids=lambda c: f"chunk{c}")
def test_linear_cross_entropy_matches_cross_entropy(chunk):
    h, w, t = head_inputs()
    loss, count = linear_cross_entropy(h, w, t, chunk)
    ref, (gh_ref, gw_ref) = plain_head(h, w, t)
    assert count.item() == N - 6 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    gh, gw = torch.autograd.grad(loss * 0.37, (h, w))  # the upstream gradient scales both
    assert rel_err(gh, 0.37 * gh_ref) < 1e-6 and rel_err(gw, 0.37 * gw_ref) < 1e-6
    assert gh[:6].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("needs", ["hidden-only", "weight-only", "none"])
def test_linear_cross_entropy_computes_only_the_gradients_asked_for(needs):
    h, w, t = head_inputs()
    ref, (gh_ref, gw_ref) = plain_head(h, w, t)
    h.requires_grad_(needs == "hidden-only")
    w.requires_grad_(needs == "weight-only")
    loss, _ = linear_cross_entropy(h, w, t, 16)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    if needs == "none":
        assert not loss.requires_grad
        return
    loss.backward()
    x, g_ref, other = (h, gh_ref, w) if needs == "hidden-only" else (w, gw_ref, h)
    assert rel_err(x.grad, g_ref) < 1e-6 and other.grad is None


def test_linear_cross_entropy_with_every_target_ignored_is_zero():
    h, w, t = head_inputs(ignored=N)
    loss, count = linear_cross_entropy(h, w, t, 16)
    loss.backward()
    assert loss.item() == 0 and count.item() == 0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("chunks_per_block", [None, 2, 1], ids=["one-block", "two-chunk-blocks", "one-chunk-blocks"])
def test_linear_cross_entropy_under_bf16_autocast_is_as_accurate_as_the_plain_head(chunks_per_block, monkeypatch):
    """bfloat16 matmuls, float32 softmax, and the head-weight gradient accumulated in float32 once per
    block of chunks (16-row chunks: 4 of them, the last one ragged): at least as close to the float64
    answer as the plain bfloat16 head, and the weight gradient leaves in the weight's float32."""
    if chunks_per_block:
        monkeypatch.setattr(LinearCrossEntropy, "BLOCK_ELEMENTS", chunks_per_block * 16 * V)
    h, w, t = head_inputs()
    ref, (gh_ref, gw_ref) = plain_head(h, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, t, 16)
        plain = F.cross_entropy((h @ w.T).float(), t, ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(loss, (h, w))
    gh_plain, gw_plain = torch.autograd.grad(plain, (h, w))
    assert loss.dtype == torch.float32 and gw.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 2 * abs(plain.item() - ref.item()) + 1e-3 * abs(ref.item())
    for name, a, a_plain, b in (("h.grad", gh, gh_plain, gh_ref), ("w.grad", gw, gw_plain, gw_ref)):
        assert rel_err(a, b) < 1.5 * rel_err(a_plain, b) + 1e-3, name


# ---- cat_cast and scatter_rows --------------------------------------------------------------------

@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["to-bfloat16", "same-dtype"])
def test_cat_cast_equals_cat_then_cast(dim, dtype):
    shapes = [[4, 3, 5] for _ in range(3)]
    for i, s in enumerate(shapes):
        s[dim] = 2 + i  # different sizes along the concatenated dimension
    parts = [leaf(*s, seed=i) for i, s in enumerate(shapes)]
    out, saved = saved_by(lambda: cat_cast(tuple(parts), dim, dtype))
    ref = torch.cat(parts, dim=dim).to(dtype)
    assert out.dtype == dtype and torch.equal(out, ref)
    assert saved == []  # the backward needs only the sizes and dtypes
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    for a, b in zip(torch.autograd.grad(out, parts, g), torch.autograd.grad(ref, parts, g)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@DTYPES
@pytest.mark.parametrize("rows", [10, 17], ids=["permutation", "into-more-rows"])
def test_scatter_rows_equals_index_copy(rows, dtype):
    x = leaf(10, 6, dtype=dtype)
    index = torch.randperm(rows, generator=torch.Generator().manual_seed(7))[:10]
    out, saved = saved_by(lambda: scatter_rows(x, index, rows))
    ref = x.new_zeros(rows, 6).index_copy(0, index, x)
    assert torch.equal(out, ref)
    assert len(saved) == 1 and saved[0] is index  # only the index, never the (M, D) source
    g = torch.randn(rows, 6, generator=torch.Generator().manual_seed(8)).to(dtype)
    (a,), (b,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, x, g)
    assert torch.equal(a, b)


# ---- dtype and grouped-matmul checks --------------------------------------------------------------

def test_compute_dtype_follows_autocast():
    x = torch.zeros(2, 3)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert compute_dtype(x) == torch.float32


def test_grouped_mm_aligned_needs_16_byte_rows_and_data():
    assert grouped_mm_aligned(torch.zeros(3, 64), torch.zeros(2, 8, 4))
    assert not grouped_mm_aligned(torch.zeros(3, 70))  # 280-byte rows
    assert grouped_mm_aligned(torch.zeros(3, 72, dtype=torch.bfloat16))  # 144-byte rows
    assert not grouped_mm_aligned(torch.zeros(3, 72, dtype=torch.bfloat16)[:, 1:])  # starts 2 bytes in
    assert not grouped_mm_aligned(torch.zeros(3, 64), torch.zeros(3, 70))  # every tensor must be

