"""What a checkpoint writes and a resume reads: everything the next optimizer step depends on besides weights.

On disk (names from runs/layout.py): trainer_state.json holds the state's tree of plain values, each tensor
replaced by a reference into trainer_state.safetensors. Neither format can run code when read (our own
encoding, instead of torch.save's pickle: a checkpoint folder from someone else is then safe to resume).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FORMAT = 1
_TENSOR, _ARRAY, _TUPLE, _MAP = "__tensor__", "__ndarray__", "__tuple__", "__map__"


@dataclass
class TrainState:
    """The trainer state of a checkpoint."""

    step: int  # optimizer steps done
    micro_batch_size: int  # in use when saved (OOM recovery may have halved it)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]  # fp16 loss scaler (disabled in bf16/fp32)
    rng: dict[str, Any]  # every generator a step draws from (training/resume.capture_rng)
    config_fingerprint: dict[str, Any]  # the resolved config, less the keys a resume may change
    data_fingerprint: dict[str, str]  # sha256 of each data file
    total_steps: int | None = None  # the run's optimizer steps (fixed by train.time_budget; older states: None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        """The state of a saved mapping (KeyError names a missing field; fields added later may be absent)."""
        return cls(**{f.name: raw[f.name] if f.default is MISSING or f.name in raw else f.default
                      for f in fields(cls)})


def encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON-ready data; its tensors move into `tensors` under the names the result refers to."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors refuses shared
        return {_TENSOR: name}
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, tensors) for k, v in value.items()}
        return {_MAP: [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}  # optimizer's int keys
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state holds a {type(value).__name__}, which the state file cannot store")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value `encode` turned into `data` (KeyError: a tensor the file lacks; ValueError: a malformed tree)."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if _TENSOR in data:
        return tensors[data[_TENSOR]]
    if _ARRAY in data:
        return np.asarray(data[_ARRAY], dtype=np.dtype(data["dtype"]))
    if _TUPLE in data:
        return tuple(decode(v, tensors) for v in data[_TUPLE])
    if _MAP in data:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in data[_MAP]}
    return {k: decode(v, tensors) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise ValueError(f"a mapping key cannot be a {type(key).__name__}")
    return key


def write_state(state: TrainState, tree_file: Path, tensor_file: Path) -> None:
    """Write `state` as JSON (the tree) plus safetensors (its tensors)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = {"format": STATE_FORMAT, "state": encode(state.to_dict(), tensors)}
    save_file(tensors, str(tensor_file))
    tree_file.write_text(json.dumps(tree), encoding="utf-8")


def read_state(tree_file: Path, tensor_file: Path) -> TrainState:
    """The state `write_state` wrote (OSError, ValueError, KeyError, TypeError or SafetensorError when damaged)."""
    from safetensors.torch import load_file

    tree = json.loads(tree_file.read_text(encoding="utf-8"))
    if not isinstance(tree, dict) or tree.get("format") != STATE_FORMAT:
        raise ValueError(f"not a desktune trainer state of format {STATE_FORMAT}")
    state = decode(tree["state"], load_file(str(tensor_file)))
    if not isinstance(state, dict):
        raise ValueError("the state is not a mapping")
    return TrainState.from_dict(state)
