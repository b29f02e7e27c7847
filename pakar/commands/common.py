"""Parser pieces the model-using commands share (chat, chat-batch, serve): flags and their checks.

Standard library and pakar.args only, so every parser builds before torch loads.
"""

from __future__ import annotations

import argparse

from pakar.args import check_number


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model checkpoint (default: the newest checkpoints/model_epoch*.pt "
                   "in the current folder)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and cache dtype (default auto: bfloat16 on a GPU that supports it, else float32)")
    add_quantize_arg(p)
    p.add_argument("--mode", default="auto", choices=["auto", "chat", "text"],
                   help="chat: ChatML template; text: continue text; auto: chat when the checkpoint was "
                   "chat fine-tuned (default auto)")


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: 8-bit weights with per-channel scales for attention, experts and output head "
                        "(CPU only, float32 between products; faster decoding, see pakar eval --quantize) "
                        "(default: none)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, max_new: int) -> None:
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens, 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1], 1 = off (default 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="> 1 discourages repeating tokens, 1 = off (default 1.1)")
    p.add_argument("--max-new-tokens", type=int, default=max_new, help=f"tokens per answer at most (default {max_new})")
    p.add_argument("--system", default=None, help="system prompt for chat mode (default: none)")


def add_rag_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default=None, help="answer from this `pakar index` folder: each question is "
                   "searched and asked with numbered sources (default: no retrieval)")
    p.add_argument("--rag-k", type=int, default=3, help="passages retrieved per question with --index (default 3)")


def check_sampling_flags(args) -> None:
    """One line naming the flag for out-of-range sampling flags (argparse lets nan and inf through)."""
    check_number("--temperature", args.temperature, 0)
    check_number("--top-k", args.top_k, 0)
    check_number("--top-p", args.top_p, 0, 1, low_open=True)
    check_number("--repetition-penalty", args.repetition_penalty, 0, low_open=True)
    check_number("--max-new-tokens", args.max_new_tokens, 1)
    check_number("--seed", args.seed, 0, 2**63 - 2**20)  # a generator seed; chat-batch adds the prompt index


def open_retriever(args: argparse.Namespace):
    """The --index retriever (pakar.rag.Retriever), None without --index."""
    if not args.index:
        return None
    from pakar.rag import Retriever  # lazy: numpy and the index, after the flags are checked

    return Retriever(args.index, args.rag_k)


def sampling_from_args(args: argparse.Namespace, seed: int | None = None):
    """The sampling flags as pakar.engine.SamplingParams (which checks them once more)."""
    from pakar.engine import SamplingParams  # lazy: torch, after the flags are checked

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=seed)
