"""GGUF export, run in llama.cpp itself (llama-cpp-python): tokens, chat template, greedy generation, q8_0.

The reference is llama.cpp's own C++ (tokenizer, chat-template engine, graph), independent of pakar.
Tests that need it skip with a reason where `llama_cpp` cannot be imported (pip install 'pakar[gguf]')."""

import ctypes
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from pakar import PakarError
from pakar.checkpoint import safe_load, save_model
from pakar.config import get_config
from pakar.gguf import architecture, export_gguf
from pakar.model import Transformer
from pakar.tokenizer import encode_chat

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'pakar[gguf]')")

from test_serve import CHAT_PAIRS, TEXTS, tiny_chat_checkpoint  # noqa: E402  (shared trained test model)

try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the environment
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp is not importable "
                                 "(pip install llama-cpp-python, or pip install 'pakar[gguf]')")
quiet = {"verbose": False, "n_threads": 1, "n_threads_batch": 1}


def random_checkpoint(tokenizer, path: Path, seed: int = 0, preset: str = "tiny", **overrides) -> dict:
    cfg = get_config(preset, vocab_size=tokenizer.vocab_size, **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    save_model(path, model.state_dict(), cfg, tokenizer.to_json())
    return safe_load(path)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The tiny chat model of test_serve (trained to memorise its answers: clear top-1 margins) and its
    f32 and q8_0 GGUF files."""
    path = tiny_chat_checkpoint(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("gguf")
    ckpt = safe_load(path)
    files = {t: export_gguf(ckpt, out / f"tiny-{t}.gguf", outtype=t, log=lambda *a: None) for t in ("f32", "q8_0")}
    return path, files


def test_file_holds_architecture_tokenizer_and_template(sample_tokenizer, tmp_path):
    ckpt = random_checkpoint(sample_tokenizer, tmp_path / "m.pt")
    f = export_gguf(ckpt, tmp_path / "m.gguf", log=lambda *a: None)
    r = gguf.GGUFReader(str(f))

    def field(name):
        return r.fields[name].contents()

    assert field("general.architecture") == "hy_v3"  # norm_topk_prob=False (see pakar/gguf.py)
    assert field("hy_v3.expert_weights_norm") is False and field("hy_v3.expert_gating_func") == 1
    assert field("hy_v3.expert_used_count") == 2 and field("hy_v3.block_count") == 2
    assert field("tokenizer.ggml.pre") == "qwen2" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.tokens")[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert "<|im_start|>" in field("tokenizer.chat_template")
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down_exps.weight", "blk.0.attn_q_norm.weight"} <= names
    exps = next(t for t in r.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert np.array_equal(np.asarray(exps.data), ckpt["model"]["layers.0.mlp.experts.gate_proj"].numpy())
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "FROM ./m.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_refusals(sample_tokenizer, tmp_path):
    ckpt = random_checkpoint(sample_tokenizer, tmp_path / "m.pt")
    ckpt["model"]["layers.1.mlp.gate.expert_bias"][0] = 0.5
    with pytest.raises(PakarError, match="--allow-bias-drop"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    export_gguf(ckpt, tmp_path / "m.gguf", allow_bias_drop=True, log=lambda *a: None)
    with pytest.raises(PakarError, match=r"\.gguf"):
        export_gguf(ckpt, tmp_path / "folder", allow_bias_drop=True)
    with pytest.raises(PakarError, match="--outtype"):
        export_gguf(ckpt, tmp_path / "m.gguf", outtype="q4", allow_bias_drop=True)


def test_cli_export(sample_tokenizer, tmp_path, capsys):
    from pakar.cli import main

    random_checkpoint(sample_tokenizer, tmp_path / "m.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "gguf", "--outtype", "q8_0",
                 "--out", str(tmp_path / "out" / "m.gguf")]) == 0
    assert "hy_v3, q8_0" in capsys.readouterr().out
    assert gguf.GGUFReader(str(tmp_path / "out" / "m.gguf")).fields["general.file_type"].contents() == 7


@needs_llama
def test_tokenizer_matches_llama_cpp_on_real_text(sample_tokenizer, tmp_path, shared_data):
    ckpt = random_checkpoint(sample_tokenizer, tmp_path / "m.pt")
    f = export_gguf(ckpt, tmp_path / "m.gguf", log=lambda *a: None)
    llm = llama_cpp.Llama(str(f), vocab_only=True, **quiet)
    lines = []
    for name in ("id_general/wiki_paragraphs.txt", "id_general/nli_premises.txt", "id_general/general_sentences.txt"):
        lines += (shared_data / name).read_text(encoding="utf-8").splitlines()[:500]
    lines = [s for s in lines if s.strip()]
    # the chat markers as literal text: plain bytes for both (pakar never turns text into special ids)
    lines += [f"<|im_start|>user\n{s}<|im_end|>\n<|endoftext|>" for s in lines[:50]]
    lines += ["Rp 1.250.000,00 — 25°C, naïve café, 日本語, emoji 😀, tab\tdan\r\nbaris   spasi  "]
    assert len(lines) >= 1000 and sum(any(ord(c) > 127 for c in s) for s in lines) >= 50
    # llama.cpp does not apply the tokenizer's NFC normaliser; the real lines are already NFC
    assert all(unicodedata.normalize("NFC", s) == s for s in lines)
    mismatches = [s for s in lines
                  if llm.tokenize(s.encode("utf-8"), add_bos=False, special=False) != sample_tokenizer.encode(s)]
    assert mismatches == []
    ids = sample_tokenizer.encode(lines[0])
    assert llm.detokenize(ids).decode("utf-8") == lines[0]


@needs_llama
def test_chat_template_applied_by_llama_cpp_gives_pakar_tokens(chat_model):
    from pakar.tokenizer import CHAT_TEMPLATE, Tokenizer

    path, files = chat_model
    tok = Tokenizer.from_json(safe_load(path)["tokenizer"])
    llm = llama_cpp.Llama(str(files["f32"]), vocab_only=True, **quiet)
    convs = [[{"role": "user", "content": q}] for q, _ in CHAT_PAIRS]
    convs.append([{"role": "system", "content": "Jawab singkat."}, {"role": "user", "content": "Halo"},
                  {"role": "assistant", "content": "Halo juga!"}, {"role": "user", "content": "Apa kabar?"}])
    for conv in convs:
        msgs = (llama_cpp.llama_chat_message * len(conv))(
            *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in conv])
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_chat_apply_template(CHAT_TEMPLATE.encode(), msgs, len(conv), True, buf, len(buf))
        assert 0 < n < len(buf)
        rendered = buf.raw[:n].decode("utf-8")
        theirs = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
        assert theirs == encode_chat(tok, conv, add_generation_prompt=True)[0]


def llama_greedy(llm, ids: list[int], max_new: int) -> tuple[list[int], bool]:
    """llama.cpp's greedy decode: the generated ids (without a final end-of-generation token), and
    whether it stopped at one."""
    llm.reset()
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t):
            return out, True
        out.append(t)
        if len(out) == max_new:
            break
    return out, False


@needs_llama
def test_greedy_generation_matches_pakar_token_for_token(chat_model):
    from pakar.generate import Request, SamplingParams, TextGenerator

    path, files = chat_model
    gen = TextGenerator.from_checkpoint(path)
    assert architecture(gen.engine.config) == "hy_v3"  # the norm_topk_prob=False mapping is the one proven here
    llm = llama_cpp.Llama(str(files["f32"]), n_ctx=512, **quiet)
    prompts = [[{"role": "user", "content": q}] for q, _ in CHAT_PAIRS]
    prompts += [[{"role": "system", "content": "Jawab singkat."}, {"role": "user", "content": q}] for q, _ in CHAT_PAIRS]
    for t in TEXTS:  # prefixes of the trained texts, cut at every few words
        words = t.split()
        prompts += [" ".join(words[:k]) for k in range(1, len(words), 2)]
    prompts += ["Hitung terus", "Jakarta", "Apa ibu kota", "Halo"]
    assert len(prompts) >= 20
    n_tokens = 0
    for prompt in prompts:
        ids = gen.encode(prompt)
        ours = gen.generate([Request(prompt, SamplingParams(temperature=0, max_new_tokens=32))])[0]
        theirs, stopped = llama_greedy(llm, ids, 32)
        assert theirs == ours.token_ids, prompt
        assert stopped == (ours.finish_reason == "stop"), prompt
        n_tokens += len(theirs)
    assert n_tokens >= 200  # the comparison covers real continuations, not immediate stops


@needs_llama
@pytest.mark.parametrize("preset,overrides", [("tiny", {"norm_topk_prob": False}), ("tiny", {"norm_topk_prob": True}),
                                              ("tiny-dense", {})])
def test_llama_cpp_logits_equal_pakar(sample_tokenizer, tmp_path, preset, overrides):
    """Every architecture pakar writes (hy_v3 for norm_topk_prob=False, qwen3moe for True, qwen3 for a
    dense twin) computes pakar's logits at every position of a prompt, to the rounding of llama.cpp's
    default float16 KV cache (2^-11 relative per key/value element): measured ~2e-4 of the largest
    logit, bound 2e-3."""
    ckpt = random_checkpoint(sample_tokenizer, tmp_path / "m.pt", seed=1, preset=preset, **overrides)
    f = export_gguf(ckpt, tmp_path / "m.gguf", log=lambda *a: None)
    cfg = get_config(preset, vocab_size=sample_tokenizer.vocab_size, **overrides)
    assert architecture(cfg) == ("qwen3" if cfg.dense else "qwen3moe" if cfg.norm_topk_prob else "hy_v3")
    model = Transformer(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids = sample_tokenizer.encode("Bahasa Indonesia adalah bahasa resmi Republik Indonesia, kata guru itu.")
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float().numpy()
    llm = llama_cpp.Llama(str(f), n_ctx=256, logits_all=True, **quiet)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)])
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() <= 2e-3 * scale


@needs_llama
def test_q8_0_agrees_with_f32_on_top1(chat_model, shared_data):
    path, files = chat_model
    f32 = llama_cpp.Llama(str(files["f32"]), n_ctx=512, logits_all=True, **quiet)
    q8 = llama_cpp.Llama(str(files["q8_0"]), n_ctx=512, logits_all=True, **quiet)
    lines = (shared_data / "id_general" / "nli_premises.txt").read_text(encoding="utf-8").splitlines()[-40:]
    lines += TEXTS + [q + "\n" + a for q, a in CHAT_PAIRS]
    agree = total = 0
    for line in lines:
        ids = f32.tokenize(line.encode("utf-8"), add_bos=False)[:256]
        top = []
        for llm in (f32, q8):
            llm.reset()
            llm.eval(ids)
            top.append(np.asarray(llm.scores[:len(ids)]).argmax(-1))
        agree += int((top[0] == top[1]).sum())
        total += len(ids)
    assert total >= 1000
    assert agree / total >= 0.95, f"q8_0 top-1 agreement {agree / total:.3f}"
