"""The dense baselines (`*-dense` presets, num_experts = 0): the same code path as the MoE, checked
against Hugging Face's dense Qwen3ForCausalLM (logits, loss and gradients on copied weights; the
exported folder loads in transformers with no custom code and imports back bit for bit), and through
pakar's own training, evaluation, decoding, LoRA and int8 paths."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may download

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import build_model, load_model, safe_load, save_model
from pakar.config import PRESETS, ModelConfig, dense_variant, get_config
from pakar.info import param_counts
from pakar.model import MLP, Transformer

V = 320


def make_dense(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_config("tiny-dense", vocab_size=V, **overrides))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_every_preset_has_a_dense_twin_of_the_same_active_width():
    for name, cfg in PRESETS.items():
        if name.endswith("-dense"):
            continue
        dense = PRESETS[f"{name}-dense"]
        assert dense == dense_variant(cfg) and dense.dense and not cfg.dense
        assert dense.intermediate_size == cfg.num_experts_per_tok * cfg.moe_intermediate_size
        same = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "vocab_size", "rope_theta", "tie_word_embeddings")
        assert all(getattr(dense, f) == getattr(cfg, f) for f in same)
        # the same training FLOPs per token, the MoE's routers (E x D per layer) aside
        p, q = param_counts(cfg), param_counts(dense)
        routers = cfg.num_hidden_layers * cfg.num_experts * cfg.hidden_size
        assert p["active_matmul_params"] - q["active_matmul_params"] == routers


@pytest.mark.parametrize("change, message", [
    (dict(intermediate_size=0), "needs intermediate_size > 0"),
    (dict(num_experts_per_tok=2), "must have num_experts_per_tok = 0"),
    (dict(moe_intermediate_size=64), "moe_intermediate_size = 0"),
    (dict(intermediate_size=-1), "intermediate_size must be an integer >= 0"),
])
def test_dense_config_checks(change, message):
    with pytest.raises(PakarError, match=message):
        get_config("tiny-dense", **change)
    with pytest.raises(PakarError, match="an MoE"):
        get_config("tiny", intermediate_size=128)
    with pytest.raises(PakarError, match="num_experts_per_tok must be a positive"):
        ModelConfig(num_experts=4, num_experts_per_tok=0)


def test_model_structure_and_init():
    model = make_dense()
    assert all(type(layer.mlp) is MLP for layer in model.layers) and model.moe_layers() == []
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"} <= names
    assert not any(".gate." in n or "experts" in n for n in names)
    cfg = model.config
    # residual-branch output scaled like the experts' down_proj (init_weights' scheme)
    std = model.layers[0].mlp.down_proj.weight.std().item()
    assert std == pytest.approx(cfg.initializer_range / (2 * cfg.num_hidden_layers) ** 0.5, rel=0.1)
    out = model(torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9)))
    assert out.aux_loss.item() == 0.0 and out.expert_counts.shape == (0, 0)


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied", [False, True])
def test_logits_loss_and_gradients_match_qwen3(tied):
    from hf_reference import hf_model_from_pakar

    model = make_dense(tie_word_embeddings=tied)
    hf = hf_model_from_pakar(model)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    x = torch.randint(0, V, (3, 29))
    with torch.no_grad():
        assert rel_err(model.eval()(x).logits, hf(input_ids=x).logits) < 1e-5
    model.train(), hf.train()
    labels = torch.randint(0, V, (3, 29))
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)  # HF shifts inside
    loss, ref = model(x, targets).loss, hf(input_ids=x, labels=labels).loss
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    ref.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        if tied and name == "lm_head.weight":
            continue
        g = hf_params[name if name == "lm_head.weight" else "model." + name].grad
        assert rel_err(p.grad, g) < 1e-4, name


def test_export_loads_in_transformers_and_imports_back(sample_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from pakar.hf import export_checkpoint, import_folder

    cfg = get_config("tiny-dense", vocab_size=sample_tokenizer.vocab_size)
    torch.manual_seed(1)
    save_model(tmp_path / "m.pt", Transformer(cfg).state_dict(), cfg, sample_tokenizer.to_json())
    ckpt = safe_load(tmp_path / "m.pt")
    out = export_checkpoint(ckpt, tmp_path / "hf", log=lambda *a: None)
    hc = json.loads((out / "config.json").read_text())
    assert hc["architectures"] == ["Qwen3ForCausalLM"] and hc["model_type"] == "qwen3"
    assert hc["intermediate_size"] == cfg.intermediate_size and "num_experts" not in hc
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                              trust_remote_code=False).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    model, tok = build_model(ckpt)
    ids = torch.tensor([tok.encode("Saya suka makan nasi goreng di Jakarta. Bahasa Indonesia 12345")])
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())

    back = import_folder(out)
    assert sorted(back["model"]) == sorted(ckpt["model"])
    assert all(torch.equal(back["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    assert ModelConfig.from_dict(back["config"]) == cfg.replace(router_z_loss_coef=back["config"]["router_z_loss_coef"])
    # and what transformers itself writes imports too
    hf.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "tokenizer.json").write_text(ckpt["tokenizer"], encoding="utf-8")
    again = import_folder(tmp_path / "saved")
    assert all(torch.equal(again["model"][k], ckpt["model"][k]) for k in ckpt["model"])


def test_tiny_dense_trains_evaluates_and_decodes(tmp_path):
    from pakar.engine import Engine, RowDecoder
    from pakar.evaluate import evaluate_tokens, expert_table
    from pakar.generate import SamplingParams
    from pakar.train import TrainArgs, train

    train(TrainArgs(config="tiny-dense", batch=4, seq_len=32, epochs=1, max_steps=30, out=str(tmp_path),
                    device="cpu", log_every=5, eval_tokens=2048, save_every=0, vocab_size=512))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert len(train_losses) == 30 and train_losses[-1] < train_losses[0] - 0.5
    assert "expert imbalance" not in (tmp_path / "training.log").read_text()
    model, tok, ckpt = load_model(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1])
    assert model.config.dense and ckpt["config"]["num_experts"] == 0
    ids = tok.encode("Saya suka makan nasi goreng di Jakarta. " * 8)
    res = evaluate_tokens(model, ids, batch_size=2, seq_len=32, token_bytes=tok.token_byte_lengths())
    assert res["expert_counts"] == [] and res["bits_per_byte"] > 0 and "dense" in expert_table(res)
    # the single-row decoder (MLP.decode_row) gives the same greedy tokens as the batched path
    assert RowDecoder.applies(model.eval())
    sp = SamplingParams(max_new_tokens=12, temperature=0.0)
    full = Engine(model, lean=False).generate([ids[:7], ids[3:12]], sp)  # the model's forward every step
    assert Engine(model).generate([ids[:7]], sp)[0] == full[0]  # RowDecoder: MLP.decode_row
    # a batch of two rows: Transformer.decode_step (Block.decode calls the MLP as a module)
    assert Engine(model).generate([ids[:7], ids[3:12]], sp) == full


def test_lora_and_int8_on_a_dense_model():
    from pakar.lora import LoraSpec, apply_lora
    from pakar.quant import Int8Linear, quantize_int8

    model = apply_lora(make_dense(), LoraSpec(rank=2, alpha=4.0, targets=("gate_proj", "up_proj", "down_proj")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3 * model.config.num_hidden_layers and all(".mlp." in n for n in trainable)
    ref = make_dense().eval()
    x = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        want = ref(x).logits
        got = quantize_int8(ref)(x).logits
    assert isinstance(ref.layers[0].mlp.down_proj, Int8Linear)
    assert rel_err(got, want) < 0.05
