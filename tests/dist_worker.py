"""A rank of a test's multi-process run, started by torch's launcher (spawned: importable, top-level): trains a
config, with an out-of-memory injected on one rank when asked."""

from __future__ import annotations

import os


def train_rank(config: str, oom_rank: int | None = None, oom_step: int = 2) -> int:
    """Train `config` as this rank; rank `oom_rank` runs out of memory once at step `oom_step` (micro-batch > 1).
    Returns the steps trained."""
    import torch

    from desktune.config import load_config
    from desktune.training import step as step_mod
    from desktune.training.loop import train

    if oom_rank is not None and int(os.environ["RANK"]) == oom_rank:
        real = step_mod.forward_backward

        def short_of_memory(tr, batch, normaliser):
            if tr.step == oom_step and tr.micro > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return real(tr, batch, normaliser)

        step_mod.forward_backward = short_of_memory
    return train(load_config(config), quiet=True).steps
