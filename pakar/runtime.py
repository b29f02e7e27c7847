"""How a pakar process uses the machine: CPU threads and the OpenMP wait policy, set before torch loads.

This module is the home of process-level runtime choices: the thread logic, which `pakar.cli.main` runs
before it imports a command's module (so before `import torch` in `pakar <command>`, `python -m pakar`
and the seed's `python train.py`), and the device and dtype resolution every command shares
(resolve_device, autocast_dtype, inference_dtype, peak_flops). torch is imported inside the device
functions only, so the thread part runs before torch loads.

One bf16 rule (bf16_auto): `--dtype auto` means bfloat16 on a CUDA GPU that supports it
(torch.cuda.is_bf16_supported()), float32 everywhere else (CPU, MPS). Training's autocast, evaluation's
autocast and inference's weight dtype all follow it, so training and evaluation choose alike on an older
GPU. (Training used to take bf16 on any CUDA GPU, inference only where supported.)

Why: PyTorch's CPU kernels run on OpenMP (libgomp) threads, one per core by default, that spin-wait
for each other at the end of every parallel region. When another process holds one of those cores,
every region waits for the thread that is not running while the others burn their cores spinning:
a `tiny` epoch fell from 5,468 tokens/s (one thread) to 316 (the default) on a two-core machine with
one busy-loop beside it. Choices:
- OMP_WAIT_POLICY=PASSIVE: waiting threads sleep instead of spinning, so a taken core costs about its
  share of the work, not the whole run (4,298 tokens/s in the same trial). libgomp reads the variable
  once, when torch loads it, hence the early start-up. `benchmarks/bench_threads.py` measures the
  policy against the old default, alone and beside a busy process.
- Threads: `--threads N` (a global option: `pakar train --threads 2 ...`, `python train.py --threads 2`);
  otherwise OMP_NUM_THREADS if set; otherwise the cores this process may run on (its CPU affinity),
  divided among the processes a launcher started on this node (LOCAL_WORLD_SIZE), at least one.
  torchrun itself sets OMP_NUM_THREADS=1 for every rank when it starts several and the variable is
  unset; that is then respected like a user's setting (pass --threads to use more).
- A value the user set in the environment (OMP_WAIT_POLICY, GOMP_SPINCOUNT, OMP_NUM_THREADS) is kept;
  only an explicit --threads overrides OMP_NUM_THREADS.
- When torch is already loaded (pakar.cli.main called inside a Python program or a test), environment
  variables no longer matter: only an explicit --threads is applied, through torch.set_num_threads.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

from pakar import PakarError

THREADS_HELP = """global options (any command, before or after its name):
  --threads N   CPU threads per process (default: OMP_NUM_THREADS if set, else this process's cores
                divided among a launcher's processes on the node); idle threads sleep instead of
                spinning (OMP_WAIT_POLICY=PASSIVE) unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set"""


@dataclass
class ThreadChoice:
    threads: int  # intra-op CPU threads of this process
    source: str  # "--threads", "OMP_NUM_THREADS" or "cores"
    wait_policy: str  # the OpenMP wait policy in effect ("PASSIVE", or the user's value)


def pop_threads_flag(argv: list[str]) -> tuple[list[str], int | None]:
    """argv without `--threads N` / `--threads=N` (anywhere, before or after the command) and N."""
    rest, value = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--threads" or arg.startswith("--threads="):
            raw = arg.partition("=")[2] if "=" in arg else next(it, None)
            if raw is None or not raw.strip().isdigit() or int(raw) < 1:
                raise PakarError(f"--threads must be a positive whole number of CPU threads, got {raw!r}")
            value = int(raw)
        else:
            rest.append(arg)
    return rest, value


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, e.g. under taskset or a
    container's cpuset), else all logical cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # Windows and macOS have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int | None, env: dict | None = None) -> ThreadChoice:
    """The thread count and wait policy for this process (pure: reads `env`, changes nothing)."""
    env = os.environ if env is None else env
    policy = env.get("OMP_WAIT_POLICY", "PASSIVE").upper()
    if requested is not None:
        return ThreadChoice(requested, "--threads", policy)
    raw = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP allows a per-level list
    if raw.isdigit() and int(raw) >= 1:
        return ThreadChoice(int(raw), "OMP_NUM_THREADS", policy)
    local = env.get("LOCAL_WORLD_SIZE", "1")
    ranks = int(local) if local.isdigit() and int(local) >= 1 else 1
    return ThreadChoice(max(1, usable_cores() // ranks), "cores", policy)


def configure_threads(argv: list[str]) -> list[str]:
    """Take --threads out of argv and set this process's threads and wait policy; returns the rest of
    argv. Call before torch is imported (pakar.cli.main does)."""
    argv, requested = pop_threads_flag(argv)
    choice = choose_threads(requested)
    if "torch" in sys.modules:  # too late for environment variables: apply an explicit request only
        if requested is not None:
            sys.modules["torch"].set_num_threads(requested)
        return argv
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)  # torch reads it at import for its thread pool
    if "GOMP_SPINCOUNT" not in os.environ:  # the user's own spin setting wins over our default policy
        os.environ.setdefault("OMP_WAIT_POLICY", choice.wait_policy)
    return argv


def thread_summary() -> str:
    """For the first log line: e.g. "2 CPU threads, OpenMP wait policy PASSIVE"."""
    import torch  # lazy: this module runs before torch loads (configure_threads)

    policy = os.environ.get("OMP_WAIT_POLICY", "").upper() or (
        f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in os.environ else "default")
    return f"{torch.get_num_threads()} CPU thread(s), OpenMP wait policy {policy}"


# --- devices and dtypes ---------------------------------------------------------------------------

# Peak dense bf16 tensor throughput (FLOP/s) of common accelerators, for MFU in the log and the
# reference table of `pakar estimate`. First match wins, so "H100 PCIe" (756 TFLOP/s) must come before
# the SXM "H100". Sources: NVIDIA's H100/H200, A100 and L4/L40S datasheets (dense, without sparsity);
# GeForce cards from the Ampere GA102 and Ada whitepapers' "BF16 Tensor TFLOPS with FP32 accumulate"
# (GeForce tensor cores run bf16 at half their fp16-accumulate rate): RTX 3090 71, RTX 4090 165.2.
# The RTX 3060 is not in the whitepaper table; scaled the same way from its 28 SMs x 4 tensor cores
# x 128 bf16 FMA per clock x 2 FLOP x 1.777 GHz boost = 25.5 TFLOP/s (51 is its fp16-accumulate rate,
# which bf16 training does not get).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
                  "RTX 3060": 25.5e12}


def resolve_device(name: str):
    """--device NAME -> torch.device; auto = this rank's CUDA GPU (LOCAL_RANK) when there is one, else cpu.
    PakarError naming the flag for a name torch does not know or a device this machine lacks."""
    import torch  # lazy: this module runs before torch loads (configure_threads)

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PakarError(f"--device {name!r} is not a device name (try cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PakarError("--device cuda was asked for but no CUDA GPU is available to PyTorch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PakarError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PakarError(f"--device {name}: Apple's MPS backend is not available on this machine (try cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PakarError(f"--device {name}: pakar runs on cpu, cuda, cuda:N or mps")
    return device


def bf16_auto(device) -> bool:
    """The one rule behind every `--dtype auto`: bfloat16 on a CUDA GPU that supports it, else float32."""
    import torch  # lazy: this module runs before torch loads (configure_threads)

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_dtype(dtype: str, device):
    """Training and evaluation: the autocast dtype, None = plain float32 (weights stay float32 either way)."""
    import torch  # lazy: this module runs before torch loads (configure_threads)

    if dtype == "bfloat16" or (dtype == "auto" and bf16_auto(device)):
        return torch.bfloat16
    return None


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), from torch's cpuinfo probes."""
    import torch  # lazy: this module runs before torch loads (configure_threads)

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cpu_bf16_warning(dtype: str, device) -> str | None:
    """The line `--dtype bfloat16` on a CPU without native bfloat16 gets (None otherwise): such a CPU
    emulates bf16 matmuls, and training runs many times slower than in float32."""
    if dtype != "bfloat16" or device.type != "cpu" or cpu_bf16_native():
        return None
    return ("warning: --dtype bfloat16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): bf16 matmuls are "
            "emulated there, about 20x slower than float32 (measured: `small` trained at 68 tokens/s in bf16 "
            "against 1,486 in float32); use --dtype float32 (the default on a CPU) unless memory forces bf16")


def inference_dtype(name: str, device):
    """Generation: the weights and cache dtype; auto follows bf16_auto, else the named torch dtype."""
    import torch  # lazy: this module runs before torch loads (configure_threads)

    if name == "auto":
        return torch.bfloat16 if bf16_auto(device) else torch.float32
    return getattr(torch, name)


def peak_flops(device) -> float | None:
    """The GPU's peak dense bf16 FLOP/s from GPU_PEAK_FLOPS (for MFU), None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    import torch  # lazy: this module runs before torch loads (configure_threads)

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def memory_bytes(device: torch.device | str = "cpu", available: bool = False) -> int | None:
    """Total memory of `device` (physical RAM for the CPU, the GPU's memory for CUDA), or with `available`
    what is free now (the OS's available RAM: MemAvailable on Linux, ullAvailPhys on Windows; the
    GPU's free memory); None if unknown."""
    import torch  # lazy: this module runs before torch loads (configure_threads)

    device = torch.device(device)
    if device.type == "cuda":
        if available:
            return torch.cuda.mem_get_info(device)[0]
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        if sys.platform == "win32":
            class MemoryStatus(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                            ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                            ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                            ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                            ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

            status = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
            ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
            return int(status.ullAvailPhys if available else status.ullTotalPhys)
        if available:
            return _available_ram()
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _available_ram() -> int:
    """Linux's MemAvailable (free plus reclaimable cache), else free pages (macOS, other Unixes)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# --- peak memory of a stretch of work ----------------------------------------------------------------

class PeakMemory:
    """The peak memory a stretch of work adds: `start()`, do the work, `increase()` -> bytes.

    CUDA: torch's allocator peak (max_memory_allocated) over what was allocated at start. CPU: the
    peak resident set size over the one at start, read without extra dependencies (psutil is not a
    pakar dependency, and its peak is not resettable on Linux either): Linux resets the kernel's
    high-water mark (/proc/self/clear_refs "5") and reads VmHWM from /proc/self/status; Windows reads
    PeakWorkingSetSize (not resettable: an earlier higher peak in the same process hides the increase);
    macOS/BSD have only getrusage's lifetime peak, the same caveat."""

    def __init__(self, device):
        self.device, self.base = device, 0

    def start(self) -> None:
        if self.device.type == "cuda":
            import torch  # lazy: this module runs before torch loads (configure_threads)

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        if sys.platform.startswith("linux"):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:  # a kernel or sandbox without it: the lifetime peak is the fallback
                pass
        self.base = _rss_now_and_peak()[0]

    def increase(self) -> int:
        if self.device.type == "cuda":
            import torch  # lazy: this module runs before torch loads (configure_threads)

            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        return max(0, _rss_now_and_peak()[1] - self.base)


def _rss_now_and_peak() -> tuple[int, int]:
    """This process's (resident set size now, its peak) in bytes."""
    if sys.platform.startswith("linux"):
        with open("/proc/self/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    if os.name == "nt":
        from ctypes import wintypes  # Windows only

        class Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (name, ctypes.c_size_t) for name in (
                    "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                    "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]

        c = Counters(cb=ctypes.sizeof(Counters))
        kernel32 = ctypes.windll.kernel32
        kernel32.K32GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(c), c.cb)
        return c.WorkingSetSize, c.PeakWorkingSetSize
    import resource  # lazy: POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on the BSDs
    peak *= 1 if sys.platform == "darwin" else 1024
    return peak, peak
