"""`pakar train`, `pakar finetune`, `pakar lora-merge`, `pakar estimate` (and the seed's `python train.py`).

Each main builds its parser from pakar.args (no torch), parses and checks the flags, and only then
imports the training modules, so `--help` and a usage error answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from pakar import PakarError
from pakar.args import CHAT_VAL_FRACTION, DEFAULT_LR, FinetuneArgs, TrainArgs, check_number
from pakar.config import PRESETS
from pakar.corpus import VAL_FRACTION, detect_kind
from pakar.memory import PLAN_CHOICES


def add_train_args(p: argparse.ArgumentParser, defaults: TrainArgs = TrainArgs()) -> None:
    d = defaults
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training tokens (default {d.epochs})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"sequences per device per micro-step (default {d.batch})")
    p.add_argument("--config", default=d.config, help=f"model preset: {', '.join(PRESETS)} (default {d.config})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--data", nargs="+", default=d.data, help="text files, .gz, .jsonl, directories or globs "
                   "(default: the embedded Indonesian sample corpus)")
    p.add_argument("--out", default=d.out, help="run directory for tokenizer, token cache, training.log and "
                   "checkpoints/ (default: current directory)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: per preset, "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + "; a tenth of that when fine-tuning)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a fraction of the peak (default 0.1)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warmup optimizer steps (default 5%% of the run, at most 200)")
    p.add_argument("--schedule", default=d.schedule, choices=["cosine", "wsd"], help="lr decay after warmup (default cosine)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0 = off (default 1.0)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many optimizer steps "
                   "(a short run; the lr schedule is fitted to it)")
    p.add_argument("--time-limit", type=float, default=d.time_limit, help="minutes; save the state and stop when reached")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N optimizer steps (default 0: epoch ends only)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help=f"max validation tokens per evaluation (default {d.eval_tokens})")
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"save the resumable state every N steps, 0 = epoch ends only (default {d.save_every})")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"log every N optimizer steps (default {d.log_every})")
    p.add_argument("--resume", action="store_true", help="continue exactly from checkpoints/state.pt in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (deletes its "
                   "checkpoints; without it a folder holding a run is refused)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for initialisation and batch order (default {d.seed})")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"],
                   help="auto = bf16 autocast on CUDA, float32 on CPU (default auto)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of documents held out for "
                   "validation (default 0.01, or 0.05 for the embedded sample corpus)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"BPE vocabulary when a tokenizer is trained (default {d.vocab_size})")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward to save memory")
    p.add_argument("--memory-plan", default=d.memory_plan, choices=list(PLAN_CHOICES),
                   help="where weights and optimizer state live: full (float32 AdamW, fastest), lowmem (8-bit AdamW "
                   "moments; bf16 matmul weights on a bf16 GPU), offload (optimizer state and float32 master "
                   "weights in CPU RAM), auto (the fastest that fits the free memory; default)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--init-from", default=d.init_from, help="start from this checkpoint's weights and tokenizer (fine-tuning)")
    p.add_argument("--sample-prompt", default=d.sample_prompt, help=f"prompt for the greedy sample at each epoch end (default {d.sample_prompt!r})")
    p.add_argument("--deepspeed", action="store_true", help="train with a DeepSpeed ZeRO engine (pip install "
                   "'pakar[deepspeed]'; launch with torchrun or `deepspeed train.py ...`)")
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON config (default: built-in ZeRO-2; batch "
                   "sizes, accumulation, clipping and bf16 come from pakar's flags, use \"auto\" for them)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state with "
                   "FSDP2 (launch with torchrun; bf16 compute, float32 reductions on GPUs)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files into "
                   "<out>/tensorboard (pip install tensorboard; default off). Curves (PNG) and report.md are "
                   "written into --out either way")
    # the deepspeed launcher passes --local_rank=N; torchrun's LOCAL_RANK variable says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def args_from_namespace(ns: argparse.Namespace, cls=TrainArgs):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`pakar train`; chat JSONL data with --init-from is the seed's form of chat fine-tuning."""
    p = argparse.ArgumentParser(prog=prog, description="Train a pakar MoE model.")
    add_train_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object at the end")
    ns = p.parse_args(argv)
    args = args_from_namespace(ns)
    if args.data and detect_kind(args.data) == "chat":
        from pakar.finetune import train_chat  # lazy: torch, after the flags are checked

        summary = train_chat(args)
    else:
        from pakar.train import train  # lazy: torch, after the flags are checked

        summary = train(args)
    if ns.json and int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return 128 + summary["signal"] if summary.get("signal") else 0  # a shell's status for a signal


def finetune_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, conflict_handler="resolve", description=(
        "Fine-tune a checkpoint: continued pretraining on plain text, or supervised fine-tuning on chat JSONL "
        "(loss on assistant turns only); all weights, or LoRA adapters with --lora-rank."))
    add_train_args(p, FinetuneArgs(init_from="-"))
    # what pretraining chooses and fine-tuning takes from the checkpoint: hidden, refused if given
    for flag in ("--config", "--vocab-size"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", "--init-from", dest="init_from", required=True, metavar="PATH",
                   help="model checkpoint to start from: its weights, architecture and tokenizer")
    p.add_argument("--sample-prompt", default=FinetuneArgs.sample_prompt, help="text data: prompt for the greedy "
                   f"sample at each epoch end (default {FinetuneArgs.sample_prompt!r}; chat data: no sample)")
    p.add_argument("--data", nargs="+", required=True, metavar="SPEC", help="plain text (.txt, .gz, JSONL "
                   "{\"text\"}: continued pretraining) or chat JSONL ({\"messages\": [...]}: supervised "
                   "fine-tuning); files, folders or globs")
    p.add_argument("--out", default="finetune", help="run directory for training.log, checkpoints/ and (text) "
                   "the token cache; must not hold another run (default: finetune)")
    p.add_argument("--seq-len", type=int, default=None, help="text: tokens per training window (default 256); "
                   "chat: the longest conversation kept, in tokens, longer ones are skipped and counted "
                   "(default: the model's context)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: a tenth of the preset's "
                   "pretraining rate, " + ", ".join(f"{k} {v / 10:g}" for k, v in DEFAULT_LR.items())
                   + "; with LoRA the pretraining rate itself)")
    p.add_argument("--val-fraction", type=float, default=None, help="share held out for validation, chosen by "
                   f"content hash (default: {CHAT_VAL_FRACTION:g} of chat conversations, {VAL_FRACTION:g} of text "
                   "documents)")
    p.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters instead of all weights "
                   "(default 0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: updates are scaled by "
                   "alpha/rank (default 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", default=["attention"], help="tensors to adapt: q_proj k_proj v_proj "
                   "o_proj gate_proj up_proj down_proj, or the groups attention, experts (every expert's "
                   "gate/up/down_proj; a dense model's MLP), all (default: attention)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write merged, self-contained "
                   "checkpoints/model_epoch{N}.pt next to the adapters")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object at the end")
    return p


def main_finetune(argv: list[str] | None = None, prog: str | None = None) -> int:
    ns = finetune_parser(prog).parse_args(argv)
    for flag in ("config", "vocab_size"):
        if getattr(ns, flag) is not None:
            raise PakarError(f"--{flag.replace('_', '-')} does not apply to fine-tuning: the architecture and the "
                             "tokenizer come from --checkpoint")
    del ns.vocab_size  # the tokenizer is the checkpoint's; FinetuneArgs keeps its unused default
    from pakar.checkpoint import safe_load  # lazy: torch, after the flags are parsed
    from pakar.finetune import finetune, preset_name

    base = safe_load(ns.init_from)
    ns.config = preset_name(base)
    if ns.seq_len is None:
        context = int(base["config"]["max_position_embeddings"])
        ns.seq_len = context if detect_kind(ns.data) == "chat" else min(256, context)
    summary = finetune(args_from_namespace(ns, FinetuneArgs), base)
    if ns.json and int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return 0


def main_merge(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Fold a LoRA adapter into its base model and write a "
                                "self-contained checkpoint (for chat, eval, export and serve).")
    p.add_argument("--adapter", required=True, help="adapter file written by `pakar finetune --lora-rank R` "
                   "(checkpoints/lora_epoch{N}.pt)")
    p.add_argument("--base", default=None, help="base checkpoint (default: the path recorded in the adapter; "
                   "its sha256 must match)")
    p.add_argument("--out", required=True, help="path of the merged model checkpoint (.pt)")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object, last")
    args = p.parse_args(argv)
    from pakar.lora import merge_adapter_file  # lazy: torch, after the flags are parsed

    out = merge_adapter_file(args.adapter, args.base, args.out)
    if args.json:
        print(json.dumps({"merged": str(out), "bytes": out.stat().st_size}))
    return 0


def main_estimate(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`pakar estimate`: train's flags (the same command line with `estimate` for `train`), answered
    with the run's token count, time and memory before it runs."""
    p = argparse.ArgumentParser(prog=prog, description="Estimate a training run before running it: tokens in "
                                "the corpus, tokens/s measured over a few real training steps on this device, "
                                "time per epoch and in total, predicted and measured peak memory, and the same "
                                "run's time on reference GPUs. Takes `pakar train`'s flags.")
    add_train_args(p)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps to time after one warm-up step "
                   "(default: as many as fit in about 12 s, 1 to 50)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ns = p.parse_args(argv)
    for flag in ("resume", "init_from", "deepspeed", "fsdp"):
        if getattr(ns, flag):
            raise PakarError(f"--{flag.replace('_', '-')} does not apply to pakar estimate (it estimates a "
                             "fresh single-process run)")
    check_number("--steps", ns.steps, 1)
    args = args_from_namespace(ns)
    if args.data and detect_kind(args.data) == "chat":
        raise PakarError("pakar estimate takes plain-text --data (chat JSONL is fine-tuning: pakar finetune)")
    from pakar.estimate import estimate, render  # lazy: torch, after the flags are checked

    r = estimate(args, ns.steps, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(r) if ns.json else render(r))
    return 0
