"""Data parallelism for the training loop: single process, or torchrun + DistributedDataParallel.

The loop asks a `Context` for everything that differs between these modes (wrapping, gradient sync,
stepping, reductions, gathering a full state dict for checkpoints); the model never imports
torch.distributed. Launch with `torchrun --nproc_per_node=N train.py ...`: torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and we use NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pakar import PakarError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the loop resolves --device itself (single process)
    mode: str = "single"  # single | ddp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- wrapping and stepping --
    def wrap(self, model, optimizer):
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # every expert gets a gradient every step (see pakar.moe), so no unused-parameter search;
            # buffers (rotary tables, expert biases) are identical on every rank: no broadcast needed
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                        broadcast_buffers=False)
        return model, optimizer

    def unwrap(self, model):
        return model.module if hasattr(model, "module") else model

    def no_sync(self, model, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.mode == "ddp" and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def backward(self, model, loss):
        loss.backward()

    def clip_and_step(self, model, optimizer, max_norm: float):
        params = [p for p in self.unwrap(model).parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # -- collectives --
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.to(self.device).clone()
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.distributed:
            dist.barrier()

    # -- checkpoint state --
    def full_state(self, model, optimizer) -> dict:
        """Full, unsharded state dicts (identical on every rank for DDP)."""
        return {"model": self.unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None}

    def load_state(self, model, optimizer, state: dict):
        self.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def setup(args) -> Context:
    """Read torchrun's environment; initialise the process group when there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        if getattr(args, "deepspeed", False) or getattr(args, "fsdp", False):
            raise PakarError("--deepspeed and --fsdp need several processes: launch with "
                             "`torchrun --nproc_per_node=N train.py ...` (or `deepspeed train.py ...`)")
        return Context()
    if getattr(args, "deepspeed", False) or getattr(args, "fsdp", False):
        raise PakarError("--deepspeed and --fsdp are not available yet in this build")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and args.device in ("auto", "cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mode="ddp")


def run_on_main_first(ctx: Context, fn):
    """Run fn on rank 0 first (e.g. train the tokenizer, write the token cache), then on the others,
    which find the cache ready."""
    if ctx.is_main:
        result = fn()
        ctx.barrier()
        return result
    ctx.barrier()
    return fn()


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()  # without it a rank may exit while gloo still talks to it (sporadic SIGABRT)
        dist.destroy_process_group()
