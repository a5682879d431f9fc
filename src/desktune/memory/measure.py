"""Measure the true peak memory of a block of code: live tensor bytes on the CPU, the allocator's peak on CUDA.

CPU: a `TorchDispatchMode` sees the output of every aten operator (forward, backward and optimizer alike).
Each new storage is counted once (deduplicated by storage identity) with its bytes, and a weak reference
subtracts it when the storage is freed. The count starts from the bytes of the tensors passed as `baseline`
(the model's parameters and buffers, the optimizer's state) that exist on entry. What this does not see:
temporaries that live only inside one operator (inside a C++ kernel or a tensor subclass's own dispatch, such
as torchao NF4's unpacking), allocator slack, and memory that is not a tensor (Python objects, libraries).

CUDA: `torch.cuda.reset_peak_memory_stats` on entry and `torch.cuda.max_memory_allocated` on exit: every
allocation of the caching allocator, including cuBLAS workspaces, rounded to its 512-byte blocks.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


def tensor_storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages that hold a tensor's data (a wrapper subclass's inner tensors, recursively)."""
    out, todo = [], [t]
    while todo:
        x = todo.pop()
        if is_traceable_wrapper_subclass(x):
            names, _ = x.__tensor_flatten__()
            todo.extend(v for v in (getattr(x, n) for n in names) if isinstance(v, torch.Tensor))
        elif isinstance(x, torch.Tensor):
            try:
                out.append(x.untyped_storage())
            except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. meta, sparse)
                continue
    return out


class _LiveStorages(TorchDispatchMode):
    """Counts the bytes of live storages created by operators, and their peak."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: set[weakref.ref] = set()

    def add(self, t: torch.Tensor) -> None:
        for st in tensor_storages(t):
            if st.device.type != self.device_type:
                continue
            known = self._seen.get(st)
            size = st.nbytes()
            if known is not None:
                if known[0] != size:  # resized in place (e.g. an out= argument)
                    self.current += size - known[0]
                    known[0] = size
                    self.peak = max(self.peak, self.current)
                continue
            cell = [size]
            self._seen[st] = cell
            self._refs.add(weakref.ref(st, lambda r, c=cell: self._free(r, c)))
            self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, ref: weakref.ref, cell: list[int]) -> None:
        self._refs.discard(ref)
        self.current -= cell[0]
        cell[0] = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


class PeakTracker:
    """Context manager measuring the peak memory of live tensors while it is open.

    `baseline`: tensors that exist on entry and count (parameters, buffers, optimizer state); each storage once.
    On CUDA the allocator's own peak is used and `baseline` is ignored (the allocator already holds them).
    `peak_bytes` is valid after exit; `baseline_bytes` is what existed on entry.
    """

    def __init__(self, device: torch.device | str = "cpu", baseline: Iterable[torch.Tensor] = ()) -> None:
        self.device = torch.device(device)
        self._baseline = list(baseline)
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._mode: _LiveStorages | None = None

    def __enter__(self) -> PeakTracker:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        self._mode = _LiveStorages(self.device.type)
        for t in self._baseline:
            self._mode.add(t)
        self._baseline = []
        self.baseline_bytes = self._mode.current
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        assert self._mode is not None
        self._mode.__exit__(*exc)
        self.peak_bytes = self._mode.peak

    @property
    def current_bytes(self) -> int:
        """Live bytes now (CPU: tracked storages; CUDA: allocated)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return self._mode.current if self._mode is not None else 0


def model_tensors(model: torch.nn.Module, optimizer: Any = None) -> list[torch.Tensor]:
    """Parameters, buffers and (if given) optimizer state tensors: the baseline of a training step."""
    out: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        for state in optimizer.state.values():
            out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out
