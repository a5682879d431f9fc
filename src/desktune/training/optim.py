"""Optimizer and learning-rate schedule for the trainable (adapter) parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from desktune.config import TrainConfig

# bitsandbytes 0.50.2 steps all three on CPU tensors (measured: AdamW8bit and PagedAdamW8bit keep uint8 state,
# PagedAdamW fp32 state; bitsandbytes itself keeps a paged optimizer's state unpaged on the CPU, with a warning)
_BNB = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}
_UNPAGED = {"paged_adamw": "adamw", "paged_adamw_8bit": "adamw_8bit"}


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> Any:
    """AdamW (torch), or bitsandbytes' 8-bit / paged AdamW (on CUDA and the CPU; see `effective_optimizer`)."""
    params = [p for p in params if p.requires_grad]
    if not isinstance(cfg.lr, float | int):
        raise ValueError(f"train.lr must be resolved before the optimizer is made (got {cfg.lr!r})")
    kw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999), "eps": 1e-8}
    name = effective_optimizer(cfg.optimizer, device)
    if name == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    import bitsandbytes as bnb

    return getattr(bnb.optim, _BNB[name])(params, **kw)


def effective_optimizer(name: str, device: torch.device) -> str:
    """The optimizer a run uses: the configured one, except a paged one on a device that is neither CUDA nor the
    CPU (MPS), which gets its unpaged twin: bitsandbytes allocates paged state as CUDA managed memory for every
    tensor not on the CPU (`Optimizer8bit.get_state_buffer`; read in its source, not run here)."""
    if device.type not in ("cuda", "cpu") and name in _UNPAGED:
        return _UNPAGED[name]
    return name


def make_scheduler(optimizer: Any, cfg: TrainConfig, total_steps: int) -> Any:
    """Warmup then cosine, linear or constant learning rate (transformers' schedules)."""
    from transformers import get_scheduler

    warmup = round(cfg.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def reschedule(optimizer: Any, old: Any, cfg: TrainConfig, total_steps: int) -> Any:
    """The schedule of `total_steps` at the step `old` has reached; the optimizer's learning rate is set to it
    (what a resumed run rebuilds from its checkpoint is the same object)."""
    new = make_scheduler(optimizer, cfg, total_steps)
    new.load_state_dict(old.state_dict())
    new.last_epoch -= 1
    new.step()  # the current step's rate under the new schedule
    return new
