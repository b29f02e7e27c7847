"""Scaling out the training loop: one process, or many under torchrun / the deepspeed launcher.

The loop asks a `Context` for everything that differs between the modes (wrapping, gradient sync,
backward, stepping, reductions, full state dicts for checkpoints); the model never imports
torch.distributed. Modes:

- single     one process, no process group (also `torchrun --nproc_per_node=1`).
- ddp        the default with several processes: DistributedDataParallel, one full replica per rank,
             gradients all-reduced (averaged) once per optimizer step (no_sync on earlier micro-batches).
- fsdp       `--fsdp`: FSDP2 (`fully_shard`) on every transformer block and on the root, so parameters,
             gradients and AdamW state are sharded over the ranks; on CUDA, bf16 parameters for compute
             with float32 master weights and float32 gradient reduce-scatter (MixedPrecisionPolicy).
             Gradients are reduce-scattered after every micro-batch, which keeps them sharded (the
             point of FSDP) at the price of one reduce-scatter per micro-batch.
- deepspeed  `--deepspeed [--deepspeed-config FILE]`: a DeepSpeed engine with ZeRO stage 1/2/3 (built-in
             default: ZeRO-2; bf16 on CUDA, float32 on a CPU). The batch size,
             gradient accumulation and clipping always come from pakar's flags (a config file may say
             "auto" or the same value, anything else is refused), and so does the learning rate, which
             the loop sets on the engine's parameter groups every step (a "scheduler" section is refused).
             Under ZeRO-3 each MoE block is a leaf module: its router and all experts are gathered once
             on entry, whatever the routing, so no rank waits for an expert that got no tokens.

The DeepSpeed side (engine, config, ZeRO state gathering) lives in pakar.zero; `Context` holds typed
fields (the rank, the device, the compute dtype and, in deepspeed mode, a `pakar.zero.DeepSpeedMode`
built from the few flags DeepSpeed needs), not the training arguments.

Loss scaling is the same in every mode: the loop divides each micro-batch's summed cross-entropy by the
global number of targets in the optimizer step and multiplies by world_size, because DDP all-reduce,
FSDP reduce-scatter and DeepSpeed all average over ranks; DeepSpeed's own division by the gradient
accumulation steps is switched off (`scale_wrt_gas=False`), since the loop already normalises across
micro-batches. So N ranks x batch B compute the same gradient as one process running N micro-batches
of B, and the logged grad norm is the norm of that global gradient in every mode.

Checkpoints. `full_state` gathers plain, unsharded state dicts in the same format in every mode (a
collective under FSDP and DeepSpeed: every rank calls it, rank 0 gets the tensors, on the CPU):
the model as `Transformer.state_dict()` in float32 (the FSDP/ZeRO master weights, not the bf16 working
copy) and the optimizer keyed by parameter name (torch.distributed.checkpoint's full optimizer state
dict: {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}). So
model_epoch{N}.pt is the same self-contained file whatever the mode, and the resumable state.pt is one
file that loads with weights_only=True. We chose the gathered state over sharded DCP folders or
DeepSpeed's own checkpoint files: simpler, portable, and fine up to the 3b preset (the 3b state is
about 35 GB of CPU memory on rank 0 while saving); DeepSpeed's files would also need unrestricted
unpickling to load. A state is resumed with the same number of processes (the loop checks).

Processes: torchrun (or the deepspeed launcher) sets RANK, WORLD_SIZE and LOCAL_RANK; each rank uses
cuda:LOCAL_RANK with NCCL, or the CPU with gloo. `--fsdp`/`--deepspeed` also run as one process
without a launcher (an in-process store, no port), e.g. DeepSpeed ZeRO-Offload on a single GPU.
Waiting for rank 0 to prepare the data goes through a gloo group with a long timeout, so a slow
tokenizer training on a big corpus never trips the NCCL watchdog.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from pakar import PakarError
from pakar.runtime import autocast_dtype, resolve_device
from pakar.zero import DeepSpeedMode, DeepSpeedSettings, import_deepspeed

DATA_WAIT = datetime.timedelta(hours=12)  # rank 0 tokenizing a large corpus while the others wait


def unwrap(model):
    """The Transformer inside a DDP wrapper or DeepSpeed engine (FSDP2 shards in place): the one place
    that peels a wrapper."""
    return model.module if hasattr(model, "module") else model


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the loop resolves --device itself (single process)
    mode: str = "single"  # single | ddp | fsdp | deepspeed
    amp: torch.dtype | None = None  # bf16 compute dtype (FSDP parameters, DeepSpeed bf16), None = float32
    wait_group: object = None  # gloo group with a long timeout for run_on_main_first
    zero: DeepSpeedMode | None = None  # deepspeed mode: the engine's side of every operation below

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage (known once `wrap` has run), None in the other modes."""
        return self.zero.zero_stage if self.zero is not None else None

    @property
    def shards_parameters(self) -> bool:
        """True when no rank holds the whole model (FSDP, ZeRO-3): a forward pass is then a collective,
        so rank-0-only work (the epoch-end sample) must use a plain copy built from `full_state`."""
        return self.mode == "fsdp" or (self.zero is not None and self.zero.shards_parameters)

    # -- wrapping ---------------------------------------------------------------------------------
    def wrap(self, model, optimizer):
        """Returns (model to call, optimizer whose param_groups take the learning rate). The model has
        already been moved to the device, set up for activation checkpointing and compiled per block
        (in that order: the torchtitan order, so FSDP's hooks stay outside the compiled blocks)."""
        if self.mode == "ddp":
            # every expert gets a gradient every step (see pakar.moe), so no unused-parameter search;
            # buffers (rotary tables, expert biases) are identical on every rank: no per-forward broadcast
            # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
            sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else {"broadcast_buffers": False})
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **sync)
        elif self.mode == "fsdp":
            model, optimizer = self._wrap_fsdp(model, optimizer)
        elif self.mode == "deepspeed":
            model, optimizer = self.zero.wrap(model, optimizer, _param_group_names(model, optimizer))
        return model, optimizer

    def _wrap_fsdp(self, model, optimizer):
        group_names = _param_group_names(model, optimizer)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=self.amp, reduce_dtype=torch.float32) if self.amp is not None
              else MixedPrecisionPolicy())
        # one unit per block (its parameters are gathered just before it runs and freed after), then the
        # root for what is left (embeddings, final norm, lm_head, which share a unit when tied)
        for layer in getattr(model, "layers", []):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        # fully_shard replaced every parameter with a sharded DTensor parameter: point the (still
        # stateless) optimizer's groups at the new ones
        assert not optimizer.state, "the optimizer must not have stepped before sharding"
        params = dict(model.named_parameters())
        for g, names in zip(optimizer.param_groups, group_names):
            g["params"] = [params[n] for n in names]
        return model, optimizer

    unwrap = staticmethod(unwrap)

    # -- one optimizer step ------------------------------------------------------------------------
    def no_sync(self, model, last: bool):
        """Enter for each micro-batch's forward and backward; `last` marks the final micro-batch of the
        optimizer step, the one whose backward reduces the gradients."""
        if self.mode == "ddp" and not last:
            return model.no_sync()
        if self.zero is not None:
            return self.zero.no_sync(model, last)
        return contextlib.nullcontext()

    def backward(self, model, loss):
        if self.zero is not None:
            self.zero.backward(model, loss)
        else:
            loss.backward()

    def clip_and_step(self, model, optimizer, max_norm: float, loss: torch.Tensor) -> tuple[float, float, bool]:
        """Clip the global gradient to max_norm (0 = no clipping), step unless the step is non-finite,
        zero the gradients. `loss` is the step's global mean loss (0-dim, equal on every rank). Reads the
        loss and the gradient norm in one host-device sync (the loop read the loss every step anyway).
        Returns (loss, global gradient norm before clipping, whether the update was applied).

        Skipping is the same decision on every rank: the loss is all-reduced, and the norm is of the
        global gradient (DDP: the all-reduced, identical gradients; FSDP: a reduction over the shards),
        and a NaN on one rank becomes a NaN on all of them through those reductions. DeepSpeed decides
        inside engine.step(), which cannot be called halfway: its ZeRO optimizers skip an update whose
        global gradient norm is NaN/inf (DeepSpeed 0.19: ZeRO-3 always, ZeRO-1/2 in float32 and with
        bf16's check_grad_overflow, on by default) and count it in engine.skipped_steps; a non-finite
        loss with finite gradients is applied there, and the loop then stops without saving."""
        if self.zero is not None:
            return self.zero.clip_and_step(model, loss)
        params = [p for p in self.unwrap(model).parameters() if p.grad is not None]
        if self.mode == "fsdp":
            # each rank holds a shard of every gradient: the norm of the DTensors is a reduction over ranks
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        loss_value, norm_value = torch.stack([loss.float(), norm.float().to(loss.device)]).tolist()
        applied = math.isfinite(loss_value) and math.isfinite(norm_value)
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, applied

    # -- collectives -------------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.to(self.device).clone()
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def check_same(self, value: str, what: str) -> None:
        """Refuse to train when ranks disagree on `value` (e.g. each node tokenized its own copy of the
        corpus with a different tokenizer): they would otherwise train on different token ids."""
        if not self.distributed:
            return
        h = int.from_bytes(hashlib.sha256(value.encode()).digest()[:7], "little")  # fits an int64
        lo, hi = torch.tensor([h], device=self.device), torch.tensor([-h], device=self.device)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MIN)
        if int(lo) != -int(hi):
            raise PakarError(f"the processes do not agree on {what}: give every node the same --data and put "
                             f"--out on a shared filesystem (or copy the run folder to each node first)")

    # -- checkpoint state --------------------------------------------------------------------------
    def full_state(self, model, optimizer) -> dict:
        """{"model": full float32 state dict, "optimizer": full state keyed by parameter name, or None
        when optimizer is None}. Every rank must call it; only rank 0's result is complete."""
        if self.zero is not None:
            return self.zero.full_state(model, optimizer is not None)
        if self.mode == "fsdp":
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return {"model": get_model_state_dict(model, options=opts),
                    "optimizer": (get_optimizer_state_dict(model, optimizer, options=opts)
                                  if optimizer is not None else None)}
        raw = self.unwrap(model)  # single and DDP: every rank has everything
        # bfloat16 weights of a lowmem/offload plan: float32 copies on the host (on the GPU they could
        # exceed the memory the plan saved), so that checkpoints stay float32 whatever the plan
        model_state = {k: v.to("cpu", torch.float32) if v.is_floating_point() and v.dtype != torch.float32 else v
                       for k, v in raw.state_dict().items()}
        return {"model": model_state,
                "optimizer": (get_optimizer_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True))
                              if optimizer is not None else None)}

    def load_state(self, model, optimizer, state: dict):
        """Load a `full_state` (as saved in state.pt; every rank has read the file) into the wrapped
        model and its optimizer."""
        try:
            if self.zero is not None:
                self.zero.load_state(model, state)
            elif self.mode == "fsdp":
                opts = StateDictOptions(full_state_dict=True)  # each rank cuts its own shards from the full tensors
                set_model_state_dict(model, state["model"], options=opts)
                set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
            else:
                raw = self.unwrap(model)
                raw.load_state_dict(state["model"])
                set_optimizer_state_dict(raw, optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PakarError(f"cannot resume: the saved training state does not fit this model and optimizer "
                             f"({type(e).__name__}: {first}); start a new run in another --out") from None


def _param_group_names(model, optimizer) -> list[list[str]]:
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


# -- setup and teardown ------------------------------------------------------------------------------
def pick_backend(device: torch.device) -> str:
    """NCCL for CUDA where this PyTorch build has it; gloo otherwise (the CPU, and CUDA on Windows and
    macOS, whose PyTorch builds have no NCCL)."""
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def setup(args) -> Context:
    """Read the launcher's environment, pick the device, initialise the process group. One process
    without --fsdp/--deepspeed needs no process group at all."""
    fsdp, use_ds = bool(getattr(args, "fsdp", False)), bool(getattr(args, "deepspeed", False))
    if fsdp and use_ds:
        raise PakarError("--fsdp and --deepspeed are alternatives: pick one")
    if getattr(args, "deepspeed_config", None) and not use_ds:
        raise PakarError("--deepspeed-config needs --deepspeed")
    launched = "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 and not (fsdp or use_ds):
        return Context()
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = _pick_device(args.device, local_rank, world_size)
    if use_ds:
        import_deepspeed(device)  # fail early, before any data work, if it is missing
    backend = pick_backend(device)
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        if launched:
            dist.init_process_group(backend, **kw)
        else:  # one process, no launcher: an in-process store needs no address or port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(k, v)  # DeepSpeed reads them
    wait_group = dist.new_group(backend="gloo", timeout=DATA_WAIT)
    mode = "deepspeed" if use_ds else "fsdp" if fsdp else "ddp"
    amp = autocast_dtype(args.dtype, device)
    zero = (DeepSpeedMode(DeepSpeedSettings.from_args(args), device, world_size, amp, is_main=rank == 0)
            if use_ds else None)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mode=mode,
                   amp=amp, wait_group=wait_group, zero=zero)


def _pick_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """cuda:LOCAL_RANK (one GPU per process) or the CPU."""
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise PakarError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                                 f"start at most {torch.cuda.device_count()} processes per node")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)  # NCCL and every .cuda() without an index use this GPU
            return device
        if name == "cuda":
            raise PakarError("--device cuda was asked for but no CUDA GPU is available to PyTorch")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda:") and world_size == 1:
        device = resolve_device(name)
        torch.cuda.set_device(device)
        return device
    raise PakarError(f"--device {name!r} with several processes: use --device cuda (each process takes "
                     f"cuda:LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES) or --device cpu")


def run_on_main_first(ctx: Context, fn):
    """Run fn (train the tokenizer, write the token cache) on rank 0 first, then on the first process
    of every other node, then on all the others, which find the cache ready. With the run folder on a
    shared filesystem every later call is a cache hit; without one, each node builds its own copy once
    (the loop then checks that all ranks hold the same data)."""
    result = None
    for phase in (ctx.is_main, not ctx.is_main and ctx.local_rank == 0, ctx.local_rank != 0):
        if phase:
            result = fn()
        if ctx.distributed:
            dist.barrier(group=ctx.wait_group)
    return result


def teardown(ctx: Context) -> None:
    if ctx.wait_group is not None and dist.is_initialized():
        dist.barrier()  # without it a rank may exit while gloo still talks to it (sporadic SIGABRT)
        dist.destroy_process_group()
        gc.collect()  # free what still refers to the groups while the interpreter is fully alive
