"""Optimizer and learning-rate schedule for the trainable (adapter) parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from desktune.config import TrainConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> Any:
    """AdamW (torch), or bitsandbytes 8-bit / paged AdamW; paged falls back to unpaged off CUDA."""
    params = [p for p in params if p.requires_grad]
    if not isinstance(cfg.lr, float | int):
        raise ValueError(f"train.lr must be resolved before the optimizer is made (got {cfg.lr!r})")
    kw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": (0.9, 0.999), "eps": 1e-8}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    import bitsandbytes as bnb

    name = effective_optimizer(cfg.optimizer, device)
    if name == "adamw":
        return torch.optim.AdamW(params, **kw)
    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[name]
    return cls(params, **kw)


def effective_optimizer(name: str, device: torch.device) -> str:
    """Paging moves optimizer state to CPU memory under GPU pressure; off CUDA the unpaged twin is used."""
    if device.type != "cuda" and name.startswith("paged_"):
        return {"paged_adamw": "adamw", "paged_adamw_8bit": "adamw_8bit"}[name]
    return name


def make_scheduler(optimizer: Any, cfg: TrainConfig, total_steps: int) -> Any:
    """Warmup then cosine, linear or constant learning rate (transformers' schedules)."""
    from transformers import get_scheduler

    warmup = round(cfg.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
