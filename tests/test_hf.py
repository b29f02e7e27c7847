"""Export to / import from a Hugging Face Qwen3-MoE folder, checked against transformers itself:
the exported folder loads with AutoModelForCausalLM / AutoTokenizer (no custom code, offline), gives
pakar's logits, tokenizes chats as pakar does, and generates the same greedy tokens; export -> import
returns identical weights, also through transformers' own save_pretrained (per-expert and fused)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may download

from pathlib import Path

import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import build_model, load_model, safe_load, save_model
from pakar.config import get_config
from pakar.hf import export_checkpoint, import_folder
from pakar.model import Transformer
from pakar.tokenizer import encode_chat

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from test_serve import CHAT_PAIRS, tiny_chat_checkpoint  # noqa: E402  (shared test model)


@pytest.fixture(scope="module")
def tokenizer(sample_tokenizer):
    return sample_tokenizer  # tests/conftest.py: BPE trained on the embedded Indonesian sample


def random_checkpoint(tokenizer, path: Path, seed: int = 0, chat: bool = False, **overrides) -> dict:
    cfg = get_config("tiny", vocab_size=tokenizer.vocab_size, **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    save_model(path, model.state_dict(), cfg, tokenizer.to_json(), chat=chat)
    return safe_load(path)


def hf_load(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    return model, tok


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("overrides", [
    {},  # tiny: top-2 of 4 experts, norm_topk_prob off
    {"num_experts_per_tok": 1, "tie_word_embeddings": True, "rope_theta": 5000.0},
    {"norm_topk_prob": True, "num_key_value_heads": 4},
])
def test_exported_folder_loads_in_transformers_with_equal_logits(tokenizer, tmp_path, overrides):
    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt", **overrides)
    out = export_checkpoint(ckpt, tmp_path / "hf", log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    for field in ("head_dim", "norm_topk_prob", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "rope_theta", "tie_word_embeddings"):
        assert cfg[field] == ckpt["config"][field], field
    hf_model, hf_tok = hf_load(out)
    assert type(hf_model).__name__ == "Qwen3MoeForCausalLM"
    assert hf_model.config.num_experts == ckpt["config"]["num_experts"]
    assert hf_model.config.rope_parameters["rope_theta"] == ckpt["config"]["rope_theta"]

    model, tok = build_model(ckpt)
    texts = ["Saya suka makan nasi goreng di Jakarta.", "Bahasa Indonesia <b>enak</b> 12345"]
    for text in texts:
        assert hf_tok.encode(text) == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text
    ids = torch.tensor([tok.encode(texts[0] + " " + texts[1])])
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf_model(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


def test_tokenizer_matches_on_real_text(tokenizer, tmp_path, shared_data):
    """Every document of the embedded sample, and real conversations rendered by transformers'
    apply_chat_template, tokenize exactly as pakar tokenizes them."""
    from pakar.corpus import embedded_sample_path, iter_documents

    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt", chat=True)
    hf_tok = AutoTokenizer.from_pretrained(export_checkpoint(ckpt, tmp_path / "hf", log=lambda *a: None),
                                           local_files_only=True)
    docs = list(iter_documents([embedded_sample_path()]))
    assert len(docs) > 100
    for doc in docs:
        assert hf_tok.encode(doc) == tokenizer.encode(doc)
    with open(shared_data / "id_chat" / "train.jsonl", encoding="utf-8") as f:
        conversations = [json.loads(line)["messages"] for _, line in zip(range(300), f)]
    for messages in conversations:
        theirs = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert theirs == encode_chat(tokenizer, messages)[0]


def test_chat_template_matches_pakar(tokenizer, tmp_path):
    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt", chat=True)
    out = export_checkpoint(ckpt, tmp_path / "hf", log=lambda *a: None)
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>" and hf_tok.bos_token is None
    conversations = [
        [{"role": "user", "content": "Halo, apa kabar?"}],
        [{"role": "system", "content": "Jawab singkat."}, {"role": "user", "content": "Siapa kamu?"},
         {"role": "assistant", "content": "Saya <b>pakar</b>."}, {"role": "user", "content": "Makan 12 nasi?"}],
        [{"role": "user", "content": " spasi di depan\ndan baris baru "}, {"role": "assistant", "content": "ok"}],
    ]
    for messages in conversations:
        for gen_prompt in (True, False):
            theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True,
                                                return_dict=True)["input_ids"]
            ours, _ = encode_chat(tokenizer, messages, add_generation_prompt=gen_prompt)
            assert theirs == ours


def test_greedy_generation_matches_transformers(tmp_path_factory, tmp_path):
    from pakar.generate import Request, SamplingParams, TextGenerator

    path = tiny_chat_checkpoint(tmp_path_factory.getbasetemp())
    out = export_checkpoint(safe_load(path), tmp_path / "hf", log=lambda *a: None)
    hf_model, hf_tok = hf_load(out)
    gen = TextGenerator.from_checkpoint(path)
    prompts = [[{"role": "user", "content": q}] for q, _ in CHAT_PAIRS] + ["Saya suka", "Bahasa Indonesia adalah"]
    for prompt in prompts:
        ids = gen.encode(prompt)
        ours = gen.generate([Request(prompt, SamplingParams(temperature=0, max_new_tokens=40))])[0]
        if isinstance(prompt, list):  # transformers renders the chat itself
            assert hf_tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"] == ids
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40)[0, len(ids):].tolist()
        if ours.finish_reason == "stop":  # transformers keeps the end token it stopped at; pakar drops it
            assert theirs[-1] in hf_model.generation_config.eos_token_id
            theirs = theirs[:-1]
        assert theirs == ours.token_ids
        if isinstance(prompt, list):  # the memorised answers: a comparison of meaningful text, not noise
            assert hf_tok.decode(theirs, skip_special_tokens=True) == dict(CHAT_PAIRS)[prompt[0]["content"]]


def test_round_trip_gives_identical_weights(tokenizer, tmp_path):
    for i, overrides in enumerate([{}, {"tie_word_embeddings": True, "num_experts_per_tok": 1}]):
        ckpt = random_checkpoint(tokenizer, tmp_path / f"m{i}.pt", seed=i, chat=bool(i), **overrides)
        export_checkpoint(ckpt, tmp_path / f"hf{i}", log=lambda *a: None)
        back = import_folder(tmp_path / f"hf{i}")
        assert_same_state(back["model"], ckpt["model"])
        assert back["config"] == ckpt["config"] | {"router_z_loss_coef": back["config"]["router_z_loss_coef"],
                                                   "expert_bias_update_rate": 0.0}
        assert back["tokenizer"] == ckpt["tokenizer"] and back["meta"]["chat"] == bool(i)
        model, _ = build_model(back)  # and it is a loadable pakar checkpoint
        assert model.config.tie_word_embeddings == bool(i)


def test_bfloat16_export_round_trips_to_rounded_weights(tokenizer, tmp_path):
    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt")
    export_checkpoint(ckpt, tmp_path / "hf", dtype="bfloat16", log=lambda *a: None)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = import_folder(tmp_path / "hf")
    assert_same_state(back["model"], {k: v.bfloat16().float() for k, v in ckpt["model"].items()})


@pytest.mark.parametrize("fused", [False, True])
def test_import_what_transformers_save_pretrained_writes(tokenizer, tmp_path, fused):
    """transformers 5 keeps experts fused in memory (gate_up_proj) and writes per-expert tensors by
    default, fused ones with save_original_format=False: import reads both."""
    from safetensors import safe_open

    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt", seed=3)
    export_checkpoint(ckpt, tmp_path / "hf", log=lambda *a: None)
    hf_model, hf_tok = hf_load(tmp_path / "hf")
    saved = tmp_path / "saved"
    hf_model.save_pretrained(saved, save_original_format=not fused)
    hf_tok.save_pretrained(saved)
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("model.layers.0.mlp.experts.gate_up_proj" in keys) == fused
    assert ("model.layers.0.mlp.experts.3.gate_proj.weight" in keys) == (not fused)
    back = import_folder(saved)
    assert_same_state(back["model"], ckpt["model"])


def test_sharded_export_and_stale_files(tokenizer, tmp_path):
    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt")
    out = tmp_path / "hf"
    export_checkpoint(ckpt, out, max_shard_size="60KB", log=lambda *a: None)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    hf_model, _ = hf_load(out)
    model, tok = build_model(ckpt)
    ids = torch.tensor([tok.encode("Saya suka makan nasi goreng")])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    assert_same_state(import_folder(out)["model"], ckpt["model"])
    export_checkpoint(ckpt, out, log=lambda *a: None)  # again, unsharded: old shards must go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert_same_state(import_folder(out)["model"], ckpt["model"])


def test_expert_bias_refused_unless_allowed(tokenizer, tmp_path):
    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt")
    ckpt["model"]["layers.1.mlp.gate.expert_bias"] = torch.tensor([0.01, -0.01, 0.0, 0.0])
    with pytest.raises(PakarError, match="--allow-bias-drop"):
        export_checkpoint(ckpt, tmp_path / "hf", log=lambda *a: None)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    logs = []
    export_checkpoint(ckpt, tmp_path / "hf", allow_bias_drop=True, log=logs.append)
    assert any(m.startswith("WARNING") and "0.01" in m for m in logs)
    back = import_folder(tmp_path / "hf")
    assert torch.equal(back["model"]["layers.1.mlp.gate.expert_bias"], torch.zeros(4))


def test_cli_export_and_import(tokenizer, tmp_path, capsys):
    from pakar.cli import main

    random_checkpoint(tokenizer, tmp_path / "m.pt", chat=True)
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pt")]) == 0
    model, tok, ckpt = load_model(tmp_path / "back.pt")
    assert_same_state(ckpt["model"], safe_load(tmp_path / "m.pt")["model"])
    capsys.readouterr()
    # user mistakes: one line, exit status 2
    cases = [
        (["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")], "checkpoint not found"),
        (["export", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "y"), "--max-shard-size",
          "lots"], "--max-shard-size"),
        (["import", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "z.pt")], "not a folder"),
        (["import", "--from", str(tmp_path), "--out", str(tmp_path / "z.pt")], "config.json not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type"),
    ({"mlp_only_layers": [0]}, "mlp_only_layers"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_experts": 8}, "experts"),
])
def test_import_refuses_what_pakar_cannot_represent(tokenizer, tmp_path, change, message):
    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt")
    out = export_checkpoint(ckpt, tmp_path / "hf", log=lambda *a: None)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(PakarError, match=message):
        import_folder(out)


def test_export_verifies_shapes_before_writing(tokenizer, tmp_path, capsys):
    """A checkpoint whose weights do not match its config (or hold NaN) is refused before anything is
    written: no folder that transformers would refuse."""
    from pakar.cli import main

    ckpt = random_checkpoint(tokenizer, tmp_path / "m.pt")
    wrong = {**ckpt, "model": {**ckpt["model"], "layers.0.mlp.experts.up_proj": torch.zeros(4, 32, 64)}}
    with pytest.raises(PakarError, match=r"layers.0.mlp.experts.up_proj has shape \(4, 32, 64\), its config "
                                         r"implies \(4, 64, 64\)"):
        export_checkpoint(wrong, tmp_path / "hf", log=lambda *a: None)
    assert not (tmp_path / "hf").exists()
    torch.save(wrong, tmp_path / "wrong.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "wrong.pt"), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "up_proj" in err and err.count("\n") == 1
    assert not (tmp_path / "hf2").exists()
    nan = {**ckpt, "model": {**ckpt["model"], "norm.weight": torch.full((64,), float("nan"))}}
    with pytest.raises(PakarError, match="non-finite"):
        export_checkpoint(nan, tmp_path / "hf3", log=lambda *a: None)
    assert not (tmp_path / "hf3").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda out: (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()),
                                                              "hidden_size": "64"})), "hidden_size"),
    (lambda out: (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()),
                                                              "num_attention_heads": 0, "head_dim": None})),
     "config.json"),
    (lambda out: (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()),
                                                              "hidden_size": 65536, "num_hidden_layers": 96,
                                                              "num_experts": 2048, "moe_intermediate_size": 16384})),
     "GiB of memory"),
    (lambda out: (out / "tokenizer.json").write_text("{ nope"), "tokenizer.json"),
    (lambda out: (out / "tokenizer.json").write_bytes(b"\xff\xfe\x00"), "tokenizer.json"),
    (lambda out: (out / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"),
     "model.safetensors"),
])
def test_import_errors_are_one_line(tokenizer, tmp_path, capsys, damage, message):
    from pakar.cli import main

    out = export_checkpoint(random_checkpoint(tokenizer, tmp_path / "m.pt"), tmp_path / "hf", log=lambda *a: None)
    damage(out)
    assert main(["import", "--from", str(out), "--out", str(tmp_path / "back.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
