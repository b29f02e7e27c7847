"""Fine-tuning a checkpoint: continued pretraining on domain text, chat SFT on the assistant turns, LoRA.

    pakar finetune --checkpoint run/checkpoints/model_epoch5.pt --data domain.txt --epochs 3
    pakar finetune --checkpoint base.pt --data chat.jsonl [--lora-rank 8 --lora-targets attention experts]

API:
    FinetuneArgs(TrainArgs)                       the training flags plus LoRA and the chat split (pakar.args)
    finetune(args, base=None) -> summary dict     run it (pakar.train.train does the work)
    train_chat(train_args) -> summary             `train.py --init-from X --data chat.jsonl`
    preset_name(base) -> str                      the preset a checkpoint was trained from
The chat data (load_chat, ChatData, collate, evaluate_conversations, evaluate_chat) lives in
pakar.chat_data, which `pakar eval` shares; the command line is pakar.commands.train.

Design choices:

- One loop. Everything runs through pakar.train.train() and its extension points, so fine-tuning gets
  the loop's checkpointing, exact resume, validation, logging and data parallelism unchanged: `data`
  (conversations, below), `customize_model` (LoRA), `save_epoch` (adapter files) and `meta`.
- The model and the tokenizer are the checkpoint's; the tokenizer is never retrained (new text is
  tokenized with it, so every id the model knows keeps its meaning).
- The kind of data is detected from its first record (pakar.corpus.detect_kind): plain text is
  continued pretraining, which is exactly pretraining from the checkpoint's weights (token shards
  prepared with its tokenizer in --out); chat JSONL ({"messages": [...]}) is supervised fine-tuning.
- Chat rows: each conversation is rendered with the ChatML template (pakar.tokenizer.encode_chat)
  and is one row of a batch, right-padded. Causal attention never looks right, so no token ever
  attends across conversations or to padding, with no attention mask and the fast causal kernel.
  Targets are -100 everywhere except on each assistant message's content and its <|im_end|>: user
  and system turns, role headers and padding teach nothing. The loop divides the summed loss by the
  number of counted targets of the whole optimizer step, so every assistant token weighs the same.
  (Padding positions still pass through the routers: they count in the MoE balance losses and the
  expert loads, never in the language-model loss.)
- Batches: an epoch shuffles the conversations (numpy PCG64 seeded by (seed, epoch), like the
  pretraining loader), sorts each run of BUCKET global batches by length and cuts it into global
  batches, then shuffles the batch order: rows of a batch have similar lengths, so little compute
  goes to padding, while the order stays random. A global batch is what one optimizer step sees,
  --batch x ranks x --grad-accum conversations: micro-step m of rank r takes its slice m x ranks + r,
  so 2 ranks give the same steps as 1 process with --grad-accum 2 (tests/test_distributed.py). A row
  is padded to a multiple of 8 tokens. The last global batch is completed by wrapping around to the
  start of the epoch's order, so every conversation is seen every epoch. get(epoch, step) is a pure
  function of its arguments (resume).
- Bad records are counted and reported, never fatal one by one: bad JSON and missing fields (the
  corpus reader), unknown roles or empty contents (pakar.tokenizer.validate_messages), conversations
  longer than --seq-len tokens (the context; they are skipped, not cut, since a cut conversation
  teaches answers to questions it lost), conversations without an assistant message, and plain-text
  records in a chat corpus. No usable conversation left is a PakarError listing the reasons.
- Held-out slice: a conversation is validation when pakar.corpus.is_val holds for the doc_hash of
  its canonical JSON (the same rule as text documents), --val-fraction of them (default 5%: chat
  sets are small; text keeps pretraining's 1%); the smallest-hash conversation is always held out,
  so a corpus of two or more has one. Validation loss is per assistant token, on whole
  conversations, exactly as trained.
- Before training (single process, not on --resume) the base model is evaluated on the same held-out
  data, so the log shows the validation loss before and after.
- Learning rate defaults: full fine-tuning a tenth of the preset's pretraining peak (the loop's rule);
  LoRA the pretraining peak itself, since the adapters start at zero and are few (LoRA usually wants
  about ten times the full fine-tuning rate).
- LoRA on chat data also trains the embedding and output rows of <|im_start|> and <|im_end|>
  (pakar.lora token rows, 2 x 2 x hidden_size numbers): a model pretrained on text has never seen
  them, and the adapters alone can neither read nor emit them well (on `small` and id_chat, rank-16
  adapters reach a 0.29 nats lower held-out loss with the rows than without).
- LoRA epoch checkpoints are adapters only (checkpoints/lora_epoch{N}.pt, pakar.lora): the base
  checkpoint is referenced by path and sha256. --merge also writes the merged, self-contained
  checkpoints/model_epoch{N}.pt that chat, eval, export and serve read.
- --out defaults to "finetune" and must not already hold another run's checkpoints (the training loop's
  rule, pakar.train.claim_run_dir: --resume continues it, --overwrite replaces it): fine-tuning into a
  pretraining run directory would overwrite its model_epoch{N}.pt and its state.pt.
- A run stopped by --max-steps (or --time-limit) inside an epoch still ends with a validation ("after")
  and a model: checkpoints/model_step{S}.pt (LoRA: lora_step{S}.pt, and model_step{S}.pt with --merge).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pakar import PakarError
from pakar.args import CHAT_VAL_FRACTION, FinetuneArgs, TrainArgs, default_lr
from pakar.chat_data import ChatData, chat_data_key, load_chat
from pakar.checkpoint import atomic_save, build_model, file_sha256, model_checkpoint, safe_load, split_state
from pakar.config import PRESETS, ModelConfig
from pakar.corpus import VAL_FRACTION, detect_kind
from pakar.data import prepare
from pakar.distributed import setup
from pakar.evaluate import evaluate_tokens
from pakar.lora import adapter_checkpoint, apply_lora, merge_state, router_buffers
from pakar.runtime import autocast_dtype, resolve_device
from pakar.tokenizer import Tokenizer
from pakar.train import RunLog, claim_run_dir, train



def preset_name(base: dict) -> str:
    """The preset a checkpoint was trained from (for the learning-rate default and the log): its meta's
    config_name, else the preset of the same width and depth, else "default"."""
    name = base.get("meta", {}).get("config_name")
    if name in PRESETS:
        return name
    cfg = base["config"]
    for name, preset in PRESETS.items():
        if (preset.hidden_size, preset.num_hidden_layers) == (cfg.get("hidden_size"), cfg.get("num_hidden_layers")):
            return name
    return "default"


# --- running -----------------------------------------------------------------------------------------

def finetune(args: FinetuneArgs, base: dict | None = None, log=print) -> dict:
    """Fine-tune args.init_from on args.data. `base` is that checkpoint already loaded, if the caller
    has it; training takes over its "model" tensors (pakar.train.train's init_ckpt)."""

    base = base if base is not None else safe_load(args.init_from)
    cfg = ModelConfig.from_dict(base["config"])
    tokenizer = Tokenizer.from_json(base["tokenizer"])
    base_meta = base.get("meta", {})
    if args.seq_len > cfg.max_position_embeddings:
        raise PakarError(f"--seq-len {args.seq_len} exceeds the checkpoint's context of "
                         f"{cfg.max_position_embeddings} tokens")
    ctx = setup(args)  # the process group (under torchrun): this process's rank, the loop's context
    rank, world_size = ctx.rank, ctx.world_size
    claim_run_dir(args, log, is_main=ctx.is_main)  # the loop's rule: no second run over a first one
    kind = detect_kind(args.data)
    spec = args.lora_spec()
    if spec is not None and kind == "chat" and not cfg.tie_word_embeddings:
        # the ChatML markers are new to a model pretrained on text: train their embedding/output rows too
        spec = dataclasses.replace(spec, token_ids=(tokenizer.im_start_id, tokenizer.im_end_id))
    if spec is not None and args.lr is None:
        args = dataclasses.replace(args, lr=default_lr(args.config, finetune=True, lora=True))
    if args.val_fraction is None:  # explicit, so that the loop's split and the baseline evaluation agree
        args = dataclasses.replace(args, val_fraction=CHAT_VAL_FRACTION if kind == "chat" else VAL_FRACTION)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)

    data = None
    if kind == "chat":
        t0 = time.perf_counter()
        train_convs, val_convs, stats = load_chat(args.data, tokenizer, args.seq_len, args.val_fraction)
        if rank == 0:
            log(f"chat data: {stats.conversations:,} conversations, {stats.used:,} usable -> {len(train_convs):,} "
                f"train, {len(val_convs):,} held out ({args.val_fraction:g} by hash); "
                f"{sum(int(m.sum()) for _, m in train_convs):,} assistant tokens to train on "
                f"({time.perf_counter() - t0:.1f} s)")
            for w in stats.warnings(args.seq_len):
                log(f"warning: {w}")
        data = ChatData(train_convs, val_convs, args.batch, args.seq_len, args.seed, tokenizer.eot_id,
                        chat_data_key(tokenizer, train_convs, val_convs, args.seq_len, args.val_fraction),
                        rank, world_size, args.grad_accum)

    # the base model on the held-out data, for a before/after comparison
    before = None
    if not args.resume and world_size == 1:
        device = resolve_device(args.device)
        amp = autocast_dtype(args.dtype, device)
        model, _ = build_model(base, device)
        if kind == "chat":
            before = data.evaluate(model, tokenizer.token_byte_lengths(), device, amp, args.eval_tokens)
        else:

            _, tokens = prepare(args.data, run_dir, val_fraction=args.val_fraction, tokenizer=tokenizer, log=log)
            if len(tokens.val) >= 2:
                before = evaluate_tokens(model, tokens.val, args.batch, args.seq_len, tokenizer.token_byte_lengths(),
                                         args.eval_tokens, device=device, autocast_dtype=amp)
        del model
        if before is not None and before["tokens"]:
            runlog = RunLog(run_dir, True)
            bpb = before.get("bits_per_byte")
            runlog.say(f"validation (base model, before fine-tuning) | loss {before['loss']:.4f} | ppl "
                       f"{before['perplexity']:.2f}" + (f" | bpb {bpb:.4f}" if bpb is not None else "")
                       + f" | {before['tokens']:,} tokens")
            runlog.record(kind="val", step=0, epoch=0, loss=before["loss"], perplexity=before["perplexity"],
                          bits_per_byte=bpb, tokens=before["tokens"], base_model=True)
            runlog.close()

    meta = {"chat": kind == "chat" or bool(base_meta.get("chat", False)),
            "finetune": {"kind": kind, "base": str(Path(args.init_from).resolve()),
                         "lora": spec.to_dict() if spec else None,
                         "val_fraction": args.val_fraction if kind == "chat" else None}}
    customize_model = save_epoch = None
    if spec is not None:
        base_sha = file_sha256(args.init_from)
        logged = []

        def customize_model(model):
            model = apply_lora(model, spec)
            if rank == 0 and not logged:  # the loop may build a second (CPU) copy to sample from
                logged.append(True)
                n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
                n_all = sum(p.numel() for p in model.parameters())
                rows = (f" and the embedding/output rows of {', '.join(tokenizer.decode([i]) for i in spec.token_ids)}"
                        if spec.token_ids else "")
                log(f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on {', '.join(spec.targets)}{rows}: {n_train:,} "
                    f"trainable parameters ({100 * n_train / n_all:.2f}% of {n_all:,}); the base is frozen")
            return model

        def save_epoch(full_state, path_stem: Path, epoch_meta: dict) -> Path:
            base_state, adapters = split_state(full_state)
            path = path_stem.with_name(path_stem.name.replace("model_", "lora_", 1) + ".pt")
            atomic_save(adapter_checkpoint(adapters, router_buffers(base_state), spec, args.init_from, base_sha,
                                           cfg.to_dict(), **epoch_meta), path)
            if args.merge:
                merged = path_stem.with_suffix(".pt")
                state = merge_state(base_state, adapters, spec.scale)  # base_state has the trained router biases
                atomic_save(model_checkpoint(state, cfg, tokenizer.to_json(), **epoch_meta,
                                             merged_lora={"adapter": str(path.resolve()), **spec.to_dict()}), merged)
                log(f"merged the adapters into {merged}")
            return path

    summary = train(args, ctx=ctx, data=data, tokenizer=tokenizer, customize_model=customize_model,
                    save_epoch=save_epoch, meta=meta, init_ckpt=base)
    summary |= {"kind": kind, "lora": spec.to_dict() if spec else None,
                "val_loss_before": before["loss"] if before and before["tokens"] else None,
                "val_bpb_before": before.get("bits_per_byte") if before and before["tokens"] else None}
    # summary["checkpoint"] (the loop's): the last model_/lora_ epoch or step file written by this call
    if spec and args.merge and summary["checkpoint"]:
        name = Path(summary["checkpoint"]).name.replace("lora_", "model_", 1)
        summary["merged_checkpoint"] = str(Path(summary["checkpoint"]).with_name(name))
    return summary


def train_chat(args: TrainArgs) -> dict:
    """`python train.py --init-from CHECKPOINT --data chat.jsonl ...`: chat SFT with the same flags."""
    if not args.init_from:
        raise PakarError("chat data (JSONL with 'messages') fine-tunes a pretrained model: pass --init-from "
                         "CHECKPOINT (or use `pakar finetune --checkpoint CHECKPOINT`); pretrain on plain text first")

    base = safe_load(args.init_from)
    ft = FinetuneArgs(**{**dataclasses.asdict(args), "config": preset_name(base)})
    return finetune(ft, base)


# --- pakar finetune ----------------------------------------------------------------------------------


