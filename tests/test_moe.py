"""The MoE block against independent references: a per-token Python oracle, the per-expert loop,
a dense SwiGLU MLP, Hugging Face's load-balancing loss, and hand-computed invariants."""

import pytest
import torch
import torch.nn.functional as F

from pakar import PakarError
from pakar.config import get_config
from pakar.kernels import grouped_mm_available
from pakar.moe import MoE, expert_load_stats, update_expert_bias


def make_moe(seed=0, **overrides) -> MoE:
    cfg = get_config("tiny", **overrides)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2, generator=g)
    return moe


def oracle(moe: MoE, x_ND: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, straight from the definitions (float64)."""
    w_router = moe.gate.weight.double()
    gate, up, down = (p.double() for p in (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj))
    out = []
    for x in x_ND.double():
        probs = torch.softmax(w_router @ x, dim=-1)
        chosen = torch.topk(probs.float() + moe.gate.expert_bias, moe.top_k).indices
        weights = probs[chosen]
        if moe.gate.norm_topk_prob:
            weights = weights / weights.sum()
        y = torch.zeros_like(x)
        for e, w in zip(chosen.tolist(), weights):
            y += w * (down[e] @ (F.silu(gate[e] @ x) * (up[e] @ x)))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("k,norm", [(1, False), (2, False), (2, True), (4, True)])
def test_moe_matches_per_token_oracle(k, norm):
    moe = make_moe(num_experts_per_tok=k, norm_topk_prob=norm)
    x = torch.randn(3, 11, moe.gate.weight.shape[1])
    y, _, _ = moe(x)
    ref = oracle(moe, x.view(-1, x.shape[-1])).view_as(y)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_top1_gate_is_the_unrenormalised_probability():
    moe = make_moe(num_experts_per_tok=1)
    x = torch.randn(17, moe.gate.weight.shape[1])
    logits, probs, idx, weight = moe.gate(x)
    torch.testing.assert_close(weight.squeeze(1), probs.max(dim=-1).values)
    assert (weight < 1).all()  # renormalising would make every gate exactly 1.0
    with pytest.raises(PakarError, match="norm_topk_prob"):
        get_config("tiny", num_experts_per_tok=1, norm_topk_prob=True)


def test_router_runs_in_float32_under_autocast():
    moe = make_moe(num_experts_per_tok=2)
    x = torch.randn(9, moe.gate.weight.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, _, weight = moe.gate(x)
    assert logits.dtype == probs.dtype == weight.dtype == torch.float32
    torch.testing.assert_close(logits, x @ moe.gate.weight.T)


def _run(moe, x, grouped: bool, autocast: bool):
    moe.experts.use_grouped_mm = grouped
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, bal, z = moe(x)
    # a loss whose gradient is not a broadcast constant (and uses every output)
    (y.float().pow(2).sum() + bal + z).backward()
    return y.detach().float(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_grouped_mm_equals_loop_forward_and_gradients(k, autocast):
    dtype = torch.bfloat16 if autocast else torch.float32
    if not grouped_mm_available(torch.empty(0, dtype=dtype)):
        pytest.skip(f"torch._grouped_mm unavailable for {dtype} here")
    moe = make_moe(num_experts_per_tok=k)
    moe.gate.expert_bias[-1] = -10.0  # the last expert never gets a token
    x = torch.randn(4, 13, moe.gate.weight.shape[1])
    y1, gx1, g1 = _run(moe, x, grouped=True, autocast=autocast)
    y2, gx2, g2 = _run(moe, x, grouped=False, autocast=autocast)
    assert moe.last_counts[-1] == 0
    # bfloat16: the two paths round differently; compare relative to each tensor's norm
    tol = 1e-2 if autocast else 1e-6
    assert g1.keys() == g2.keys() and all(g is not None for g in g1.values())
    for name, a, b in [("y", y1, y2), ("x.grad", gx1, gx2)] + [(n, g1[n], g2[n]) for n in g1]:
        assert ((a - b).norm() / b.norm()).item() < tol, name
    for name in ("experts.gate_proj", "experts.up_proj", "experts.down_proj"):
        assert g1[name][-1].abs().max() == 0 and g2[name][-1].abs().max() == 0  # present, and zero


def test_backward_from_a_plain_sum():
    # torch._grouped_mm's backward rejects broadcast (stride-0) gradients; the block must not expose it
    moe = make_moe(num_experts_per_tok=2)
    x = torch.randn(2, 5, moe.gate.weight.shape[1], requires_grad=True)
    moe(x)[0].sum().backward()
    assert x.grad is not None and moe.experts.down_proj.grad is not None


def test_one_expert_equals_dense_swiglu_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

    moe = make_moe(num_experts=1, num_experts_per_tok=1)
    cfg = transformers.Qwen3MoeConfig(hidden_size=moe.gate.weight.shape[1], hidden_act="silu")
    mlp = Qwen3MoeMLP(cfg, intermediate_size=moe.experts.gate_proj.shape[1])
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(moe.experts.gate_proj[0])
        mlp.up_proj.weight.copy_(moe.experts.up_proj[0])
        mlp.down_proj.weight.copy_(moe.experts.down_proj[0])
    x = torch.randn(2, 7, moe.gate.weight.shape[1])
    y, balance, _ = moe(x)
    torch.testing.assert_close(y, mlp(x), rtol=1e-5, atol=1e-6)  # softmax over one expert is exactly 1
    assert balance.item() == pytest.approx(1.0)


def _one_hot_routing_moe(k: int) -> tuple[MoE, torch.Tensor]:
    """4 experts whose router rows are basis vectors, and 16 tokens spread so each expert gets
    exactly 16 * k / 4 of the assignments."""
    moe = make_moe(num_experts=4, num_experts_per_tok=k)
    D = moe.gate.weight.shape[1]
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :4] = 3.0 * torch.eye(4)
    x = torch.zeros(16, D)
    for t in range(16):
        x[t, t % 4] = 1.0
        if k == 2:
            x[t, (t + 1) % 4] = 0.5
    return moe, x.view(1, 16, D)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_is_one_under_uniform_routing(k):
    moe, x = _one_hot_routing_moe(k)
    _, balance, _ = moe(x)
    assert moe.last_counts.tolist() == [4 * k] * 4
    assert balance.item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_when_everything_goes_to_one_expert():
    moe, x = _one_hot_routing_moe(1)
    moe.gate.expert_bias[:] = torch.tensor([5.0, 0.0, 0.0, 0.0])  # selection only: all to expert 0
    _, balance, _ = moe(x)
    _, probs, _, _ = moe.gate(x.view(-1, x.shape[-1]))
    assert moe.last_counts.tolist() == [16, 0, 0, 0]
    assert balance.item() == pytest.approx(4 * probs[:, 0].mean().item(), rel=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_loss_matches_hugging_face(k):
    pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    moe = make_moe(num_experts_per_tok=k)
    x = torch.randn(3, 20, moe.gate.weight.shape[1])
    _, balance, _ = moe(x)
    logits, _, _, _ = moe.gate(x.view(-1, x.shape[-1]))
    # HF's fractions sum to k over experts (ours to 1, so that uniform routing gives 1.0 for any k)
    hf = load_balancing_loss_func((logits,), moe.num_experts, k)
    assert balance.item() == pytest.approx(hf.item() / k, rel=1e-5)


def test_z_loss_is_mean_squared_logsumexp():
    moe = make_moe()
    x = torch.randn(2, 9, moe.gate.weight.shape[1])
    _, _, z = moe(x)
    logits = x.view(-1, x.shape[-1]).double() @ moe.gate.weight.double().T
    ref = torch.log(torch.exp(logits).sum(-1)).pow(2).mean()
    assert z.item() == pytest.approx(ref.item(), rel=1e-5)


def test_counts_are_the_routing_histogram():
    moe = make_moe(num_experts_per_tok=2)
    x = torch.randn(5, 8, moe.gate.weight.shape[1])
    moe(x)
    _, _, idx, _ = moe.gate(x.view(-1, x.shape[-1]))
    assert moe.last_counts.tolist() == torch.bincount(idx.flatten(), minlength=moe.num_experts).tolist()
    assert not moe.last_counts.requires_grad


def test_selection_bias_changes_choice_not_gate_value():
    moe = make_moe(num_experts_per_tok=1)
    x = torch.randn(10, moe.gate.weight.shape[1])
    moe.gate.expert_bias[2] = 10.0
    _, probs, idx, weight = moe.gate(x)
    assert (idx.squeeze(1) == 2).all()
    torch.testing.assert_close(weight.squeeze(1), probs[:, 2])  # the unbiased probability
    ref = oracle(moe, x)
    torch.testing.assert_close(moe(x.unsqueeze(0))[0].squeeze(0).double(), ref, rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())


def test_update_expert_bias_sign_and_zero_mean():
    moes = [make_moe(num_experts=4), make_moe(num_experts=4)]
    loads = torch.tensor([[10, 0, 5, 5], [1, 2, 3, 6]])
    update_expert_bias(moes, loads, rate=0.01)
    # layer 0: overloaded expert 0 goes down, idle expert 1 goes up, the two at the mean stay put
    torch.testing.assert_close(moes[0].gate.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    # layer 1 (mean 3): +r, +r, 0, -r, then centred
    torch.testing.assert_close(moes[1].gate.expert_bias, torch.tensor([0.0075, 0.0075, -0.0025, -0.0125]))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        update_expert_bias(moes, torch.randint(0, 100, (2, 4), generator=g), rate=0.003)
    for m in moes:
        assert abs(m.gate.expert_bias.mean().item()) < 1e-7
    with pytest.raises(ValueError, match="layers"):
        update_expert_bias(moes, loads[:1], rate=0.01)


@pytest.mark.parametrize("training", [False, True])
def test_forward_never_touches_the_bias(training):
    moe = make_moe()
    moe.gate.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.2]))
    before = moe.gate.expert_bias.clone()
    moe.train(training)
    x = torch.randn(2, 6, moe.gate.weight.shape[1], requires_grad=training)
    y, bal, z = moe(x)
    if training:
        (y.sum() + bal + z).backward()
    assert torch.equal(moe.gate.expert_bias, before)


def test_bias_balancing_evens_out_a_skewed_router():
    """End to end: with the sign update applied on every step, a router that sends most tokens to
    one expert becomes (close to) balanced without any gradient step."""
    moe = make_moe(num_experts=4, num_experts_per_tok=1)
    with torch.no_grad():
        moe.gate.weight[0] += 1.0  # expert 0 wins most tokens
    x = torch.randn(1, 256, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
    moe(x)
    start = expert_load_stats(moe.last_counts[None])["imbalance_max"]
    history = []
    for _ in range(80):
        update_expert_bias([moe], moe.last_counts[None], rate=0.01)
        moe(x)
        history.append(expert_load_stats(moe.last_counts[None])["imbalance_max"])
    assert start > 1.5 and sum(history[-10:]) / 10 < 1.15


def test_expert_load_stats():
    s = expert_load_stats(torch.tensor([[4, 4, 4, 4], [16, 0, 0, 0], [0, 0, 0, 0]]))
    assert s["fraction"] == [[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.0] * 4]
    assert s["imbalance"] == [1.0, 4.0, 0.0]
    assert s["imbalance_max"] == 4.0 and s["imbalance_mean"] == pytest.approx(5 / 3)
    assert s["idle_experts"] == [0, 3, 4]
    with pytest.raises(ValueError):
        expert_load_stats(torch.tensor([1, 2, 3]))


@pytest.mark.slow
def test_compiled_bf16_moe_equals_eager():
    """torch.compile (the training loop's --compile) runs the grouped bfloat16 path as one graph; its
    fused kernels round differently, so compare relative to the norm, forward and gradients."""
    moe = make_moe(num_experts_per_tok=2)
    x = torch.randn(2, 48, moe.gate.weight.shape[1])
    y_ref, gx_ref, g_ref = _run(moe, x, grouped=True, autocast=True)
    compiled = torch.compile(moe)
    moe.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, bal, z = compiled(xc)
    (y.float().pow(2).sum() + bal + z).backward()
    pairs = [("y", y.detach().float(), y_ref), ("x.grad", xc.grad, gx_ref)]
    pairs += [(n, p.grad, g_ref[n]) for n, p in moe.named_parameters()]
    for name, a, b in pairs:
        assert ((a - b).norm() / b.norm()).item() < 1e-2, name


# ---- GPU: skipped, never faked, without one -------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_grouped_mm_equals_loop_in_bf16(k):
    moe = make_moe(num_experts_per_tok=k).cuda()
    x = torch.randn(4, 33, moe.gate.weight.shape[1], device="cuda")
    if not grouped_mm_available(x.bfloat16()):
        pytest.skip("bfloat16 grouped matmul needs a Hopper (sm90) or newer GPU")
    moe.gate.expert_bias[-1] = -10.0
    y1, gx1, g1 = _run_cuda(moe, x, True)
    y2, gx2, g2 = _run_cuda(moe, x, False)
    for name, a, b in [("y", y1, y2), ("x.grad", gx1, gx2)] + [(n, g1[n], g2[n]) for n in g1]:
        assert ((a - b).norm() / b.norm()).item() < 1e-2, name
    assert g1["experts.down_proj"][-1].abs().max() == 0


def _run_cuda(moe, x, grouped):
    moe.experts.use_grouped_mm = grouped
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, bal, z = moe(x)
    (y.float().pow(2).sum() + bal + z).backward()
    return y.detach().float(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()}


@cuda
def test_cuda_grouped_path_never_waits_for_the_host():
    moe = make_moe(num_experts_per_tok=2).cuda()
    x = torch.randn(4, 33, moe.gate.weight.shape[1], device="cuda", requires_grad=True)
    if not grouped_mm_available(x.bfloat16()):
        pytest.skip("bfloat16 grouped matmul needs a Hopper (sm90) or newer GPU")
    _run_cuda(moe, x, True)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, bal, z = moe(x)
        (y.float().pow(2).sum() + bal + z).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
