"""Speed and memory switches around a run: packed attention, autocast, torch.compile, fused kernels, offload.

Each switch changes how a step is computed, never what it computes (tests compare against the plain path).
Switches that need hardware the run does not have are turned off with a note, not an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from desktune.adapters import base_model
from desktune.config import RunConfig
from desktune.hardware import DTYPES
from desktune.models.packed_attention import restore_attention, use_packed_attention

T = TypeVar("T")
_MISSING = object()


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
        want = DTYPES[tcfg.autocast]
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

    base = base_model(model)
    try:
        _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    except (ValueError, KeyError, NotImplementedError):  # an architecture liger does not cover
        return False
    return True


def compile_layers(model: Any) -> int:
    """Compile each decoder layer in place (regional compilation: one compile, reused by every layer)."""
    layers = base_model(model).get_decoder().layers
    for layer in layers:
        layer.compile(dynamic=True)  # sets the layer's `_compiled_call_impl`; without it calls run eagerly
    return len(layers)


def _namespaces(model: Any) -> list[dict[str, Any]]:
    """Every dict a patcher writes to: each submodule's attributes, children, parameters and buffers, and the
    globals of the model's modeling module(s) (where liger swaps `apply_rotary_pos_emb`, the norm classes...)."""
    modules = list(model.modules())
    spaces = [space for m in modules for space in (m.__dict__, m._modules, m._parameters, m._buffers)]
    own = type(base_model(model)).__module__  # remote-code models are defined outside transformers
    names = {own} | {type(m).__module__ for m in modules if type(m).__module__.startswith("transformers.")}
    return spaces + [vars(sys.modules[n]) for n in sorted(names) if n in sys.modules]


def patching(model: Any, apply: Callable[[Any], T]) -> tuple[T, Callable[[], None]]:
    """Run `apply(model)`; return its result and a function undoing every change it made to the model.

    Changes are found by comparing (by identity) each namespace and submodule class before and after `apply`,
    so later changes (training's own) are left alone. If `apply` raises, its changes are undone first.
    """
    spaces = _namespaces(model)
    before = [dict(space) for space in spaces]
    classes = [(m, type(m)) for m in model.modules()]
    changes: list[tuple[dict[str, Any], dict[str, Any]]] = []
    moved: list[tuple[torch.nn.Module, type]] = []

    def undo() -> None:
        for space, old in changes:
            for key, value in old.items():
                if value is _MISSING:
                    space.pop(key, None)
                else:
                    space[key] = value
        for module, cls in moved:
            module.__class__ = cls

    def record() -> None:
        for space, old in zip(spaces, before, strict=True):
            diff = {k: old.get(k, _MISSING) for k in old.keys() | space.keys()
                    if space.get(k, _MISSING) is not old.get(k, _MISSING)}
            if diff:
                changes.append((space, diff))
        moved.extend((m, cls) for m, cls in classes if type(m) is not cls)

    try:
        result = apply(model)
    except BaseException:
        record()
        undo()
        raise
    record()
    return result, undo


@contextlib.contextmanager
def switched_on(model: Any, switches: Switches) -> Iterator[Switches]:
    """Apply the model-level switches for the duration of training; all are undone on exit, errors included."""
    with contextlib.ExitStack() as undo:
        if switches.packed_attention:
            previous = use_packed_attention(model)
            undo.callback(restore_attention, model, previous)
            # flash-attention / eager: transformers' own packed-row handling
            switches.packed_attention = previous is not None
        if switches.fused_kernels == "liger":
            covered, restore = patching(model, apply_fused_kernels)
            if covered:
                undo.callback(restore)
            else:  # put back whatever liger patched before it found an architecture it does not cover
                restore()
                switches.fused_kernels = None
                switches.notes.append("train.fused_kernels: liger does not cover this architecture; off")
        if switches.compiled:
            undo.callback(patching(model, compile_layers)[1])
        yield switches
