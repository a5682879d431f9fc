"""Memory planning: predict a training step's peak memory before loading anything, and measure the real one.

`estimate` (the function) lives in `desktune.memory.estimate` (the module) and is not re-exported here, so that
the module stays importable under its own name.
"""

from desktune.memory.catalog import CATALOG, ArchSpec, arch_from_config, resolve_arch
from desktune.memory.estimate import (
    Component,
    Plan,
    PlanInputs,
    fit_settings,
    largest_fitting,
    suggestions,
)

# measure.py needs torch; it is imported on first use so `desktune plan` answers without loading torch
_LAZY = {"PeakTracker", "model_tensors"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from desktune.memory import measure

        return getattr(measure, name)
    raise AttributeError(name)


__all__ = [
    "CATALOG",
    "ArchSpec",
    "Component",
    "PeakTracker",
    "Plan",
    "PlanInputs",
    "arch_from_config",
    "fit_settings",
    "largest_fitting",
    "model_tensors",
    "resolve_arch",
    "suggestions",
]
