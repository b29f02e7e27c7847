"""Export to, and import from, a Hugging Face Qwen3-MoE model folder: the one place that knows HF names.

`pakar export` writes what `save_pretrained` of transformers writes for Qwen3-MoE, so that
transformers 4.x and 5.x (`AutoModelForCausalLM`, `AutoTokenizer`, no custom code), vLLM and
llama.cpp's `convert_hf_to_gguf.py` read it:

    config.json                 model_type qwen3_moe, every field written out (no library defaults)
    model.safetensors           or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json      bos/eos/pad ids
    tokenizer.json              the checkpoint's tokenizer, byte for byte
    tokenizer_config.json       special tokens, the ChatML chat template, tokenizer_class

Design choices:
- Weight names are the per-expert layout of the Qwen3-MoE releases
  (`model.layers.{L}.mlp.experts.{i}.gate_proj.weight`, ...): every loader reads it, and transformers 5
  fuses the experts itself on load (`experts.gate_up_proj`, (E, 2I, D)). pakar keeps experts stacked
  (E, I, D) in nn.Linear's (out, in) layout, so expert i is the slice `[i]` and the mapping is a
  rename plus a slice. Import accepts both the per-expert layout and transformers 5's fused one
  (`save_pretrained(..., save_original_format=False)`).
- config.json names the expert count `num_experts` (what transformers 4.x, vLLM and llama.cpp read;
  transformers 5 maps it to its `num_local_experts`), and writes the rotary base both as `rope_theta`
  (4.x, vLLM, llama.cpp) and as 5.x's `rope_parameters`.
- `tokenizer_class` is "PreTrainedTokenizerFast": it loads tokenizer.json verbatim in transformers 4.x
  and 5.x. The Qwen2 tokenizer classes would rebuild the pre-tokenizer from Qwen's own regex in
  transformers 5, which is not necessarily the one pakar's tokenizer was trained with.
- Special tokens follow Qwen3: no BOS is ever added; `<|endoftext|>` pads; the end-of-sequence token
  is `<|im_end|>` for a chat-tuned checkpoint (meta "chat") and `<|endoftext|>` otherwise. Import
  reads the chat flag back from that choice, so a round trip keeps it.
- The expert selection bias of auxiliary-loss-free balancing (`mlp.gate.expert_bias`) has no
  counterpart in Qwen3-MoE: a checkpoint whose bias is non-zero would route some tokens to other
  experts once exported. Export refuses such a checkpoint unless `--allow-bias-drop` is given, and
  then says how large the dropped bias was. (A silent drop would ship a model that quietly differs.)
- Tied embeddings: only `model.embed_tokens.weight` is written (safetensors refuses shared tensors;
  loaders re-tie from `tie_word_embeddings`).
- Every file is written atomically (temporary file + os.replace); weight files of an earlier export
  in the same folder that this one does not rewrite are removed, so a folder never mixes two models.
- Dense models (num_experts = 0, the `*-dense` presets) are Hugging Face's dense Qwen3
  (`Qwen3ForCausalLM`, model_type qwen3): the same attention and names, `mlp.gate_proj/up_proj/
  down_proj` per layer; export writes and import reads that folder with the same code.
- Nothing here downloads anything: import reads a local folder only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pakar import PakarError, what_is_there
from pakar.args import DEFAULT_MAX_SHARD, EXPORT_DTYPES
from pakar.checkpoint import check_fits, check_model_checkpoint, check_weights, model_checkpoint
from pakar.config import ModelConfig
from pakar.tokenizer import CHAT_TEMPLATE, Tokenizer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPES}

# pakar name (without "model.") <-> Hugging Face name, for everything but the experts
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


# ----------------------------------------------------------------------------------------------
# names and tensors


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """pakar state dict -> Hugging Face Qwen3-MoE tensors (per-expert layout). Values may be views of
    `state` (expert slices); callers that need independent storage (safetensors) clone them."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("mlp.gate.expert_bias"):
            continue  # no Qwen3-MoE counterpart; export checks it is zero (see check_expert_bias)
        if name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["lm_head.weight"] = t
            continue
        m = re.match(r"^layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            layer, proj = m.groups()
            w_EOI = t  # (E, out, in): gate/up (E, I, D), down (E, D, I)
            for i in range(w_EOI.shape[0]):
                out[f"model.layers.{layer}.mlp.experts.{i}.{proj}.weight"] = w_EOI[i]
            continue
        out[f"model.{name}"] = t
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig, source: str = "") -> dict:
    """Hugging Face Qwen3-MoE tensors (per-expert or transformers-5 fused layout) -> pakar state dict,
    with zero expert selection biases. Every expected tensor must be present with the right shape."""
    E, D, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    where = f" in {source}" if source else ""
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}  # (layer, proj) -> {expert: (out, in)}
    for name, t in tensors.items():
        m = _EXPERT_RE.match(name)
        if m:
            layer, i, proj = int(m[1]), int(m[2]), m[3]
            experts.setdefault((layer, proj), {})[i] = t
            continue
        m = _FUSED_RE.match(name)
        if m:
            layer, kind = int(m[1]), m[2]
            if kind == "gate_up_proj":  # (E, 2I, D) = cat(gate (E, I, D), up (E, I, D), dim=1)
                if tuple(t.shape) != (E, 2 * I, D):
                    raise PakarError(f"{name}{where} has shape {tuple(t.shape)}, expected {(E, 2 * I, D)}")
                state[f"layers.{layer}.mlp.experts.gate_proj"] = t[:, :I].clone()
                state[f"layers.{layer}.mlp.experts.up_proj"] = t[:, I:].clone()
            else:
                state[f"layers.{layer}.mlp.experts.down_proj"] = t
            continue
        if name == "lm_head.weight":
            state[name] = t
        elif name.startswith("model."):
            state[name.removeprefix("model.")] = t
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # a non-persistent buffer some old exporters wrote; recomputed from rope_theta
        else:
            raise PakarError(f"unexpected tensor {name!r}{where}: not part of a Qwen3-MoE model")

    for (layer, proj), by_expert in experts.items():
        missing = sorted(set(range(E)) - set(by_expert))
        if missing or len(by_expert) != E:
            raise PakarError(f"layer {layer} {proj}{where}: experts {missing[:5] or sorted(by_expert)[E:E + 5]} "
                             f"missing or beyond num_experts={E}")
        shapes = {tuple(by_expert[i].shape) for i in range(E)}
        if len(shapes) != 1:
            raise PakarError(f"layer {layer} {proj}{where}: the experts' tensors differ in shape ({sorted(shapes)[:2]})")
        state[f"layers.{layer}.mlp.experts.{proj}"] = torch.stack([by_expert[i] for i in range(E)])
    for layer in range(0 if config.dense else config.num_hidden_layers):
        state[f"layers.{layer}.mlp.gate.expert_bias"] = torch.zeros(E, dtype=torch.float32)
    if config.tie_word_embeddings and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    return state


def check_expert_bias(state: dict[str, torch.Tensor]) -> float:
    """Largest |expert selection bias| over all layers (0.0 when balancing was off)."""
    biases = [t for name, t in state.items() if name.endswith("mlp.gate.expert_bias")]
    return max((t.abs().max().item() for t in biases), default=0.0)


# ----------------------------------------------------------------------------------------------
# config.json, generation_config.json, tokenizer_config.json


def special_tokens(tokenizer, chat: bool) -> dict[str, tuple[str, int]]:
    """Qwen3's conventions: {"eos", "pad", "bos"} -> (token text, id)."""
    eot, im_end = tokenizer.hf.id_to_token(tokenizer.eot_id), tokenizer.hf.id_to_token(tokenizer.im_end_id)
    eos = (im_end, tokenizer.im_end_id) if chat else (eot, tokenizer.eot_id)
    return {"eos": eos, "pad": (eot, tokenizer.eot_id), "bos": (eot, tokenizer.eot_id)}


def hf_config(config: ModelConfig, tokenizer, chat: bool, dtype: str = "float32") -> dict:
    """config.json for Qwen3MoeForCausalLM (Qwen3ForCausalLM for a dense model) with every field explicit."""
    sp = special_tokens(tokenizer, chat)
    if config.dense:
        arch = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                "intermediate_size": config.intermediate_size, "max_window_layers": config.num_hidden_layers}
    else:
        arch = {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size,
            "intermediate_size": config.moe_intermediate_size,  # the dense MLP size; unused (no dense layers)
            "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": config.router_aux_loss_coef,
            "output_router_logits": False,
        }
    return {
        **arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rms_norm_eps": config.rms_norm_eps,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "bos_token_id": sp["bos"][1],
        "eos_token_id": sp["eos"][1],
        "pad_token_id": sp["pad"][1],
        "torch_dtype": dtype,  # transformers 4.x
        "dtype": dtype,  # transformers 5.x
    }


def generation_config(tokenizer, chat: bool) -> dict:
    sp = special_tokens(tokenizer, chat)
    # a chat model also stops at <|endoftext|>, as Qwen3's instruct models do
    eos = [tokenizer.im_end_id, tokenizer.eot_id] if chat else tokenizer.eot_id
    return {"bos_token_id": sp["bos"][1], "eos_token_id": eos, "pad_token_id": sp["pad"][1]}


def tokenizer_config(tokenizer, chat: bool, max_len: int) -> dict:
    sp = special_tokens(tokenizer, chat)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,  # Qwen-style: nothing is prepended
        "eos_token": sp["eos"][0],
        "pad_token": sp["pad"][0],
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Qwen3-MoE (or dense Qwen3) config.json (transformers 4.x or 5.x spelling).
    Anything pakar's architecture cannot represent is refused by name rather than silently changed."""
    if not isinstance(d, dict):
        raise PakarError(f"{source}: expected a JSON object, got a {type(d).__name__}")
    if d.get("model_type") not in ("qwen3_moe", "qwen3"):
        raise PakarError(f"{source}: model_type is {d.get('model_type')!r}; pakar imports only 'qwen3_moe' "
                         f"and 'qwen3' (dense)")
    dense = d["model_type"] == "qwen3"

    def refuse_unless(ok: bool, what: str):
        if not ok:
            raise PakarError(f"{source}: {what} is not supported by pakar's Qwen3-MoE model")

    refuse_unless(d.get("hidden_act", "silu") == "silu", f"hidden_act={d.get('hidden_act')!r}")
    refuse_unless(not d.get("attention_bias", False), "attention_bias=true")
    refuse_unless(not d.get("use_sliding_window", False), "use_sliding_window=true")
    refuse_unless(not d.get("mlp_only_layers"), f"mlp_only_layers={d.get('mlp_only_layers')} (dense layers)")
    refuse_unless(d.get("decoder_sparse_step", 1) == 1, f"decoder_sparse_step={d.get('decoder_sparse_step')}")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for r in (rope, scaling):
        kind = r.get("rope_type", r.get("type", "default"))
        refuse_unless(kind == "default", f"rope type {kind!r} (rope scaling)")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    n_experts = 0 if dense else d.get("num_experts", d.get("num_local_experts"))
    if n_experts is None:
        raise PakarError(f"{source}: neither num_experts nor num_local_experts is set")
    try:
        if dense:
            ffn = {"num_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0,
                   "intermediate_size": d["intermediate_size"]}
        else:
            ffn = {"num_experts": n_experts, "num_experts_per_tok": d["num_experts_per_tok"],
                   "moe_intermediate_size": d["moe_intermediate_size"],
                   "norm_topk_prob": bool(d.get("norm_topk_prob", False)),
                   "router_aux_loss_coef": float(d.get("router_aux_loss_coef", 0.01))}
        return ModelConfig(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            **ffn, max_position_embeddings=d["max_position_embeddings"], rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise PakarError(f"{source}: required field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:  # e.g. "hidden_size": "64", or 0 heads
        raise PakarError(f"{source}: a field has an unusable value ({type(e).__name__}: {e})") from None
    except PakarError as e:
        raise PakarError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------------------------
# files


def _default_file_mode() -> int:
    """0o666 less the umask: what open() gives a new file (0644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write_bytes(path: Path, write) -> None:
    """write(tmp_path) produces the file; it then replaces `path` atomically, so a reader that holds the
    old file open or memory-mapped (a running server, a transformers session) keeps reading the old
    bytes on Linux and macOS. Windows cannot replace a file another process has mapped: that is a
    one-line error naming the file, and the old file stays as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        if os.name == "posix":  # safetensors writes 0600 files (a private temp file, renamed)
            os.chmod(tmp, _default_file_mode())
        try:
            os.replace(tmp, path)
        except PermissionError as e:
            raise PakarError(f"cannot replace {path} ({e.strerror or e}): another program may have it open (a "
                             f"running `pakar serve --model`, a Python session holding the model); close it, or "
                             f"export to another --out") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8"))


def parse_size(text: str) -> int:
    """'5GB', '200MB', '1.5GiB', '123456' -> bytes (decimal units like transformers; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise PakarError(f"--max-shard-size: cannot read {text!r}; use e.g. 5GB, 500MB or a byte count")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    size = int(float(m[1]) * scale)
    if size <= 0:
        raise PakarError(f"--max-shard-size must be positive, got {text!r}")
    return size


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy split in name order, never splitting a tensor (one larger than max_bytes gets its own shard)."""
    shards, cur, cur_bytes = [], [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def export_inputs(ckpt: dict, target: str, allow_bias_drop: bool, log=print):
    """(config, tokenizer, chat flag, state dict) of a checkpoint about to be exported to `target`.
    Shapes against the config, finite weights and a tokenizer that parses are checked before anything
    is written, so a damaged checkpoint never becomes a file another program refuses. A non-zero expert
    selection bias (auxiliary-loss-free balancing) is refused unless allowed: `target` has no such bias."""
    config = check_model_checkpoint(ckpt, "--checkpoint")
    tokenizer = Tokenizer.from_json(ckpt["tokenizer"])
    chat = bool(ckpt.get("meta", {}).get("chat", False))
    state = ckpt["model"]
    bias = check_expert_bias(state)
    if bias > 0:
        msg = (f"this checkpoint was trained with auxiliary-loss-free balancing: its expert selection bias "
               f"is non-zero (max |bias| = {bias:.3g}), and {target} has no such bias, so the exported model "
               f"would send some tokens to different experts than pakar does")
        if not allow_bias_drop:
            raise PakarError(msg + "; pass --allow-bias-drop to export without the bias anyway")
        log(f"WARNING: {msg}. Exporting without it (--allow-bias-drop): check the exported model's quality "
            f"(e.g. pakar import it back and run pakar eval) before you deploy it.")
    return config, tokenizer, chat, state


def export_checkpoint(ckpt: dict, out_dir: str | Path, *, dtype: str = "float32", allow_bias_drop: bool = False,
                      max_shard_size: str = DEFAULT_MAX_SHARD, log=print) -> Path:
    """Write a loaded pakar model checkpoint dict as a Hugging Face Qwen3-MoE folder. Returns the folder."""
    if dtype not in DTYPES:
        raise PakarError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    # (a dense model has no selection bias, so the bias refusal, which names Qwen3-MoE, never concerns it)
    config, tokenizer, chat, state = export_inputs(ckpt, "Qwen3-MoE", allow_bias_drop, log)
    torch_dtype = DTYPES[dtype]
    tensors = {k: v.to(torch_dtype) for k, v in to_hf_state_dict(state, config).items()}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PakarError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    shards = _shards(tensors, max_bytes)
    files = [WEIGHTS_NAME] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for fname, names in zip(files, shards):
        # clone: expert slices share storage with their stacked tensor, which safetensors refuses
        part = {n: tensors[n].detach().cpu().clone().contiguous() for n in names}
        _atomic_write_bytes(out / fname, lambda tmp, part=part: save_file(part, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(out / INDEX_NAME, {"metadata": {"total_size": total},
                                       "weight_map": {n: f for f, names in zip(files, shards) for n in names}})
    # remove weight files of an earlier export that this one did not rewrite
    stale = {p for p in out.glob("model*.safetensors")} - {out / f for f in files}
    if len(shards) == 1:
        stale.add(out / INDEX_NAME)
    for p in stale:
        p.unlink(missing_ok=True)

    _write_json(out / "config.json", hf_config(config, tokenizer, chat, dtype))
    _write_json(out / "generation_config.json", generation_config(tokenizer, chat))
    _atomic_write_bytes(out / "tokenizer.json", lambda tmp: tmp.write_text(ckpt["tokenizer"], encoding="utf-8"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(tokenizer, chat, config.max_position_embeddings))
    n_params = sum(t.numel() for t in tensors.values())
    log(f"exported {n_params / 1e6:.2f}M parameters ({dtype}, {len(files)} weight file(s)) to {out}")
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PakarError(f"{path} not found: not a Hugging Face model folder {what_is_there(path)}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PakarError(f"{path} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise PakarError(f"{path}: expected a JSON object, got a {type(obj).__name__}")
    return obj


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder (single file or sharded via the index), on the CPU."""
    if (folder / INDEX_NAME).is_file():
        weight_map = _read_json(folder / INDEX_NAME).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f and "\\" not in f
                                                       for f in weight_map.values()):
            raise PakarError(f"{folder / INDEX_NAME}: weight_map must map tensor names to file names in the folder")
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise PakarError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder} (pakar reads safetensors only, "
                         f"never pickled .bin files) {what_is_there(folder / WEIGHTS_NAME)}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        path = folder / f
        if not path.is_file():
            raise PakarError(f"{path} is listed in {INDEX_NAME} but missing {what_is_there(path)}")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PakarError(f"cannot read {path}: {first}") from None
    return tensors


def import_folder(folder: str | Path) -> dict:
    """A pakar model checkpoint dict (float32 weights) from a Hugging Face Qwen3-MoE folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PakarError(f"{folder} is not a folder (expected a Hugging Face model folder) {what_is_there(folder)}")
    config = config_from_hf(_read_json(folder / "config.json"), str(folder / "config.json"))
    check_fits(config, "cpu", source=str(folder / "config.json"))
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise PakarError(f"{tok_path} not found: pakar checkpoints carry their tokenizer, so import needs "
                         f"tokenizer.json (a 'fast' tokenizer) {what_is_there(tok_path)}")
    try:
        tokenizer_json = tok_path.read_text(encoding="utf-8")
        tokenizer = Tokenizer.from_json(tokenizer_json)
    except (OSError, UnicodeDecodeError, PakarError) as e:
        raise PakarError(f"{tok_path}: {e if isinstance(e, PakarError) else type(e).__name__}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise PakarError(f"{tok_path} has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                         f"{config.vocab_size}")
    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    eos = tok_cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    chat = eos == tokenizer.hf.id_to_token(tokenizer.im_end_id)

    state = {k: v.float() for k, v in from_hf_state_dict(read_hf_tensors(folder), config, str(folder)).items()}
    check_weights(state, config, f"{folder} (against its config.json)")
    return model_checkpoint(state, config, tokenizer_json, chat=chat, imported_from=str(folder.resolve()))


# ----------------------------------------------------------------------------------------------
# command line



