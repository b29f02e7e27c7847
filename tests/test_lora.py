"""LoRA (pakar.lora): identity at initialisation, PEFT as the independent reference for the adapted
forward pass, frozen base weights, merged == unmerged, adapter files and `pakar lora-merge`."""

from __future__ import annotations

import copy

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import file_sha256, load_model, save_model
from pakar.config import get_config
from pakar.args import LoraSpec, parse_targets
from pakar.checkpoint import split_state
from pakar.lora import adapter_checkpoint, apply_lora, load_adapter, merge_adapter_file, merge_state, router_buffers
from pakar.model import Transformer

V = 300


@pytest.fixture()
def base_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_config("tiny", vocab_size=V)).eval()


def randomise_adapters(model: torch.nn.Module, std: float = 0.05) -> None:
    """B and the token-row deltas start at zero (identity); give them values that change the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_B", "delta")):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tokens(B=2, T=24, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_parse_targets_groups_and_errors():
    assert parse_targets(["attention"]) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert parse_targets("experts v_proj") == ("v_proj", "gate_proj", "up_proj", "down_proj")
    assert parse_targets(["all"]) == parse_targets(["attention", "experts"])
    with pytest.raises(PakarError, match="unknown target 'gate'"):
        parse_targets(["gate"])  # the router is not a LoRA target
    with pytest.raises(PakarError, match="--lora-rank"):
        LoraSpec(0, 8.0)
    with pytest.raises(PakarError, match="--lora-alpha"):
        LoraSpec(4, 0.0)


@pytest.mark.parametrize("targets", [("attention",), ("all",)])
def test_initialisation_leaves_outputs_unchanged(base_model, targets):
    x = tokens()
    ref = base_model(x).logits
    model = apply_lora(copy.deepcopy(base_model), LoraSpec(4, 8.0, targets, token_ids=(0, 5)))
    assert torch.equal(model(x).logits, ref)  # B = 0: exactly the base's outputs


def test_only_adapters_are_trainable_and_get_gradients(base_model):
    model = apply_lora(copy.deepcopy(base_model), LoraSpec(4, 8.0, ("all",), token_ids=(1, 2))).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # one A and one B for 4 projections and 3 expert tensors per layer, and the two token-row deltas
    assert trainable and all(n.endswith(("lora_A", "lora_B", "delta")) for n in trainable)
    assert len(trainable) == 2 * 7 * base_model.config.num_hidden_layers + 2
    x = tokens()
    model(x, x).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    # B = 0 at the start, so A's gradient is exactly zero and B's is not
    assert all(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith("lora_A"))
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    # a token-row delta gets exactly the gradient of its rows of the full matrix
    full = copy.deepcopy(base_model).train()
    full(x, x).loss.backward()
    head_delta = model.lm_head.parametrizations.weight[0].delta
    torch.testing.assert_close(head_delta.grad, full.lm_head.weight.grad[[1, 2]], atol=1e-6, rtol=1e-5)


def test_matches_peft_with_the_same_factors(base_model):
    """PEFT (an independent implementation: Linear layers and ParamWrapper for 3-D expert tensors)
    computes the same logits when given the same A and B."""
    peft = pytest.importorskip("peft")
    model = apply_lora(copy.deepcopy(base_model), LoraSpec(4, 8.0, ("all",)))
    randomise_adapters(model)
    _, adapters = split_state(model.state_dict())

    reference = peft.inject_adapter_in_model(peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]),
        copy.deepcopy(base_model))
    filled = 0
    with torch.no_grad():
        for name, module in reference.named_modules():
            if not isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) or "default" not in module.lora_A:
                continue
            if hasattr(module, "parameter_name"):  # expert tensor: PEFT keeps A as (E*R, I), B as (O, R*E)
                ab = adapters[name.split(".experts")[0] + ".experts." + module.parameter_name]
                E, R, I = ab["lora_A"].shape
                module.lora_A["default"].weight.copy_(ab["lora_A"].reshape(E * R, I))
                module.lora_B["default"].weight.copy_(ab["lora_B"].permute(1, 2, 0).reshape(-1, R * E))
            else:
                ab = adapters[name + ".weight"]
                module.lora_A["default"].weight.copy_(ab["lora_A"])
                module.lora_B["default"].weight.copy_(ab["lora_B"])
            filled += 1
    assert filled == len(adapters) == 7 * base_model.config.num_hidden_layers
    x = tokens()
    ours, theirs = model(x).logits, reference(x).logits
    assert (ours - base_model(x).logits).abs().max() > 1e-2  # the adapters do change the outputs
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouped", [True, False])
def test_merged_equals_unmerged(base_model, grouped):
    model = apply_lora(copy.deepcopy(base_model), LoraSpec(8, 4.0, ("all",), token_ids=(3, 7)))
    randomise_adapters(model)
    base_state, adapters = split_state(model.state_dict())
    # the frozen base is untouched, under its own key names
    assert base_state.keys() == base_model.state_dict().keys()
    assert all(torch.equal(base_state[k], v) for k, v in base_model.state_dict().items())
    merged = Transformer(base_model.config).eval()
    merged.load_state_dict(merge_state(base_state, adapters, 0.5))
    for m in (model, merged):
        for layer in m.layers:
            layer.mlp.experts.use_grouped_mm = grouped
    x = tokens(3, 40, seed=2)
    torch.testing.assert_close(merged(x).logits, model(x).logits, atol=2e-5, rtol=1e-5)


def test_bfloat16_autocast_runs_the_adapted_experts(base_model):
    """Under autocast the expert fold stays float32 and the dispatch casts it: close to float32."""
    model = apply_lora(copy.deepcopy(base_model), LoraSpec(4, 8.0, ("all",)))
    randomise_adapters(model)
    x = tokens()
    ref = model(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x).logits
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_adapter_file_merge_and_checks(tmp_path, base_model, sample_tokenizer, capsys):
    from pakar.cli import main as cli

    cfg = get_config("tiny", vocab_size=sample_tokenizer.vocab_size)
    torch.manual_seed(3)
    base = Transformer(cfg).eval()
    base_path = tmp_path / "base.pt"
    save_model(base_path, base.state_dict(), cfg, sample_tokenizer.to_json(), config_name="tiny")
    spec = LoraSpec(4, 8.0, ("attention",), token_ids=(sample_tokenizer.im_start_id, sample_tokenizer.im_end_id))
    model = apply_lora(copy.deepcopy(base), spec)
    randomise_adapters(model)
    base_state, adapters = split_state(model.state_dict())
    adapter_path = tmp_path / "lora.pt"
    torch.save(adapter_checkpoint(adapters, router_buffers(base_state), spec, base_path, file_sha256(base_path),
                                  cfg.to_dict(), chat=True), adapter_path)
    assert adapter_path.stat().st_size < 0.1 * base_path.stat().st_size
    assert load_adapter(adapter_path)["base"]["sha256"] == file_sha256(base_path)

    out = tmp_path / "merged.pt"
    assert cli(["lora-merge", "--adapter", str(adapter_path), "--out", str(out)]) == 0
    merged, tok, ckpt = load_model(out)
    assert ckpt["meta"]["chat"] is True and ckpt["meta"]["merged_lora"]["rank"] == 4
    assert tok.sha256() == sample_tokenizer.sha256()
    x = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(merged(x).logits, model(x).logits, atol=2e-5, rtol=1e-5)

    # a different base (same architecture, other weights) is refused by its sha256
    other = tmp_path / "other.pt"
    save_model(other, Transformer(cfg).state_dict(), cfg, sample_tokenizer.to_json())
    with pytest.raises(PakarError, match="not the base this adapter was trained on"):
        merge_adapter_file(adapter_path, other, tmp_path / "x.pt")
    # a full checkpoint is not an adapter; the CLI says so on one line
    assert cli(["lora-merge", "--adapter", str(base_path), "--out", str(tmp_path / "y.pt")]) == 2
    assert "not a pakar LoRA adapter" in capsys.readouterr().err
    with pytest.raises(PakarError, match="already has LoRA"):
        apply_lora(model, spec)
