"""Causal attention of the samples of a packed bf16 row on CPUs with AVX512-BF16: our own C kernel.

Our own because PyTorch's CPU flash attention runs bf16 no faster than fp32 (54-57 GFLOP/s either way over the
race's samples on a 2-core EPYC whose bf16 matmul peak was 403 GFLOP/s; benchmarks/cpu_attention.py), so attention
was the largest cost of a bf16 step outside the matrix products. cpu_attention.c computes 64 x 64 flash-attention
tiles with bf16 products and fp32 accumulation (the GPU flash-attention recipe: scores, softmax and its gradient in
fp32; P and dS rounded to bf16 for their products), one (sample, query head) at a time, and the backward pass from
the saved log-sum-exp.

It is compiled at first use with the system's C compiler into the user's cache (about a second) and used only
where it can run: a CPU with avx512_bf16, a C compiler, head_dim 64. Anything else keeps PyTorch's SDPA.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from dataclasses import replace
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from desktune.constants import CPU_ATTENTION_HEAD_DIM as HEAD_DIM
from desktune.hardware import Hardware, c_compiler, cpu_attention_kernel_possible, cpu_attention_switched_off
from desktune.models.gguf import cache_dir as desktune_cache

log = logging.getLogger(__name__)

SOURCE = "cpu_attention.c"
# -fopenmp: the kernel's threads are PyTorch's own (the process has already loaded torch's libgomp.so.1)
FLAGS = ["-O3", "-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-shared",
         "-fPIC", "-fopenmp"]


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """The kernel handles this call: CPU bf16, head_dim 64, whole groups of query heads, the kernel built."""
    return (query.device.type == "cpu" and all(t.dtype == torch.bfloat16 for t in (query, key, value))
            and query.shape[-1] == HEAD_DIM and query.shape[1] % key.shape[1] == 0
            and not cpu_attention_switched_off() and library() is not None)


def decide(hw: Hardware, packing: bool) -> Hardware:
    """A run's one attention decision, made at setup before the memory plan: where the kernel will run (packed bf16
    rows on a CPU that can run it) it is built now, and a build that fails turns `cpu_attention_kernel` off with the
    reason in `attention_note`, so the plan, the model and the records all see what will really run (PyTorch's
    fp32 SDPA then). A run that would not use it builds nothing."""
    if not (hw.cpu_attention_kernel and packing and hw.dtype == torch.bfloat16) or library() is not None:
        return hw
    return replace(hw, cpu_attention_kernel=False,
                   attention_note="desktune's CPU attention kernel did not build (the log line above says why): "
                                  "attention runs as PyTorch's SDPA in fp32, and the memory plan counts that")


def cache_dir() -> Path:
    """Where the compiled kernel is kept: kernels/ in desktune's cache (models/gguf.py's cache_dir, which honours
    $DESKTUNE_CACHE like every other cached artefact)."""
    return desktune_cache() / "kernels"


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built once per source version and flags; None where it cannot run or build."""
    if not cpu_attention_kernel_possible():
        return None
    source = resources.files("desktune.models").joinpath(SOURCE).read_bytes()
    target = cache_dir() / f"cpu_attention-{hashlib.sha256(source + ' '.join(FLAGS).encode()).hexdigest()[:16]}.so"
    if not target.exists() and not _compile(source, target):
        return None
    lib = ctypes.CDLL(str(target))
    _declare(lib)
    return lib


def _compile(source: bytes, target: Path) -> bool:
    compiler = c_compiler()
    if compiler is None:
        log.info("no C compiler found: bf16 attention on the CPU runs through PyTorch's SDPA in fp32")
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / SOURCE, Path(tmp) / target.name
            src.write_bytes(source)
            done = subprocess.run([compiler, *FLAGS, "-o", str(out), str(src)], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(out, target)  # atomic: concurrent runs never load a half-written file
    except OSError as e:  # an unwritable cache, a compiler that cannot start
        log.warning("the CPU attention kernel was not built (%s): PyTorch's SDPA is used instead", e)
        return False
    if done.returncode != 0:
        log.warning("the CPU attention kernel did not compile (%s): PyTorch's SDPA is used instead",
                 (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1])
        return False
    return True


def _declare(lib: ctypes.CDLL) -> None:
    i, p, lg, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    shared = [i, i, i, p, i, p, lg, lg, p, p, lg, lg, f]
    lib.dt_attn_forward.argtypes = [*shared, p, p, i]
    lib.dt_attn_forward.restype = None
    lib.dt_attn_backward.argtypes = [*shared, p, p, p, p, p, p, i]
    lib.dt_attn_backward.restype = None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[1, heads, T, 64] with contiguous head_dim (the kernel reads any head and token strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class PackedCausalAttention(torch.autograd.Function):
    """o [1, T, H, 64] of q [1, H, T, 64], k, v [1, G, T, 64]: each (start, end) segment attends causally to
    itself only."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor,
                scale: float) -> torch.Tensor:
        q, k, v = _rows(q), _rows(k), _rows(v)
        if k.stride() != v.stride():
            k, v = k.contiguous(), v.contiguous()
        _, h, t, _ = q.shape
        o = torch.empty(t, h, HEAD_DIM, dtype=torch.bfloat16)
        lse = torch.empty(h, t, dtype=torch.float32)
        library().dt_attn_forward(*_common(q, k, v, seg, scale), _ptr(o), _ptr(lse), torch.get_num_threads())
        ctx.save_for_backward(q, k, v, seg, o, lse)
        ctx.scale = scale
        return o.unsqueeze(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, seg, o, lse = ctx.saved_tensors
        _, h, t, _ = q.shape
        g = k.shape[1]
        dout = grad.reshape(t, h, HEAD_DIM).to(torch.bfloat16).contiguous()
        dq = torch.empty(1, h, t, HEAD_DIM, dtype=torch.bfloat16)
        dk = torch.empty(h, t, HEAD_DIM, dtype=torch.float32)
        dv = torch.empty(h, t, HEAD_DIM, dtype=torch.float32)
        library().dt_attn_backward(*_common(q, k, v, seg, ctx.scale), _ptr(o), _ptr(lse), _ptr(dout), _ptr(dq),
                                   _ptr(dk), _ptr(dv), torch.get_num_threads())
        fold = (1, g, h // g, t, HEAD_DIM)  # the query heads sharing a key/value head add their gradients
        return dq, dk.view(fold).sum(2).to(k.dtype), dv.view(fold).sum(2).to(v.dtype), None, None


def _common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor, scale: float) -> list:
    _, h, t, _ = q.shape
    return [t, h, k.shape[1], _ptr(seg), seg.numel() - 1, _ptr(q), q.stride(1), q.stride(2), _ptr(k), _ptr(v),
            k.stride(1), k.stride(2), scale]


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[tuple[int, int]],
                            scale: float) -> torch.Tensor:
    """Attention output [1, T, H, 64] (bf16) of a packed row whose samples span `bounds`."""
    seg = torch.tensor([s for s, _ in bounds] + [bounds[-1][1]], dtype=torch.int32)
    return PackedCausalAttention.apply(q, k, v, seg, scale)
