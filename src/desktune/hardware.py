"""Device and precision detection, and memory telemetry (CUDA, MPS, CPU)."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from desktune.constants import CPU_ATTENTION_ENV, DTYPE_NAMES
from desktune.errors import DesktuneError
from desktune.units import human_bytes

__all__ = ["DTYPES", "KERNEL_CACHE_CAPACITY", "Hardware", "MemoryTelemetry", "bound_kernel_caches", "cuda_bf16_native",
           "detect", "free_memory", "human_bytes", "memory_in_use", "memory_telemetry", "pick_device", "pick_dtype",
           "set_threads"]

_TORCH_NAMES = dict(zip(DTYPE_NAMES, ("bfloat16", "float16", "float32"), strict=True))
# config names (and torch's own names) -> torch dtypes
DTYPES = {alias: getattr(torch, full) for name, full in _TORCH_NAMES.items() for alias in (name, full)}


@dataclass(frozen=True)
class Hardware:
    """What a run executes on."""

    device: torch.device
    dtype: torch.dtype
    cpu_attention_kernel: bool = False  # desktune's CPU attention kernel can run (`cpu_attention_kernel_possible`)
    attention_note: str | None = None  # why the kernel is not used although it could be (models.cpu_attention.decide)

    @property
    def name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return self.device.type


def pick_device(requested: str = "auto") -> torch.device:
    """The device to train on: CUDA, then Apple MPS, then CPU, unless one is requested."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DesktuneError("CUDA was requested but no CUDA GPU is visible", where="train.device",
                            fix="set train.device: auto (or cpu)")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise DesktuneError("MPS was requested but is not available", where="train.device",
                            fix="set train.device: auto (or cpu)")
    return torch.device(requested)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 or AMX); slow emulation counts as no.

    Measured on an AVX2-only CPU: bf16 matmul 0.27 GFLOP/s against 94 for fp32, so the flag matters.
    """
    if torch.backends.cpu.get_cpu_capability() in {"AVX512_BF16", "AMX"}:
        return True
    flags = cpu_flags()
    if not flags:  # macOS/Windows: PyTorch's bf16 on CPU is still correct, and Apple silicon has it
        return torch.backends.mps.is_available()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return frozenset()
    return next((frozenset(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.startswith("flags")), frozenset())


def c_compiler() -> str | None:
    """The C compiler to build desktune's CPU attention kernel with: $CC, else cc or gcc on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_attention_switched_off() -> bool:
    """DESKTUNE_CPU_ATTENTION=0: PyTorch's SDPA everywhere (read at each call, so a process can switch it)."""
    return os.environ.get(CPU_ATTENTION_ENV, "1") == "0"


def cpu_attention_kernel_possible() -> bool:
    """Whether desktune's CPU attention kernel can run here: AVX512-BF16 dot products, a C compiler to build it
    (models/cpu_attention.py), and DESKTUNE_CPU_ATTENTION not set to 0."""
    return not cpu_attention_switched_off() and "avx512_bf16" in cpu_flags() and c_compiler() is not None


def cuda_bf16_native(device: torch.device) -> bool:
    """True when the CUDA GPU computes bf16 natively: compute capability 8.0+ (Ampere on), or ROCm.

    `torch.cuda.is_bf16_supported()` also answers True where bf16 is only emulated (T4 and RTX 20xx at 7.5,
    V100 at 7.0), which runs far slower than fp16 there.
    """
    if torch.version.hip:
        return True
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Compute precision: bf16 where the hardware has it natively, fp16 on older GPUs, never fp16 on CPU."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise DesktuneError(
                "fp16 on the CPU is ~1000x slower than bf16 (no fp16 matmul kernels)",
                where="model.dtype", fix="use model.dtype: auto, bf16 or fp32",
            )
        if DTYPES[requested] == torch.bfloat16 and device.type == "cuda" and not cuda_bf16_native(device):
            major, minor = torch.cuda.get_device_capability(device)
            warnings.warn(f"model.dtype: bf16 on a GPU of compute capability {major}.{minor}: bf16 is only emulated "
                          "there (native from 8.0) and runs slowly; model.dtype: auto picks fp16", stacklevel=3)
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if cuda_bf16_native(device) else torch.float16
    if device.type == "mps":
        return torch.bfloat16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def detect(device: str = "auto", dtype: str = "auto") -> Hardware:
    """Resolve device and precision from the config's requests."""
    dev = pick_device(device)
    return Hardware(device=dev, dtype=pick_dtype(dtype, dev),
                    cpu_attention_kernel=dev.type == "cpu" and cpu_attention_kernel_possible())


# Compiled CPU matmul kernels kept per process, in oneDNN's primitive cache and in PyTorch's ideep cache (1024 each
# by default). bf16 matmuls on the CPU go through oneDNN, which compiles a kernel per shape: every new packed row
# length adds ~25 of ~0.3 MiB, so RSS climbed through a run until both caches were full (~600 MiB) while the heap
# fragmented around their entries (measured at the demo's settings, SmolLM2's shapes in 6 layers: 636 -> 1126 MiB
# in 40 steps; with 64: 648 -> 771, flat from step 20; with 128 it still grew). 32 to 64 cost ~10 kernel
# compilations a step more than 1024 (~6 ms: 1024's older entries are seldom reused), 16 ~15; 64 leaves room for
# models with more distinct shapes a layer.
KERNEL_CACHE_CAPACITY = 64
_KERNEL_CACHE_ENV = (("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"), ("LRU_CACHE_CAPACITY",))


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap oneDNN's and ideep's kernel caches at `capacity` entries, unless the environment already sets them.

    Both libraries read these variables when their cache is first used, so this must run before the process's
    first bf16 CPU matmul; later it changes nothing."""
    for names in _KERNEL_CACHE_ENV:
        if not any(name in os.environ for name in names):
            os.environ[names[0]] = str(capacity)


def set_threads(threads: int | None, processes: int = 1) -> None:
    """Use the given number of CPU threads (default: this process's share of the cores it may use, when
    `processes` of one run share this machine: more threads than cores make each rank wait on the others), and
    bound the CPU kernel caches (`bound_kernel_caches`): called before a run's model loads."""
    bound_kernel_caches()
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = cores // max(1, processes)
    torch.set_num_threads(max(1, threads))


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: allocated tensors on CUDA/MPS, process resident memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class MemoryTelemetry:
    """Memory counters of this process (None where the device has no such counter)."""

    rss_bytes: int | None
    peak_rss_bytes: int | None
    cuda_allocated_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    cuda_reserved_bytes: int | None = None
    mps_allocated_bytes: int | None = None


def _rss() -> tuple[int | None, int | None]:
    """Resident memory now and at its peak (Linux: /proc/self/status VmRSS and VmHWM; else getrusage's peak)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text(encoding="ascii")
                      .splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        import resource
        import sys

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return None, peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def memory_telemetry(device: torch.device) -> MemoryTelemetry:
    """Process RSS (now and peak) and the accelerator allocator's counters: nobody needs nvidia-smi."""
    rss, peak = _rss()
    if device.type == "cuda":
        return MemoryTelemetry(rss, peak, cuda_allocated_bytes=int(torch.cuda.memory_allocated(device)),
                               cuda_peak_bytes=int(torch.cuda.max_memory_allocated(device)),
                               cuda_reserved_bytes=int(torch.cuda.memory_reserved(device)))
    if device.type == "mps":
        return MemoryTelemetry(rss, peak, mps_allocated_bytes=int(torch.mps.current_allocated_memory()))
    return MemoryTelemetry(rss, peak)


def free_memory(device: torch.device) -> int:
    """Bytes a run could still use on the device: free CUDA memory, MPS's recommended headroom, or the
    CPU's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
