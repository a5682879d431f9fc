"""Speed and memory switches around a run: packed attention, autocast, torch.compile, fused kernels, offload,
cheaper dropout masks on the CPU.

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


def _storage_ptr(t: torch.Tensor) -> int | None:
    """Where the storage of a strided tensor starts (a view shares its base's); None for a tensor without one
    (a wrapper subclass: torchao's quantized weights)."""
    if t.layout is not torch.strided:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _weight_storages(model: torch.nn.Module) -> frozenset[int]:
    """The storages of `model`'s parameters and buffers (the frozen base's weights among them)."""
    ptrs = (_storage_ptr(t) for t in (*model.parameters(), *model.buffers()))
    return frozenset(p for p in ptrs if p is not None)


def _offload_hooks(weights: frozenset[int], *, pin: bool) -> tuple[Callable[[torch.Tensor], Any],
                                                                    Callable[[Any], torch.Tensor]]:
    """Saved-tensor hooks moving what backward saves to CPU memory (pinned when `pin`) and back to its device.

    Left where they are: tensors on the storage of a weight (a Linear saves its weight, or its transpose, for
    backward: copying the frozen base to the host every micro-batch would only cost time) and tensor subclasses.
    """

    def pack(t: torch.Tensor) -> Any:
        ptr = _storage_ptr(t) if type(t) is torch.Tensor else None
        if ptr is None or ptr in weights:
            return t
        if pin and t.is_cuda:
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            host.copy_(t)
        else:
            host = t.cpu()  # one already on the CPU: itself, no copy
        return t.device, host

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=pin)

    return pack, unpack


@dataclass
class Switches:
    """What a run actually uses, after checking the hardware; `notes` say what was turned off and why."""

    autocast: torch.dtype | None = None
    adapters_autocast: torch.dtype | None = None  # a 16-bit model's fp32 adapters compute in its dtype
    offload_activations: bool = False
    compiled: bool = False
    fused_kernels: str | None = None
    packed_attention: bool = False
    word_dropout: bool = False  # the adapters' dropout masks drawn 4 to a random word (CPU)
    notes: list[str] = field(default_factory=list)

    def forward_context(self, device: torch.device, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Wraps one micro-batch's forward of `model` (and so what backward saves): autocast and activation offload
        (saved activations wait in CPU memory, pinned on CUDA, until backward; `model`'s weights stay put)."""
        stack = contextlib.ExitStack()
        if self.autocast is not None:
            stack.enter_context(torch.autocast(device.type, dtype=self.autocast))
        elif self.adapters_autocast is not None:
            stack.enter_context(adapters_in(model, device, self.adapters_autocast))
        if self.offload_activations:
            pack, unpack = _offload_hooks(_weight_storages(model), pin=device.type == "cuda")
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        return stack


@contextlib.contextmanager
def adapters_in(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """LoRA's fp32 weights used in the 16-bit `dtype` of the model they adapt: autocast casts each (small) weight,
    instead of peft casting every layer's activations to fp32 and its full-width output back. What mixed-precision
    training means (fp32 master weights, 16-bit compute); measured on the CPU: a third less time outside matmuls."""
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast(device.type, dtype=dtype), disable_input_dtype_casting(model):
        yield


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
    if out.autocast is None and dtype in (torch.bfloat16, torch.float16):
        out.adapters_autocast = dtype
    if tcfg.offload_activations:
        if device.type == "cuda":
            out.offload_activations = True
        else:
            out.notes.append(f"train.offload_activations buys GPU memory only; off on {device.type}")
    if tcfg.fused_kernels == "auto":
        out.notes.append("train.fused_kernels: auto means off: liger-kernel has never run on a GPU in this "
                         "project (set liger to try it)")
    elif tcfg.fused_kernels == "liger":
        if device.type != "cuda":
            out.notes.append(f"train.fused_kernels: liger needs CUDA; off on {device.type}")
        elif importlib.util.find_spec("liger_kernel") is None:
            out.notes.append("train.fused_kernels: liger-kernel is not installed (pip install liger-kernel); off")
        else:
            out.fused_kernels = "liger"
    out.compiled = tcfg.compile
    if tcfg.compile and device.type == "cpu":
        out.notes.append("train.compile: measured slower than without on the CPU (benchmarks/profile_step.py on a "
                         "2-core bf16 EPYC: 22-89 tokens/s with it, 317-346 without); kept as asked")
    out.packed_attention = cfg.data.packing
    out.word_dropout = device.type == "cpu" and cfg.lora.dropout > 0
    return out


class WordDropout(torch.nn.Dropout):
    """Dropout whose masks come 4 to a 64-bit random word, 15 random bits each (p rounded to a multiple of
    1/32768, and the survivors scaled by the inverse of the rounded keep rate, so the expectation is unchanged).

    Ours for the CPU: torch's dropout draws one Mersenne-Twister number per element (measured on a 2-core bf16
    EPYC: 1.7 ms for a 700 x 576 bf16 input, against 0.65 ms here); on CUDA torch's fused kernel is left alone.
    Same distribution, another random stream; it draws from torch's default generator, so checkpoints and
    resume keep it exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        drop = round(self.p * 32768)
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()  # 63 random bits
        lanes = words.view(torch.int16)[: x.numel()].view(x.shape)  # the top lane's sign bit is always 0
        keep = lanes.bitwise_and_(0x7FFF) >= drop
        return x.mul(keep).mul_(32768 / (32768 - drop))


def use_word_dropout(model: Any) -> int:
    """Every adapter's `nn.Dropout` replaced by a `WordDropout` of the same rate; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout:
                drops[name] = WordDropout(drop.p)
                swapped += 1
    return swapped


def apply_fused_kernels(model: Any) -> tuple[bool, str]:
    """Patch the model with liger-kernel's function for its `config.model_type` (RMSNorm, SwiGLU, RoPE; not its
    losses: ours is chunked). Returns (whether liger changed anything, a note saying what)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = base_model(model)
    model_type = getattr(base.config, "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        return False, f"train.fused_kernels: liger has no kernels for model_type {model_type!r}; off"
    modules, names = _changes(model, lambda: apply(
        model=base, cross_entropy=False, fused_linear_cross_entropy=False))
    if not modules and not names:
        return False, f"train.fused_kernels: liger did not patch anything in this {model_type} model; off"
    return True, (f"train.fused_kernels: liger is on: patched {modules} modules of this {model_type} model and "
                  f"replaced {len(names)} modeling globals ({', '.join(names) or '-'}); it has never run on a GPU "
                  "in this project: compare a few steps with fused_kernels: off")


def _changes(model: Any, apply: Callable[[], object]) -> tuple[int, list[str]]:
    """Run `apply()`; return how many submodules it changed (an attribute, child, parameter, buffer or the class)
    and the names of the modeling-module globals it replaced (what `_watch` sees)."""
    modules = list(model.modules())
    owner = {id(s): id(m) for m in modules for s in (m.__dict__, m._modules, m._parameters, m._buffers)}
    watch = _watch(model)
    apply()
    changed = watch()
    touched = {id(m) for m, _ in changed.classes} | {owner[id(sp)] for sp, _ in changed.spaces if id(sp) in owner}
    replaced = sorted(k for sp, old in changed.spaces if id(sp) not in owner for k in old)
    return len(touched), replaced


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


@dataclass
class _Changes:
    """What a patcher changed: each namespace with the old values of its changed keys, each module's old class."""

    spaces: list[tuple[dict[str, Any], dict[str, Any]]]
    classes: list[tuple[torch.nn.Module, type]]

    def undo(self) -> None:
        for space, old in self.spaces:
            for key, value in old.items():
                if value is _MISSING:
                    space.pop(key, None)
                else:
                    space[key] = value
        for module, cls in self.classes:
            module.__class__ = cls


def _watch(model: Any) -> Callable[[], _Changes]:
    """Snapshot `model`'s namespaces and submodule classes; the returned function gives what changed since
    (compared by identity)."""
    spaces = _namespaces(model)
    before = [dict(space) for space in spaces]
    classes = [(m, type(m)) for m in model.modules()]

    def changes() -> _Changes:
        diffs = [(space, {k: old.get(k, _MISSING) for k in old.keys() | space.keys()
                          if space.get(k, _MISSING) is not old.get(k, _MISSING)})
                 for space, old in zip(spaces, before, strict=True)]
        return _Changes([(space, d) for space, d in diffs if d], [(m, c) for m, c in classes if type(m) is not c])

    return changes


def patching(model: Any, apply: Callable[[Any], T]) -> tuple[T, Callable[[], None]]:
    """Run `apply(model)`; return its result and a function undoing every change it made to the model.

    Changes are taken right after `apply`, so later changes (training's own) are left alone. If `apply` raises,
    its changes are undone first.
    """
    changes = _watch(model)
    try:
        result = apply(model)
    except BaseException:
        changes().undo()
        raise
    return result, changes().undo


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
            (applied, note), restore = patching(model, apply_fused_kernels)
            switches.notes.append(note)
            if applied:
                undo.callback(restore)
            else:  # liger changed nothing, so there is nothing to undo
                switches.fused_kernels = None
        if switches.word_dropout:
            undo.callback(patching(model, use_word_dropout)[1])
        if switches.compiled:
            undo.callback(patching(model, compile_layers)[1])
        yield switches
