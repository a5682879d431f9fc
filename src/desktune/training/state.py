"""What a checkpoint writes and a resume reads: everything the next optimizer step depends on besides weights."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """The trainer state of a checkpoint (saved beside the adapter weights in trainer_state.pt)."""

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
