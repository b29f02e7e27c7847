"""DeepSpeed ZeRO for the training loop: the `--deepspeed` half of pakar.distributed, in its own module
because it is the one mode that reaches into a third-party engine's internals.

`DeepSpeedMode` is what pakar.distributed.Context delegates to in deepspeed mode: wrapping (the engine),
the micro-batch boundary, backward, stepping, and the full float32 state dicts of checkpoints. Design
(the mode's promises are in pakar.distributed's docstring):
- The config comes from `deepspeed_config`: the user's JSON (or DEEPSPEED_DEFAULT) with the batch
  sizes, gradient accumulation, clipping and precision always taken from pakar's flags.
- Checkpoints are gathered through DeepSpeed's public `safe_get_full_*` / `safe_set_full_*` helpers,
  one parameter at a time, into the same state.pt format as every other mode. Exact resume needs two
  things those helpers do not do, and only they touch DeepSpeed internals (DeepSpeed 0.19): creating
  the wrapped torch optimizer's state on a fresh engine before scattering into it
  (`_zero_flat_partitions`: where ZeRO keeps its flat float32 partitions) and re-linking ZeRO-1/2's
  per-parameter views of that state (`_relink_zero_views`). Each says why in its docstring.
- Imported lazily (`import_deepspeed`): DeepSpeed is an optional extra and slow to import.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pakar import PakarError
from pakar.moe import MoE

# ZeRO-2 by default: optimizer state and gradients sharded, parameters replicated, so forward and
# backward run without parameter gathers. DeepSpeed's own defaults otherwise; note that with bf16 it
# reduces gradients in bf16 (a config file can ask for "communication_data_type": "fp32", as DDP's
# float32 gradients and FSDP's reduce_dtype give).
DEEPSPEED_DEFAULT = {"zero_optimization": {"stage": 2, "contiguous_gradients": True}}


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The training flags the DeepSpeed config and engine depend on."""

    batch: int
    grad_accum: int
    grad_clip: float
    dtype: str  # --dtype, for the error message when a config's bf16 setting contradicts it
    deepspeed_config: str | None = None  # --deepspeed-config: a JSON file, None = DEEPSPEED_DEFAULT
    compile: bool = False  # --compile (refused under ZeRO-3)

    @classmethod
    def from_args(cls, args) -> "DeepSpeedSettings":
        return cls(batch=args.batch, grad_accum=args.grad_accum, grad_clip=float(args.grad_clip), dtype=args.dtype,
                   deepspeed_config=args.deepspeed_config, compile=bool(args.compile))


@dataclass
class DeepSpeedMode:
    """The DeepSpeed engine's side of each Context operation (see pakar.distributed.Context)."""

    settings: DeepSpeedSettings
    device: torch.device
    world_size: int
    amp: torch.dtype | None
    is_main: bool
    zero_stage: int | None = None  # known once `wrap` has read the config
    group_names: list = field(default_factory=list)  # parameter names of each optimizer group

    def wrap(self, model, optimizer, group_names: list[list[str]]):
        deepspeed = import_deepspeed(self.device)

        config = deepspeed_config(self.settings, self.world_size, self.amp, optimizer)
        self.zero_stage = config["zero_optimization"]["stage"]
        if self.zero_stage == 3:
            if self.settings.compile:
                raise PakarError("--compile does not work with DeepSpeed ZeRO-3 (its parameter hooks run inside "
                                 "each block); use ZeRO-1/2 or --fsdp with --compile")
            if any(isinstance(m, MoE) for m in model.modules()):  # a dense model has none (DeepSpeed raises)
                deepspeed.utils.set_z3_leaf_modules(model, [MoE])
        self.group_names = group_names
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

    @property
    def shards_parameters(self) -> bool:
        return self.zero_stage == 3

    def no_sync(self, engine, last: bool):
        engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    @staticmethod
    def backward(engine, loss) -> None:
        engine.backward(loss, scale_wrt_gas=False)  # the loop already normalised over micro-batches

    @staticmethod
    def clip_and_step(engine, loss: torch.Tensor) -> tuple[float, float, bool]:
        """engine.step() clips to the config's gradient_clipping (= --grad-clip) and skips a non-finite
        update itself (see pakar.distributed.Context.clip_and_step); applied = it did not skip."""
        skipped = engine.skipped_steps
        engine.step()
        norm = engine.get_global_grad_norm()
        return float(loss), float("nan") if norm is None else float(norm), engine.skipped_steps == skipped

    def full_state(self, engine, with_optimizer: bool) -> dict:
        """Gather float32 master weights and AdamW moments from ZeRO's partitions, one parameter at a
        time (each is an all-reduce or all-gather over the data-parallel group, so every rank takes
        part; rank 0 keeps the result on the CPU)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # lazy: the optional DeepSpeed package

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
                      for g, names_ in zip(engine.optimizer.param_groups, self.group_names)]
            optim = {"state": opt_state, "param_groups": groups}
        return {"model": model_sd if self.is_main else {}, "optimizer": optim}

    def load_state(self, engine, state: dict):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # lazy: the optional DeepSpeed package

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
        if self.zero_stage == 3:
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
    wrapped torch optimizer keeps its state for (ZeRO-3 swaps them into the groups only while stepping).
    Internal (attribute names of DeepSpeed 0.19's optimizers), touched only to resume: DeepSpeed's public
    safe_set_full_optimizer_state writes into that state, which a fresh engine has not created yet, and
    DeepSpeed's own way to create it (its checkpoint files) needs unrestricted unpickling."""
    inner = zero_optimizer.optimizer
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3 (sub-groups of the param groups)
        return [(flat, inner.param_groups[zero_optimizer.sub_group_to_group_id[i]])
                for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat)]
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):  # ZeRO-1/2, bf16 optimizer
        if hasattr(zero_optimizer, attr):
            return list(zip(getattr(zero_optimizer, attr), inner.param_groups))
    raise PakarError(f"cannot resume with DeepSpeed's {type(zero_optimizer).__name__}: pakar does not know where "
                     "it keeps its float32 partitions")



# -- import and config ---------------------------------------------------------------------------------
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


def deepspeed_config(settings: DeepSpeedSettings, world_size: int, amp: torch.dtype | None,
                     optimizer=None) -> dict:
    """The DeepSpeed config: --deepspeed-config's JSON (or DEEPSPEED_DEFAULT) with the batch sizes,
    gradient accumulation, clipping and precision filled in from pakar's flags."""
    src = settings.deepspeed_config
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

    owned = {"train_micro_batch_size_per_gpu": (settings.batch, "--batch"),
             "gradient_accumulation_steps": (settings.grad_accum, "--grad-accum"),
             "train_batch_size": (settings.batch * settings.grad_accum * world_size,
                                  "--batch x --grad-accum x processes"),
             "gradient_clipping": (float(settings.grad_clip), "--grad-clip")}
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
        raise PakarError(f"{where}: bf16.enabled is {theirs!r} but --dtype {settings.dtype} on this device means "
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
