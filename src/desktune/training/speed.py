"""Speed and memory switches around a run: packed attention, autocast, torch.compile, fused kernels, offload.

Each switch changes how a step is computed, never what it computes (tests compare against the plain path).
Switches that need hardware the run does not have are turned off with a note, not an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from desktune.config import RunConfig
from desktune.models.packed_attention import restore_attention, use_packed_attention

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Switches:
    """What a run actually uses, after checking the hardware; `notes` say what was turned off and why."""

    autocast: torch.dtype | None = None
    offload_activations: bool = False
    compiled: bool = False
    fused_kernels: str | None = None
    packed_attention: bool = False
    notes: list[str] = field(default_factory=list)

    def forward_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Wraps one micro-batch's forward (and so what backward saves): autocast and activation offload."""
        stack = contextlib.ExitStack()
        if self.autocast is not None:
            stack.enter_context(torch.autocast(device.type, dtype=self.autocast))
        if self.offload_activations:
            # saved activations wait in (pinned) CPU memory until backward needs them
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"))
        return stack


def choose_switches(cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> Switches:
    """Resolve the configured switches against the device and compute dtype."""
    tcfg, out = cfg.train, Switches()
    if tcfg.autocast != "off":
        want = AUTOCAST_DTYPES[tcfg.autocast]
        if dtype != torch.float32:
            out.notes.append(f"train.autocast: {tcfg.autocast} has no effect: the model already computes in "
                             f"{str(dtype)[6:]} (set model.dtype: fp32 to autocast)")
        elif want == torch.float16 and device.type == "cpu":
            out.notes.append("train.autocast: fp16 is not supported on the CPU; training in fp32 (use bf16)")
        else:
            out.autocast = want
    if tcfg.offload_activations:
        if device.type == "cuda":
            out.offload_activations = True
        else:
            out.notes.append(f"train.offload_activations buys GPU memory only; off on {device.type}")
    if tcfg.fused_kernels != "off":
        if device.type != "cuda":
            if tcfg.fused_kernels == "liger":
                out.notes.append(f"train.fused_kernels: liger needs CUDA; off on {device.type}")
        elif importlib.util.find_spec("liger_kernel") is None:
            if tcfg.fused_kernels == "liger":
                out.notes.append("train.fused_kernels: liger-kernel is not installed (pip install liger-kernel); off")
        else:
            out.fused_kernels = "liger"
    out.compiled = tcfg.compile
    out.packed_attention = cfg.data.packing
    return out


def apply_fused_kernels(model: Any) -> bool:
    """Swap RMSNorm, SwiGLU and RoPE for liger-kernel's Triton kernels (its loss is not used: ours is chunked)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    except (ValueError, KeyError, NotImplementedError):  # an architecture liger does not cover
        return False
    return True


def compile_layers(model: Any) -> int:
    """Compile each decoder layer in place (regional compilation: one compile, reused by every layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


@contextlib.contextmanager
def switched_on(model: Any, switches: Switches) -> Iterator[Switches]:
    """Apply the model-level switches for the duration of training; packed attention is undone afterwards."""
    previous = use_packed_attention(model) if switches.packed_attention else None
    if switches.packed_attention and previous is None:
        switches.packed_attention = False  # flash-attention / eager: transformers' own packed-row handling
    if switches.fused_kernels == "liger" and not apply_fused_kernels(model):
        switches.fused_kernels = None
        switches.notes.append("train.fused_kernels: liger does not cover this architecture; off")
    if switches.compiled:
        compile_layers(model)
    try:
        yield switches
    finally:
        restore_attention(model, previous)
