"""The optimizers of the lowmem and offload memory plans (pakar.memory chooses and sizes them).

Both are AdamW with torch's update formula (decoupled weight decay p *= 1 - lr*wd, then
p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)), so with float32 weights they differ from the full plan
only where they mean to:
- Adam8bit keeps each moment of a tensor with at least `min_8bit` elements as 8-bit codes into a
  256-entry dynamic map (Dettmers et al., "8-bit Optimizers via Block-wise Quantization": more codes
  near zero, where the moments live) scaled per block of `block` elements by the block's absolute
  maximum; the step dequantizes `chunk` elements at a time (bounded float32 temporaries), updates in
  float32 and quantizes back. Smaller tensors (norms) keep float32 moments.
  Why our own ~100 lines rather than torchao or bitsandbytes: torchao's AdamW8bit runs its step
  through torch.compile (a C++ compiler on a CPU, which a Windows user may lack, and minutes of
  compilation on two cores); bitsandbytes' 8-bit optimizers are CUDA kernels. This code runs the same
  on CPU, CUDA and MPS, is checked against a float32 AdamW oracle in tests/test_memory.py, and its
  state is plain tensors in state.pt.
- bfloat16 weights (a lowmem run on a bf16 GPU) are updated in float32 and stochastically rounded back
  (add 16 random low bits, truncate): unbiased, so small updates are not lost to rounding. The noise
  comes from a generator seeded by (step, tensor index), so a resumed run replays it exactly.
- OffloadAdamW keeps a float32 master copy of every weight and the two float32 moments in CPU memory
  (pageable: only the transfer buffers, one per weight in the weight's dtype, are pinned, so a
  default-size run does not lock 20 GB of the host's RAM); per step the gradients come to the host
  (non_blocking copies into the pinned buffers, one synchronisation), torch's fused CPU AdamW updates
  the masters, and the weights go back to the device (non_blocking, rounded to the device weights'
  dtype). On a CPU device the update is the full
  plan's own fused AdamW on an identical copy: the same numbers.

Both keep their state tensors' own dtypes and devices when a state is loaded (torch's
Optimizer.load_state_dict would cast them to each parameter's dtype and device: the codes' float32
scales to bfloat16, the master weights to the GPU).
"""

from __future__ import annotations

import math

import torch


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted values of the 8-bit dynamic (tree) quantization map of Dettmers et al. (as in
    bitsandbytes' create_dynamic_map with 7 exponent bits): for each power of ten from 1e-6 to 1, a
    linear grid of mantissas whose size doubles with the exponent; plus 0 and 1 (and -1.. when signed)."""
    data = []
    fraction_bits = 7  # bits after the sign (bitsandbytes' non_sign_bits is 7 for the unsigned map too)
    for i in range(fraction_bits):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float64)
        means = ((bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - (fraction_bits - 1))).tolist()
        data += means + ([-m for m in means] if signed else [])
    data += [0.0, 1.0]
    assert len(data) == 256 and len(set(data)) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


class _Codes:
    """One 8-bit map on one device: the values and the midpoints between them (for nearest-code search)."""

    def __init__(self, signed: bool, device):
        self.values = dynamic_map(signed).to(device)
        self.mids = (self.values[1:] + self.values[:-1]) / 2

    def quantize(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (1-D float32) -> (uint8 codes of x's length, float32 absmax per block)."""
        n = x.numel()
        pad = -n % block
        xb = (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(-1, block)
        scale = xb.abs().amax(dim=1)
        normed = xb / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
        codes = torch.bucketize(normed, self.mids, out_int32=True).to(torch.uint8).view(-1)[:n]
        return codes, scale

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
        n = codes.numel()
        vals = self.values.index_select(0, codes.int())
        pad = -n % block
        vals = (torch.nn.functional.pad(vals, (0, pad)) if pad else vals).view(-1, block) * scale[:, None]
        return vals.view(-1)[:n]


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16 rounded up with probability equal to the dropped fraction (unbiased): add 16
    random bits below bfloat16's last mantissa bit, then truncate."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def _seeded(device, step: int, index: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((step * 1_000_003 + index) % (2**63))
    return g


class _KeepStateDtypes(torch.optim.Optimizer):
    """load_state_dict that keeps the saved state tensors' dtypes, on `_state_device(p)`."""

    def _state_device(self, p):
        return p.device

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # the saved groups name their parameters by index or, through torch.distributed.checkpoint, by name
        keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        params = dict(zip(keys, (p for g in self.param_groups for p in g["params"])))
        for key, saved in state_dict["state"].items():
            p = params[key]
            self.state[p] = {k: self._place(v, p) for k, v in saved.items()}

    def _place(self, v, p):
        return v.to(self._state_device(p), copy=True) if isinstance(v, torch.Tensor) else v


class Adam8bit(_KeepStateDtypes):
    """AdamW with blockwise 8-bit moments (see the module docstring); bfloat16 parameters are updated in
    float32 and stochastically rounded."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 block: int, min_8bit: int, chunk: int):
        assert chunk % block == 0
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.block, self.min_8bit, self.chunk = block, min_8bit, chunk
        self._maps = {}

    def _map(self, signed: bool, device) -> _Codes:
        key = (signed, str(device))
        if key not in self._maps:
            self._maps[key] = _Codes(signed, device)
        return self._maps[key]

    def _init_state(self, p) -> dict:
        n = p.numel()
        if n < self.min_8bit:
            return {"step": 0, "exp_avg": torch.zeros(n, device=p.device),
                    "exp_avg_sq": torch.zeros(n, device=p.device)}
        blocks = math.ceil(n / self.block)
        st = {"step": 0}
        for name in ("exp_avg", "exp_avg_sq"):
            st[f"{name}_codes"] = torch.empty(n, dtype=torch.uint8, device=p.device)
            st[f"{name}_scale"] = torch.zeros(blocks, device=p.device)
        # zero moments: the code of 0.0 with any scale dequantizes to 0
        st["exp_avg_codes"].fill_(int(torch.searchsorted(dynamic_map(True), 0.0)))
        st["exp_avg_sq_codes"].fill_(0)  # the unsigned map's first value is 0
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p))
                st["step"] += 1
                self._update(p, st, group, index)
        return loss

    def _update(self, p, st: dict, group: dict, index: int) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        step = st["step"]
        bc1, bc2_sqrt = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
        p_flat, g_flat = p.view(-1), p.grad.reshape(-1)  # (parameters are contiguous; a gradient may not be)
        low = p.dtype != torch.float32
        gen = _seeded(p.device, step, index) if low else None
        eight = "exp_avg_codes" in st
        signed, unsigned = self._map(True, p.device), self._map(False, p.device)
        n, B = p.numel(), self.block
        for start in range(0, n, self.chunk):
            end = min(n, start + self.chunk)
            sl, bsl = slice(start, end), slice(start // B, math.ceil(end / B))  # elements, their blocks
            g = g_flat[sl].float()
            if eight:
                m = signed.dequantize(st["exp_avg_codes"][sl], st["exp_avg_scale"][bsl], B)
                v = unsigned.dequantize(st["exp_avg_sq_codes"][sl], st["exp_avg_sq_scale"][bsl], B)
            else:
                m, v = st["exp_avg"][sl], st["exp_avg_sq"][sl]
            w = p_flat[sl].float()  # the parameter itself when float32, a float32 copy of a bfloat16 one
            w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)
            if low:
                p_flat[sl].copy_(stochastic_round_bf16(w, gen))
            if eight:
                st["exp_avg_codes"][sl], st["exp_avg_scale"][bsl] = signed.quantize(m, B)
                st["exp_avg_sq_codes"][sl], st["exp_avg_sq_scale"][bsl] = unsigned.quantize(v, B)


class OffloadAdamW(_KeepStateDtypes):
    """AdamW whose float32 master weights and moments live in CPU memory (see the module docstring)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._buffers = {}  # param -> pinned host buffer of its gradient / new value (CUDA only; not state)

    def _state_device(self, p):
        return torch.device("cpu")

    def _init_state(self, p) -> dict:
        master = p.detach().to("cpu", torch.float32, copy=True)
        return {"step": torch.tensor(0.0), "master": master, "exp_avg": torch.zeros(p.shape),
                "exp_avg_sq": torch.zeros(p.shape)}

    def _buffer(self, p) -> torch.Tensor:
        if p not in self._buffers:
            self._buffers[p] = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
        return self._buffers[p]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        todo = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = {}
        for p, _ in todo:
            if not self.state[p]:
                self.state[p].update(self._init_state(p))
            if p.device.type == "cuda":
                grads[p] = self._buffer(p).copy_(p.grad, non_blocking=True)
            else:
                grads[p] = p.grad.to("cpu")
        for device in {p.device for p, _ in todo if p.device.type == "cuda"}:
            torch.cuda.synchronize(device)  # the one wait: every gradient is on the host
        for p, group in todo:
            st = self.state[p]
            b1, b2 = group["betas"]
            st["step"] += 1  # torch.optim.AdamW counts before its fused kernel too
            torch._fused_adamw_([st["master"]], [grads[p].float()], [st["exp_avg"]], [st["exp_avg_sq"]], [],
                                [st["step"]], lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
                                eps=group["eps"], amsgrad=False, maximize=False)
            if p.device.type == "cuda":
                # the copy back reads the pinned buffer asynchronously; the next step's gradient copy into the
                # same buffer is queued after it on the same stream
                p.copy_(self._buffer(p).copy_(st["master"]), non_blocking=True)
            else:
                p.copy_(st["master"])
        return loss
