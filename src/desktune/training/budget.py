"""train.time_budget: time the first steps' forward and backward, then fix the run's optimizer steps so that
training (steps, validations) ends within the budget and the learning-rate schedule completes at the end.

The timed steps do not update anything: their gradients are dropped and every random generator is put back, so a
budgeted run trains exactly as an unbudgeted run of the chosen length would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from desktune.data import Example
from desktune.defaults import TIMING_STEPS, budget_steps
from desktune.training.monitor import Monitor
from desktune.training.step import Trainer, accumulate_with_recovery


@contextmanager
def rng_kept(device: torch.device) -> Iterator[None]:
    """Every generator a step draws from, as it was before (the timing must not shift dropout masks)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield


def time_steps(tr: Trainer, steps: list[list[Example]], mon: Monitor) -> float:
    """Seconds a token of one optimizer step's forward and backward takes, timed on `steps` (their gradients
    dropped)."""
    seconds, tokens = [], []
    with rng_kept(tr.device):
        for samples in steps:
            t0 = time.perf_counter()
            accumulate_with_recovery(tr, samples, tr.objective.normaliser(samples), mon)
            seconds.append(time.perf_counter() - t0)
            tokens.append(sum(len(e.input_ids) for e in samples))
            tr.optimizer.zero_grad(set_to_none=True)
    later = slice(1, None) if len(steps) > 1 else slice(None)  # the first pays for warm-up (allocator, oneDNN)
    # per token: the first steps' samples are not the data's average (here 8% shorter: the run over-ran 11%)
    return sum(seconds[later]) / max(sum(tokens[later]), 1)


def mean_step_tokens(train_set: list[Example], per_step: int) -> float:
    """Tokens an optimizer step sees on average over the whole training set."""
    return per_step * sum(len(e.input_ids) for e in train_set) / max(len(train_set), 1)


def fit_steps(budget_s: float, spent_s: float, step_s: float, wish: int, val_s: float,
              eval_every: int | None) -> int:
    """Steps that fit with the validations they bring (every `eval_every`, and one at the end)."""
    steps = budget_steps(budget_s, spent_s + val_s, step_s * 1.05, wish)  # 5%: updates, records, checkpoints
    while steps > 1 and eval_every and spent_s + steps * step_s * 1.05 + val_s * (1 + (steps - 1) // eval_every) \
            > budget_s:
        steps -= 1
    return steps


def first_steps(samples: Iterator[list[Example]], n: int = TIMING_STEPS) -> tuple[list[list[Example]],
                                                                                  Iterator[list[Example]]]:
    """The first `n` steps' samples, and the stream that still yields them first."""
    head = [next(samples) for _ in range(n)]

    def again() -> Iterator[list[Example]]:
        yield from head
        yield from samples

    return head, again()
