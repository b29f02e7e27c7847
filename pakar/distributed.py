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
import copy
import datetime
import gc
import hashlib
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from pakar import PakarError
from pakar.moe import MoE
from pakar.runtime import autocast_dtype, resolve_device

# ZeRO-2 by default: optimizer state and gradients sharded, parameters replicated, so forward and
# backward run without parameter gathers. DeepSpeed's own defaults otherwise; note that with bf16 it
# reduces gradients in bf16 (a config file can ask for "communication_data_type": "fp32", as DDP's
# float32 gradients and FSDP's reduce_dtype give).
DEEPSPEED_DEFAULT = {"zero_optimization": {"stage": 2, "contiguous_gradients": True}}
DATA_WAIT = datetime.timedelta(hours=12)  # rank 0 tokenizing a large corpus while the others wait


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the loop resolves --device itself (single process)
    mode: str = "single"  # single | ddp | fsdp | deepspeed
    amp: torch.dtype | None = None  # bf16 compute dtype (FSDP parameters, DeepSpeed bf16), None = float32
    args: object = None  # the TrainArgs (DeepSpeed config: batch, grad_accum, grad_clip, config file)
    zero_stage: int | None = None  # DeepSpeed only
    wait_group: object = None  # gloo group with a long timeout for run_on_main_first
    _group_names: list = field(default_factory=list)  # DeepSpeed: parameter names of each optimizer group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shards_parameters(self) -> bool:
        """True when no rank holds the whole model (FSDP, ZeRO-3): a forward pass is then a collective,
        so rank-0-only work (the epoch-end sample) must use a plain copy built from `full_state`."""
        return self.mode == "fsdp" or (self.mode == "deepspeed" and self.zero_stage == 3)

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
            model, optimizer = self._wrap_deepspeed(model, optimizer)
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

    def _wrap_deepspeed(self, model, optimizer):
        deepspeed = import_deepspeed(self.device)
        config = deepspeed_config(self.args, self.world_size, self.amp, optimizer)
        self.zero_stage = config["zero_optimization"]["stage"]
        if self.zero_stage == 3:
            if getattr(self.args, "compile", False):
                raise PakarError("--compile does not work with DeepSpeed ZeRO-3 (its parameter hooks run inside "
                                 "each block); use ZeRO-1/2 or --fsdp with --compile")
            deepspeed.utils.set_z3_leaf_modules(model, [MoE])
        self._group_names = _param_group_names(model, optimizer)
        # DeepSpeed casts the whole module to bf16, buffers included; the rotary tables and the expert
        # selection biases must stay float32 (positions and tiny bias updates would round away)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        if "optimizer" in config:  # the config names its own optimizer (e.g. for ZeRO-Offload's CPU Adam)
            kw = {"model_parameters": [{k: v for k, v in g.items() if k in ("params", "weight_decay")}
                                       for g in optimizer.param_groups]}
        else:
            kw = {"optimizer": optimizer}
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, config=config, dist_init_required=False, **kw)
        for name, b in buffers.items():
            owner, _, leaf = name.rpartition(".")
            setattr(engine.module.get_submodule(owner), leaf, b.to(self.device))
        return engine, ds_optimizer

    def unwrap(self, model):
        """The Transformer inside a DDP wrapper or DeepSpeed engine (FSDP2 shards in place)."""
        return model.module if hasattr(model, "module") else model

    # -- one optimizer step ------------------------------------------------------------------------
    def no_sync(self, model, last: bool):
        """Enter for each micro-batch's forward and backward; `last` marks the final micro-batch of the
        optimizer step, the one whose backward reduces the gradients."""
        if self.mode == "ddp" and not last:
            return model.no_sync()
        if self.mode == "deepspeed":
            model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, model, loss):
        if self.mode == "deepspeed":
            model.backward(loss, scale_wrt_gas=False)  # the loop already normalised over micro-batches
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
        if self.mode == "deepspeed":
            skipped = model.skipped_steps
            model.step()  # clips to the config's gradient_clipping (= --grad-clip) itself
            norm = model.get_global_grad_norm()
            return float(loss), float("nan") if norm is None else float(norm), model.skipped_steps == skipped
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
        if self.mode == "deepspeed":
            return self._deepspeed_full_state(model, optimizer is not None)
        if self.mode == "fsdp":
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return {"model": get_model_state_dict(model, options=opts),
                    "optimizer": (get_optimizer_state_dict(model, optimizer, options=opts)
                                  if optimizer is not None else None)}
        raw = self.unwrap(model)  # single and DDP: every rank has everything
        return {"model": raw.state_dict(),
                "optimizer": (get_optimizer_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True))
                              if optimizer is not None else None)}

    def load_state(self, model, optimizer, state: dict):
        """Load a `full_state` (as saved in state.pt; every rank has read the file) into the wrapped
        model and its optimizer."""
        try:
            if self.mode == "deepspeed":
                self._deepspeed_load_state(model, state)
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

    def _deepspeed_full_state(self, engine, with_optimizer: bool) -> dict:
        """Gather float32 master weights and AdamW moments from ZeRO's partitions, one parameter at a
        time (each is an all-reduce or all-gather over the data-parallel group, so every rank takes
        part; rank 0 keeps the result on the CPU)."""
        # lazy: the optional DeepSpeed package
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        module = engine.module
        inner = engine.optimizer.optimizer if with_optimizer else None  # the torch optimizer ZeRO wraps
        keys, step = [], None
        if inner is not None and inner.state:
            _relink_zero_views(engine.optimizer)
            first = next(iter(inner.state.values()))
            keys = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
            step = first.get("step", inner.param_groups[0].get("step"))
        names = {}
        for n, p in module.named_parameters():
            names.setdefault(id(p), n)
        model_sd, opt_state, done = {}, {}, {}
        for key, t in module.state_dict(keep_vars=True).items():
            if id(t) in done:  # a tied weight, already gathered under its first name
                model_sd[key] = done[id(t)]
                continue
            if id(t) in names:
                full = safe_get_full_fp32_param(t) if t.requires_grad else None
                if full is None:  # frozen (not in the optimizer): the module's own copy is the value
                    with self._gathered(t):
                        full = t.detach().clone()
                value = full.detach().float().cpu() if self.is_main else None
                if keys and t.requires_grad:
                    moments = {k: safe_get_full_optimizer_state(t, k) for k in keys}
                    if self.is_main:
                        opt_state[names[id(t)]] = {"step": torch.tensor(float(step)),
                                                   **{k: v.detach().float().cpu() for k, v in moments.items()}}
            else:  # a buffer: not partitioned, the same on every rank
                value = t.detach().cpu().clone() if self.is_main else None
            done[id(t)] = model_sd[key] = value
        optim = None
        if with_optimizer:
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names_}
                      for g, names_ in zip(engine.optimizer.param_groups, self._group_names)]
            optim = {"state": opt_state, "param_groups": groups}
        return {"model": model_sd if self.is_main else {}, "optimizer": optim}

    def _deepspeed_load_state(self, engine, state: dict):
        # lazy: the optional DeepSpeed package
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        module, model_sd = engine.module, state["model"]
        saved = (state.get("optimizer") or {}).get("state", {})
        inner = engine.optimizer.optimizer
        sample = next(iter(saved.values()), None)
        keys = [k for k, v in sample.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0] if sample else []
        if sample is not None and not inner.state:
            # torch optimizers create their state at the first step, and ZeRO scatters into that state:
            # create it now for each flat float32 partition (zeros, the saved step count; the step on the
            # partition's device for fused/capturable AdamW, as torch keeps it), then let ZeRO-1/2 link
            # its per-parameter views to it
            for flat, group in _zero_flat_partitions(engine.optimizer):
                on_device = group.get("fused") or group.get("capturable")
                inner.state[flat] = {"step": torch.tensor(float(sample["step"]), dtype=torch.float32,
                                                          device=flat.device if on_device else "cpu"),
                                     **{k: torch.zeros_like(flat) for k in keys}}
            _relink_zero_views(engine.optimizer)
        for name, p in module.named_parameters():
            value = model_sd[name].to(self.device)
            if p.requires_grad:
                safe_set_full_fp32_param(p, value.float())
                for k in keys:
                    safe_set_full_optimizer_state(p, saved[name][k].to(self.device), k)
            # the working copy the forward pass reads (bf16 on GPU), rounded from the same master weights
            with self._gathered(p, modify=True):
                p.data.copy_(value)
        for name, b in module.named_buffers():
            if name in model_sd:
                b.copy_(model_sd[name])

    def _gathered(self, param, modify: bool = False):
        """The full parameter inside the block under ZeRO-3 (written back from rank 0 when modify)."""
        if self.mode == "deepspeed" and self.zero_stage == 3:
            import deepspeed  # lazy: the optional DeepSpeed package

            return deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None)
        return contextlib.nullcontext()


def _relink_zero_views(zero_optimizer) -> None:
    """ZeRO-1/2 (and DeepSpeed's bf16 optimizer) reach a parameter's AdamW moments through views into
    the flat state of its group, linked once, right after the first group's first step, when the other
    groups have no state yet (DeepSpeed 0.19): with pakar's two groups (decay / no decay) the second
    group's views would stay empty. Link again, now that every group has its state. ZeRO-3 reads the
    optimizer state directly and has no such views."""
    if hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _zero_flat_partitions(zero_optimizer) -> list:
    """(flat float32 partition, its torch param group) for each group this rank steps: the tensors the
    wrapped torch optimizer keeps its state for (ZeRO-3 swaps them into the groups only while stepping)."""
    inner = zero_optimizer.optimizer
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3 (sub-groups of the param groups)
        return [(flat, inner.param_groups[zero_optimizer.sub_group_to_group_id[i]])
                for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat)]
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):  # ZeRO-1/2, bf16 optimizer
        if hasattr(zero_optimizer, attr):
            return list(zip(getattr(zero_optimizer, attr), inner.param_groups))
    raise PakarError(f"cannot resume with DeepSpeed's {type(zero_optimizer).__name__}: pakar does not know where "
                     "it keeps its float32 partitions")


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
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mode=mode,
                   amp=autocast_dtype(args.dtype, device), args=args, wait_group=wait_group)


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


# -- DeepSpeed ---------------------------------------------------------------------------------------
def import_deepspeed(device: torch.device):
    """DeepSpeed, imported on first use (an optional extra), set to the accelerator we train on."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported
    try:
        import deepspeed  # lazy: the optional DeepSpeed package
    except ImportError:
        raise PakarError("--deepspeed needs DeepSpeed: pip install 'pakar[deepspeed]' "
                         "(or pip install deepspeed)") from None
    if device.type == "cpu":
        # the CPU accelerator would compile a shared-memory all-reduce kernel (C++/OpenMP) at its first
        # start, about two minutes on two cores; gloo's collectives are all CPU training needs
        try:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except (AttributeError, TypeError):
            pass
    deepspeed.utils.logger.setLevel(logging.WARNING)  # pakar logs the training; keep DeepSpeed's INFO lines out
    accel = deepspeed.get_accelerator().device_name()
    if accel != device.type:
        raise PakarError(f"DeepSpeed uses its {accel!r} accelerator but training runs on {device}: "
                         f"set DS_ACCELERATOR={device.type} (or choose --device {accel})")
    return deepspeed


def deepspeed_config(args, world_size: int, amp: torch.dtype | None, optimizer=None) -> dict:
    """The DeepSpeed config: --deepspeed-config's JSON (or DEEPSPEED_DEFAULT) with the batch sizes,
    gradient accumulation, clipping and precision filled in from pakar's flags."""
    src = getattr(args, "deepspeed_config", None)
    if src:
        path = Path(src)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise PakarError(f"--deepspeed-config {path}: cannot read it ({e.strerror or type(e).__name__})") from None
        except ValueError as e:
            raise PakarError(f"--deepspeed-config {path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise PakarError(f"--deepspeed-config {path}: expected a JSON object")
        where = f"--deepspeed-config {path}"
    else:
        cfg, where = copy.deepcopy(DEEPSPEED_DEFAULT), "the built-in DeepSpeed config"

    owned = {"train_micro_batch_size_per_gpu": (args.batch, "--batch"),
             "gradient_accumulation_steps": (args.grad_accum, "--grad-accum"),
             "train_batch_size": (args.batch * args.grad_accum * world_size, "--batch x --grad-accum x processes"),
             "gradient_clipping": (float(args.grad_clip), "--grad-clip")}
    for key, (ours, flag) in owned.items():
        theirs = cfg.get(key, "auto")
        if theirs != "auto" and theirs != ours:
            raise PakarError(f"{where}: {key} is {theirs!r} but pakar's {flag} give {ours}; set it to \"auto\" "
                             f"or remove it (pakar fills it in)")
        cfg[key] = ours
    if cfg.get("scheduler"):
        raise PakarError(f"{where}: remove \"scheduler\": pakar sets the learning rate every step "
                         "(--lr, --warmup, --schedule, --min-lr-ratio)")
    if (cfg.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        raise PakarError(f"{where}: fp16 is not supported (MoE routing is fragile in fp16); pakar trains in "
                         "bf16 on GPUs (\"bf16\": {\"enabled\": \"auto\"}) or float32")
    cfg.pop("fp16", None)
    bf16 = amp == torch.bfloat16
    theirs = (cfg.get("bf16") or {}).get("enabled", "auto")
    if theirs != "auto" and bool(theirs) != bf16:
        raise PakarError(f"{where}: bf16.enabled is {theirs!r} but --dtype {args.dtype} on this device means "
                         f"{'bf16' if bf16 else 'float32'}; set it to \"auto\" or change --dtype")
    cfg["bf16"] = {**(cfg.get("bf16") or {}), "enabled": bf16}
    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise PakarError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if offload and "optimizer" not in cfg and optimizer is not None:
        # ZeRO-Offload steps on the CPU with DeepSpeed's CPU Adam, built from a config section; give it
        # pakar's AdamW settings (the learning rate is set every step anyway)
        d = optimizer.defaults
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": d["lr"], "betas": list(d["betas"]), "eps": d["eps"],
                                                        "weight_decay": d["weight_decay"]}}
    cfg.setdefault("steps_per_print", 2**31 - 1)  # pakar logs progress itself
    return cfg
