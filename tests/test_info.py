"""`pakar info` against independent counts: parameters of real (meta-device) pakar and Hugging Face
models, FLOPs from torch's FlopCounterMode on a real training step, and activation memory from the
tensors autograd actually saves."""

import contextlib
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pakar import PakarError, cli
from pakar.commands.info import main
from pakar.config import PRESETS, get_config
from pakar.info import activation_bytes, param_counts, train_flops_per_token
from pakar.model import Transformer
from pakar.moe import Experts


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_match_real_models(name, tied):
    cfg = get_config(name, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())
    vocab = {id(model.embed_tokens.weight): model.embed_tokens.weight, id(model.lm_head.weight): model.lm_head.weight}
    assert counts["embedding_params"] == sum(p.numel() for p in vocab.values())
    transformers = pytest.importorskip("transformers")
    from hf_reference import hf_config_from_pakar

    cls = transformers.Qwen3ForCausalLM if cfg.dense else transformers.Qwen3MoeForCausalLM
    with torch.device("meta"):
        hf = cls(hf_config_from_pakar(cfg))
    assert counts["total_params"] == hf.num_parameters()
    if cfg.dense:  # every parameter is active, and the twin's active count is the MoE's minus its routers
        moe = get_config(name.removesuffix("-dense"), tie_word_embeddings=tied)
        assert counts["active_params"] == counts["total_params"]
        assert param_counts(moe)["active_params"] - counts["active_params"] == \
            moe.num_hidden_layers * moe.num_experts * moe.hidden_size


@pytest.mark.parametrize("k", [1, 2])
def test_active_parameters_are_what_one_token_touches(k):
    cfg = get_config("tiny", vocab_size=300, num_experts_per_tok=k)
    model = Transformer(cfg)
    model(torch.tensor([[7]]), torch.tensor([[3]])).loss.backward()
    unused = 0
    for layer in model.layers:
        ex = layer.mlp.experts
        used = [e for e in range(cfg.num_experts) if ex.down_proj.grad[e].abs().sum() > 0]
        assert len(used) == k
        unused += sum(p[e].numel() for p in (ex.gate_proj, ex.up_proj, ex.down_proj)
                      for e in range(cfg.num_experts) if e not in used)
    assert param_counts(cfg)["active_params"] == sum(p.numel() for p in model.parameters()) - unused


@pytest.mark.parametrize("k,tied", [(1, False), (2, False), (2, True), (0, False), (0, True)])
def test_train_flops_match_flop_counter(k, tied):
    """k = 0: the dense twin (tiny-dense)."""
    if k == 0:
        cfg = get_config("tiny-dense", vocab_size=300, tie_word_embeddings=tied)
    else:
        cfg = get_config("tiny", vocab_size=300, num_experts_per_tok=k, tie_word_embeddings=tied)
    model = Transformer(cfg)
    for moe in model.moe_layers():  # the loop's plain matmuls are what FlopCounterMode counts
        moe.experts.use_grouped_mm = False
    B, T = 2, 48
    x = torch.randint(0, 300, (B, T))
    # the math attention backend spells attention out as counted matmuls over the full T x T square
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, x).loss.backward()
    assert counter.get_total_flops() == B * T * train_flops_per_token(cfg, T)


def saved_bytes(model, x, bf16: bool) -> int:
    """Bytes of every distinct storage autograd saves for backward, parameters excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(x, x, return_logits=False)
    return sum(storages.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("overrides", [
    dict(num_experts_per_tok=2),
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_experts=5,
         num_experts_per_tok=3, moe_intermediate_size=40, num_hidden_layers=3),
    dict(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0, intermediate_size=96),  # dense
])
def test_activation_memory_matches_saved_tensors(bf16, overrides):
    cfg = get_config("tiny", vocab_size=500, **overrides)
    model = Transformer(cfg)
    B, T = 3, 40
    measured = saved_bytes(model, torch.randint(0, 500, (B, T)), bf16)
    p = param_counts(cfg)
    # the CPU pads each expert's rows in bfloat16 (a GPU does not): count the padding as it happens here
    rows = torch.empty(B * T * max(cfg.num_experts_per_tok, 1), 0, dtype=torch.bfloat16 if bf16 else torch.float32)
    bucket = Experts.row_bucket(rows)
    predicted = activation_bytes(cfg, B, T, bf16, row_bucket=bucket)["total"] + \
        (2 * p["autocast_matmul_params"] if bf16 else 0)
    assert measured == pytest.approx(predicted, rel=0.03)


def test_info_json(capsys):
    assert main(["--config", "small", "--vocab-size", "5000", "--seq-len", "128", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = get_config("small", vocab_size=5000)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
        assert r[field] == getattr(cfg, field), field
    assert r["vocab_size"] == 5000 and r["seq_len"] == 128
    assert r["total_params"] == param_counts(cfg)["total_params"]
    assert r["train_flops_per_token"] == train_flops_per_token(cfg, 128)
    assert {"active_params", "embedding_params"} <= r.keys()
    for mode in ("memory_fp32", "memory_bf16"):
        m = r[mode]
        assert m["total_bytes"] == m["states_bytes"] + m["weight_copy_bytes"] + m["activation_bytes"]
        assert m["states_bytes"] == 16 * r["total_params"]


def test_info_text_and_errors(capsys):
    assert cli.main(["info", "--config", "default"]) == 0
    out = capsys.readouterr().out
    assert f"{param_counts(PRESETS['default'])['total_params']:,}" in out and "active per token" in out
    assert cli.main(["info", "--config", "huge"]) == 2
    assert "unknown --config 'huge'" in capsys.readouterr().err
    assert cli.main(["info", "--vocab-size", "0"]) == 2
    assert "vocab_size" in capsys.readouterr().err
    with pytest.raises(PakarError, match="--seq-len"):
        main(["--seq-len", "0"])


def test_presets_land_where_the_seed_and_the_issue_ask():
    default = param_counts(PRESETS["default"])  # the seed README: "~150-200M" parameters
    assert 150e6 <= default["active_params"] <= 200e6
    assert 2.8e9 <= param_counts(PRESETS["3b"])["total_params"] <= 3.2e9
    assert param_counts(PRESETS["tiny"])["non_embedding_params"] < 200_000  # seconds on a CPU
