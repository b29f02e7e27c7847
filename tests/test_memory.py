"""Memory plans (pakar.memory, pakar.optim) against independent references: the predicted parameter and
optimizer-state bytes against the tensors a real optimizer holds after a step (counted), the 8-bit
AdamW against torch's float32 AdamW, offload against the full plan (the same fused kernel on a copy:
bit-identical on a CPU), resume replayed exactly, auto's choice and refusal, `pakar info --gpu-memory`."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from pakar import PakarError, cli
from pakar.args import TrainArgs
from pakar.checkpoint import safe_load
from pakar.config import get_config
from pakar.memory import (PLANS, adam8bit_state_bytes, choose, make_optimizer, param_tensors, predict,
                          resolve_plan, to_bf16)
from pakar.model import Transformer
from pakar.optim import Adam8bit, _Codes, dynamic_map, stochastic_round_bf16
from pakar.train import train
from test_train_safety import assert_same_weights, small_args

TINY = get_config("tiny", vocab_size=512)


def one_step(plan: str, seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(TINY)
    opt = make_optimizer(model, plan, 1e-3, 0.1, torch.device("cpu"))
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    model(x, x, loss_reduction="sum").loss.backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("tied", [False, True])
def test_param_tensors_match_the_model(tied):
    cfg = TINY.replace(tie_word_embeddings=tied)
    real = [(n, p.numel()) for n, p in Transformer(cfg).named_parameters()]
    assert [(n, k) for n, k, _, _ in param_tensors(cfg)] == real


def state_bytes(opt, keys) -> int:
    """Bytes of the optimizer's state tensors under `keys` (the moments, codes, scales, master weights;
    the per-tensor step counters are not memory worth predicting)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if k in keys and torch.is_tensor(v))


@pytest.mark.parametrize("plan", PLANS)
def test_state_bytes_equal_the_prediction(plan):
    model, opt = one_step(plan)
    pr = predict(TINY, plan, 2, 16, device_type="cpu", bf16=False)["breakdown"]
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == pr["weights"]
    assert all(len(st) for st in opt.state.values()) and len(opt.state) == len(list(model.parameters()))
    if plan == "full":
        assert state_bytes(opt, ("exp_avg", "exp_avg_sq")) == pr["optimizer_state"]
    elif plan == "lowmem":
        keys = ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_scale", "exp_avg_sq_codes", "exp_avg_sq_scale")
        assert state_bytes(opt, keys) == pr["optimizer_state"]
        # tiny has both kinds: 8-bit (q_proj, 4,096 elements) and float32 moments (norms, k_proj)
        kinds = {("exp_avg_codes" in st) for st in opt.state.values()}
        assert kinds == {True, False}
        assert pr["optimizer_state"] < 8 * sum(p.numel() for p in model.parameters()) / 2
    else:
        assert state_bytes(opt, ("master",)) == pr["host_master_weights"]
        assert state_bytes(opt, ("exp_avg", "exp_avg_sq")) == pr["host_optimizer_state"]
        assert all(v.device.type == "cpu" for st in opt.state.values() for v in st.values())


def test_bf16_weight_prediction_matches_the_converted_model():
    """lowmem/offload on a bf16 GPU store the matmul weights in bfloat16 (to_bf16): the prediction's
    weight bytes count the converted model's parameters."""
    model = Transformer(TINY)
    to_bf16(model)
    pr = predict(TINY, "lowmem", 2, 16, device_type="cuda", bf16=True)["breakdown"]
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == pr["weights"] == pr["gradients"]
    assert "autocast_copies" not in pr  # the bf16 weights are their own autocast copies
    assert model.embed_tokens.weight.dtype == model.layers[0].mlp.gate.weight.dtype == torch.float32


def test_dynamic_map_and_quantization_error():
    for signed in (True, False):
        m = dynamic_map(signed)
        assert m.numel() == 256 and torch.all(m[1:] > m[:-1]) and m.max() == 1 and (m.min() < 0) == signed
    codes = _Codes(True, "cpu")
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-4, 0, 1000)
    c, s = codes.quantize(x, 256)
    back = codes.dequantize(c, s, 256)
    assert c.dtype == torch.uint8 and s.numel() == 4
    # each value lands on its nearest code: the error is at most half the widest gap times the block scale,
    # or, for a negative block maximum, the distance from -1 to the lowest code (the map has +1, not -1)
    gap = max((codes.values[1:] - codes.values[:-1]).max() / 2, 1 + codes.values.min())
    blocks = torch.nn.functional.pad(x, (0, 24)).view(-1, 256).abs().amax(1).repeat_interleave(256)[:1000]
    assert torch.all((back - x).abs() <= gap * blocks * (1 + 1e-5))  # (float rounding of the bound itself)
    top = x.abs().argmax()
    assert x[top] < 0 or torch.equal(back[top], x[top])  # a positive block maximum is exact


def adamw_oracle(params, grads_per_step, lr=1e-2, wd=0.1):
    """torch's float32 AdamW (single-tensor loop), the reference."""
    ps = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, foreach=False)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def run_adam8bit(params, grads_per_step, min_8bit, lr=1e-2, wd=0.1, chunk=512):
    ps = [p.clone().requires_grad_() for p in params]
    opt = Adam8bit(ps, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, block=256, min_8bit=min_8bit, chunk=chunk)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def test_adam8bit_against_float32_adamw():
    torch.manual_seed(0)
    params = [torch.randn(1000), torch.randn(30, 70)]
    steps = [[torch.randn_like(p) * (1 + i % 3) for p in params] for i in range(20)]
    ref = adamw_oracle(params, steps)
    # float32 moments (everything below min_8bit): the same update up to float rounding
    for a, b in zip(run_adam8bit(params, steps, min_8bit=10**9), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # 8-bit moments, several chunks: the update stays within a few percent of float32 AdamW's
    for a, b, p0 in zip(run_adam8bit(params, steps, min_8bit=1), ref, params):
        rel = (a - b).norm() / (b - p0).norm()
        assert rel < 0.05, rel


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-10)  # between the bf16 neighbours 1.0 and 1.0078125
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert r.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)  # round-to-nearest would give 1.0
    assert torch.equal(stochastic_round_bf16(torch.tensor([1.5, -2.25]), torch.Generator()).float(),
                       torch.tensor([1.5, -2.25]))  # representable values stay


def test_bf16_weights_train_and_save_float32(tmp_path):
    """The bf16-weight path of lowmem (what a bf16 GPU gets), run on this CPU under bf16 autocast: the
    weights stay bfloat16 and move, the loss falls, and the saved state is float32."""
    import pakar.distributed as dist_ctx

    torch.manual_seed(0)
    model = Transformer(TINY)
    to_bf16(model)
    before = model.layers[0].self_attn.q_proj.weight.detach().clone()
    opt = Adam8bit([p for p in model.parameters()], lr=3e-3, block=256, min_8bit=4096, chunk=1 << 20)
    x = torch.randint(0, TINY.vocab_size, (4, 32))
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    q = model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16 and not torch.equal(q, before) and losses[-1] < losses[0]
    ctx = dist_ctx.Context(device=torch.device("cpu"))
    assert all(v.dtype == torch.float32 for v in ctx.full_state(model, None)["model"].values() if v.is_floating_point())


def test_offload_on_a_cpu_equals_full_bit_for_bit(tmp_path):
    """On a CPU, offload runs torch's fused AdamW on a float32 copy: the same numbers as the full plan."""
    full = train(small_args(tmp_path / "full", max_steps=6, memory_plan="full"))
    off = train(small_args(tmp_path / "off", max_steps=6, memory_plan="offload"))
    assert off["final_train_loss"] == full["final_train_loss"]
    assert_same_weights(tmp_path / "full" / "checkpoints" / "state.pt", tmp_path / "off" / "checkpoints" / "state.pt")
    assert "on a CPU device offload saves nothing" in (tmp_path / "off" / "training.log").read_text()


@pytest.mark.parametrize("plan", ["lowmem", "offload"])
def test_resume_within_a_plan_is_exact(tmp_path, monkeypatch, plan):
    """Stopped by SIGINT after step 4 of 8 (as tests/test_train_safety.py does) and resumed with the
    same flags: bit-identical to the uninterrupted run. Resuming with another plan: one line."""
    import pakar.train as T

    train(small_args(tmp_path / "ref", max_steps=8, memory_plan=plan))
    real_make, stepped = T.make_optimizer, [0]

    def make_optimizer(*a, **kw):
        opt = real_make(*a, **kw)

        def interrupt(*_):
            stepped[0] += 1
            if stepped[0] == 4:
                os.kill(os.getpid(), signal.SIGINT)
        opt.register_step_post_hook(interrupt)
        return opt

    monkeypatch.setattr(T, "make_optimizer", make_optimizer)
    out = tmp_path / "run"
    assert train(small_args(out, max_steps=8, memory_plan=plan))["steps"] == 4
    monkeypatch.setattr(T, "make_optimizer", real_make)
    # resumed with --memory-plan auto: auto keeps the plan the state was trained with
    assert train(small_args(out, max_steps=8, memory_plan="auto", resume=True))["steps"] == 8
    assert f"memory plan {plan}: the plan the resumed state was trained with" in (out / "training.log").read_text()
    assert_same_weights(tmp_path / "ref" / "checkpoints" / "state.pt", out / "checkpoints" / "state.pt")
    saved = safe_load(out / "checkpoints" / "state.pt")
    assert all(v.dtype == torch.float32 for v in saved["model"].values() if v.is_floating_point())
    assert {g["memory_plan"] for g in saved["optimizer"]["param_groups"]} == {plan}
    other = "full" if plan == "lowmem" else "lowmem"
    with pytest.raises(PakarError, match=f"trained with --memory-plan {plan}, this run uses {other}"):
        train(small_args(out, max_steps=10, memory_plan=other, resume=True))


def test_auto_chooses_the_fastest_plan_that_fits():
    cfg = get_config("default")
    kw = dict(device_type="cuda", bf16=True, activation_checkpointing=False)
    peak = {p: predict(cfg, p, 2, 256, **kw) for p in PLANS}
    assert peak["full"]["peak_bytes"] > peak["lowmem"]["peak_bytes"] > peak["offload"]["peak_bytes"]
    big = 64 * 2**30
    assert choose(cfg, 2, 256, free_bytes=big, host_free_bytes=big, **kw)[0] == "full"
    plan, why = choose(cfg, 2, 256, free_bytes=peak["lowmem"]["peak_bytes"], host_free_bytes=big, **kw)
    assert plan == "lowmem" and "full would need" in why
    assert choose(cfg, 2, 256, free_bytes=peak["lowmem"]["peak_bytes"] - 1, host_free_bytes=big, **kw)[0] == "offload"
    # offload needs the host RAM for its masters and moments
    with pytest.raises(PakarError) as e:
        choose(cfg, 2, 256, free_bytes=peak["lowmem"]["peak_bytes"] - 1, host_free_bytes=2**30, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "the smallest, offload" in msg
    assert f"{peak['offload']['peak_bytes'] / 2**30:.2f} GiB" in msg
    for remedy in ("--batch", "--seq-len", "--activation-checkpointing", "--fsdp"):
        assert remedy in msg


def test_auto_in_a_run_logs_its_choice_and_refuses_before_training(tmp_path, monkeypatch):
    import pakar.memory as M

    model = Transformer(TINY)
    args = small_args(tmp_path / "a")
    pr = {p: predict(TINY, p, 2, 32, device_type="cpu", bf16=False) for p in PLANS}
    held = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(M, "free_memory", lambda device: (pr["lowmem"]["peak_bytes"] - held, 2**40))
    plan, why = resolve_plan(args, TINY, model, torch.device("cpu"), bf16=False)
    assert plan == "lowmem" and why.startswith("auto: memory plan lowmem")
    monkeypatch.setattr(M, "free_memory", lambda device: (2**20, 2**20))
    with pytest.raises(PakarError, match="no memory plan fits"):
        train(small_args(tmp_path / "b", max_steps=2))
    assert not (tmp_path / "b" / "checkpoints" / "state.pt").exists()


def test_memory_plan_flag_is_checked():
    with pytest.raises(PakarError, match="--memory-plan must be one of auto, full, lowmem, offload"):
        TrainArgs(memory_plan="tiny")
    with pytest.raises(PakarError, match="--fsdp or --deepspeed"):
        TrainArgs(memory_plan="offload", fsdp=True)


def test_info_gpu_memory_json(capsys):
    assert cli.main(["info", "--config", "default", "--gpu-memory", "12", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [p["name"] for p in r["plans"]] == list(PLANS)
    for p in r["plans"]:
        assert {"name", "peak_bytes", "host_bytes", "fits"} <= p.keys()
        assert p["fits"] == (p["peak_bytes"] <= 12 * 2**30)
    assert not r["plans"][0]["fits"] and any(p["fits"] for p in r["plans"])
    assert cli.main(["info", "--config", "tiny", "--gpu-memory", "1"]) == 0
    assert "lowmem" in capsys.readouterr().out
    assert cli.main(["info", "--gpu-memory", "-3"]) == 2


def test_bf16_on_a_cpu_without_native_bf16_warns_once(tmp_path, monkeypatch):
    import pakar.runtime as R

    monkeypatch.setattr(R, "cpu_bf16_native", lambda: False)
    train(small_args(tmp_path / "run", max_steps=1, dtype="bfloat16"))
    log = (tmp_path / "run" / "training.log").read_text()
    assert log.count("without native bfloat16") == 1 and "68 tokens/s" in log
    monkeypatch.setattr(R, "cpu_bf16_native", lambda: True)
    assert R.cpu_bf16_warning("bfloat16", torch.device("cpu")) is None
    monkeypatch.setattr(R, "cpu_bf16_native", lambda: False)
    assert R.cpu_bf16_warning("float32", torch.device("cpu")) is None


def test_adam8bit_state_bytes_rule():
    assert adam8bit_state_bytes(100) == 800 and adam8bit_state_bytes(4096) == 2 * (4096 + 4 * 16)
    assert adam8bit_state_bytes(5000) == 2 * (5000 + 4 * 20)
