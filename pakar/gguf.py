"""`pakar export --format gguf`: one GGUF file for llama.cpp, Ollama and LM Studio, plus an Ollama Modelfile.

Written directly with the `gguf` package (llama.cpp's own Python writer, `pip install pakar[gguf]`):
no llama.cpp checkout, no converter. The tests run the file in llama.cpp (through llama-cpp-python)
and hold it to pakar token for token.

Design choices:
- Architecture. llama.cpp's `qwen3moe` graph always renormalises the top-k routing weights (its
  `build_moe_ffn` call passes norm_w = true), while pakar's presets use norm_topk_prob = False: the
  gate probability itself scales each expert's output. A model with norm_topk_prob = False is
  therefore written as llama.cpp's `hy_v3` architecture, whose graph is Qwen3-MoE's layer for layer
  (RMSNorm pre-norm, GQA with per-head RMSNorm on q and k, NEOX rotary, softmax router, SwiGLU
  experts, untied or tied head) and which reads `expert_weights_norm` and `expert_gating_func` from
  the file. Its always-on shared expert is written with an intermediate size of 1 and all-zero
  weights: its output is exactly +0 (down-projection of zero weights), so adding it changes no bit.
  A model with norm_topk_prob = True is written as `qwen3moe`, which every GGUF runtime knows.
  The tests prove both mappings by greedy generation (identical tokens) against pakar.
  A dense model (num_experts = 0, the `*-dense` presets) is llama.cpp's `qwen3`: the same layer
  with one SwiGLU MLP (ffn_gate/ffn_up/ffn_down) and no router.
- A model trained with a non-zero expert-selection bias (aux-loss-free balancing) routes differently
  from either graph; it is refused unless --allow-bias-drop, with hf.py's check and wording.
- Tensor layout: GGUF stores dimensions reversed from numpy, so pakar's (out, in) Linear weights and
  (E, out, in) stacked experts are written as they are; Qwen-style NEOX rotary needs no permutation.
- Types (--outtype): f32 (exact), f16, q8_0. Norms and the router stay float32 (as llama.cpp's own
  converter does: tiny, and the router decides which experts run); a tensor whose rows are not a
  multiple of q8_0's block of 32 stays float16/float32.
- Tokenizer: llama.cpp's "gpt2" (byte-level BPE) model with the "qwen2" pre-tokenizer, whose regex is
  pakar's SPLIT_PATTERN (tokenizer.py) written without the (?i:) group. llama.cpp does not apply
  pakar's NFC normalisation, so text that is not already NFC (rare; most text is) may tokenise
  differently; the tests measure it on real Indonesian text. Special tokens are control tokens;
  no BOS is added (Qwen's convention); EOS/EOT follow hf.py's choice (<|im_end|> for a chat-tuned
  checkpoint, <|endoftext|> otherwise), and llama.cpp ends generation at both markers.
- The ChatML template is the tokenizer's CHAT_TEMPLATE; the Modelfile repeats it in Ollama's Go
  template syntax with both stop tokens and pakar chat's default sampling.
- Written atomically (temporary file + os.replace), like every other pakar output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from pakar import PakarError
from pakar.config import ModelConfig
from pakar.hf import export_inputs, special_tokens
from pakar.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

OUTTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantises blocks of 32 values along a row
# chat defaults of `pakar chat` (chat.py), for the Modelfile
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repeat_penalty": 1.1}


def _gguf():
    try:
        import gguf  # lazy: the optional gguf extra, only for --format gguf
    except ImportError:
        raise PakarError("--format gguf needs the gguf package: pip install 'pakar[gguf]' (or pip install gguf)") from None
    return gguf


def architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture whose graph computes exactly what pakar computes (see the docstring)."""
    if config.dense:
        return "qwen3"
    return "qwen3moe" if config.norm_topk_prob else "hy_v3"


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """pakar state dict -> {llama.cpp tensor name: float32 tensor} for `architecture(config)`."""
    out = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
             "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
             "self_attn.o_proj.weight": "attn_output", "self_attn.q_norm.weight": "attn_q_norm",
             "self_attn.k_norm.weight": "attn_k_norm", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate.weight": "ffn_gate_inp", "mlp.experts.gate_proj": "ffn_gate_exps",
             "mlp.experts.up_proj": "ffn_up_exps", "mlp.experts.down_proj": "ffn_down_exps"}
    if config.dense:
        names = {k: v for k, v in names.items() if not k.startswith("mlp.")}
        names |= {"mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    D = config.hidden_size
    for layer in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            out[f"blk.{layer}.{theirs}.weight"] = state[f"layers.{layer}.{ours}"]
        if architecture(config) == "hy_v3":  # the always-on shared expert, width 1, exactly zero
            out[f"blk.{layer}.ffn_gate_shexp.weight"] = torch.zeros(1, D)
            out[f"blk.{layer}.ffn_up_shexp.weight"] = torch.zeros(1, D)
            out[f"blk.{layer}.ffn_down_shexp.weight"] = torch.zeros(D, 1)
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def _keep_f32(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 1 or name.endswith("ffn_gate_inp.weight") or "_shexp." in name


def _encode(gguf, name: str, t: torch.Tensor, outtype: str):
    """(numpy array, raw ggml type or None) for one tensor under --outtype."""
    a = t.numpy()
    if outtype == "f32" or _keep_f32(name, t):
        return a.astype(np.float32), None
    if outtype == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        q = gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        return q, gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def _vocab(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their llama.cpp token types, and the BPE merges as "a b" strings."""
    model = json.loads(tokenizer.to_json())["model"]
    V = tokenizer.vocab_size
    tokens = [tokenizer.hf.id_to_token(i) for i in range(V)]
    if any(t is None for t in tokens):
        raise PakarError("tokenizer: token ids are not contiguous; cannot write a GGUF vocabulary")
    types = [3 if i < len(SPECIAL_TOKENS) else 1 for i in range(V)]  # 3 = control, 1 = normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def ollama_modelfile(gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF file next to it: ChatML template, stop tokens, sampling."""
    s = DEFAULT_SAMPLING
    return (f"# ollama create NAME -f Modelfile   (then: ollama run NAME)\n"
            f"FROM ./{gguf_name}\n"
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
            '{{ .Content }}<|im_end|>\n'
            '{{ end }}<|im_start|>assistant\n'
            '"""\n'
            'PARAMETER stop "<|im_end|>"\n'
            'PARAMETER stop "<|endoftext|>"\n'
            + "".join(f"PARAMETER {k} {v}\n" for k, v in s.items()))


def export_gguf(ckpt: dict, out_file: str | Path, *, outtype: str = "f32", allow_bias_drop: bool = False,
                log=print) -> Path:
    """Write a loaded pakar checkpoint as one GGUF file (and a Modelfile beside it). Returns the file."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise PakarError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out = Path(out_file)
    if out.suffix.lower() != ".gguf":
        raise PakarError(f"--out {out}: a GGUF export is one file; give a name ending in .gguf")
    if out.is_dir():
        raise PakarError(f"--out {out} is a folder; give a file name ending in .gguf")
    config, tokenizer, chat, state = export_inputs(ckpt, "llama.cpp's graph", allow_bias_drop, log)

    arch = architecture(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    _write_metadata(w, gguf, arch, outtype, config, tokenizer, chat, CHAT_TEMPLATE, special_tokens(tokenizer, chat))
    n_params = 0
    for name, t in gguf_tensors(state, config).items():
        data, raw = _encode(gguf, name, t, outtype)
        w.add_tensor(name, data, raw_dtype=raw)
        n_params += t.numel()
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, out)
    modelfile = out.with_name("Modelfile")
    tmp_mf = modelfile.with_name(f"Modelfile.tmp-{os.getpid()}")
    tmp_mf.write_text(ollama_modelfile(out.name), encoding="utf-8")
    os.replace(tmp_mf, modelfile)
    log(f"exported {n_params / 1e6:.2f}M parameters as GGUF ({arch}, {outtype}, "
        f"{out.stat().st_size / 1e6:.1f} MB) to {out}; Ollama Modelfile: {modelfile}")
    return out


def _write_metadata(w, gguf, arch, outtype: str, config: ModelConfig, tokenizer, chat: bool, template: str, sp: dict) -> None:
    w.add_name("pakar")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size if config.dense else config.moe_intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    if not config.dense:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "hy_v3":
        w.add_expert_shared_feed_forward_length(1)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_weights_norm(config.norm_topk_prob)
        w.add_expert_weights_scale(1.0)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])

    tokens, types, merges = _vocab(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(sp["eos"][1])
    w.add_pad_token_id(sp["pad"][1])
    w.add_bos_token_id(sp["bos"][1])
    w.add_eot_token_id(tokenizer.im_end_id if chat else tokenizer.eot_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(template)
