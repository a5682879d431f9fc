"""train.time_budget: time the first steps' forward and backward, then fix the run's optimizer steps so that
training (steps, validations) ends within the budget and the learning-rate schedule completes at the end. At 10%,
30%, 50%, 70% and 90% of the way, the count is fitted again from the real steps, and the schedule rebuilt to it.

The timed steps do not update anything: their gradients are dropped and every random generator is put back, so a
budgeted run trains exactly as an unbudgeted run of the chosen length would, up to the first re-fit.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from desktune.data import Example
from desktune.defaults import REFIT_AT, TIMING_STEPS, budget_steps
from desktune.training.monitor import Monitor
from desktune.training.step import Trainer, accumulate_with_recovery

STEP_MARGIN = 1.05  # a step's time plus 5%: updates, records, checkpoints


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
    # per token: the first steps' samples are not the data's average (here 8% shorter: the run over-ran 11%);
    # the median of the later steps' rates, so one step slowed by another process does not set the count
    return statistics.median(s / max(t, 1) for s, t in zip(seconds[later], tokens[later], strict=True))


def mean_step_tokens(train_set: list[Example], per_step: int) -> float:
    """Tokens an optimizer step sees on average over the whole training set."""
    return per_step * sum(len(e.input_ids) for e in train_set) / max(len(train_set), 1)


def fit_steps(budget_s: float, spent_s: float, step_s: float, wish: int, val_s: float,
              eval_every: int | None, done: int = 0) -> int:
    """The run's step count: `done` steps so far, and those that fit with the validations they bring (every
    `eval_every`, and one at the end)."""
    margin = step_s * STEP_MARGIN
    steps = done + budget_steps(budget_s, spent_s + val_s, margin, wish - done)
    while steps > done + 1 and needed_s(spent_s, step_s, val_s, eval_every, steps, done) > budget_s:
        steps -= 1
    return steps


def needed_s(spent_s: float, step_s: float, val_s: float, eval_every: int | None, steps: int, done: int = 0) -> float:
    """Seconds a run needs to end at `steps`: what is spent, the steps still to come and their validations."""
    vals = 1 + (steps - 1) // eval_every - done // eval_every if eval_every else 1
    return spent_s + (steps - done) * step_s * STEP_MARGIN + val_s * vals


def shortest_budget(seconds: float) -> str:
    """A duration a config takes, rounded up to 10 s: 94.2 -> '100s', 203 -> '3m30s'."""
    s = 10 * math.ceil(seconds / 10)
    return f"{s}s" if s < 120 else f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"


@dataclass
class Refits:
    """When a budgeted run fits its count again from its real steps: once at each of REFIT_AT of the way in,
    past the warm-up."""

    warmup_ratio: float
    left: list[float] = field(default_factory=lambda: list(REFIT_AT))

    def next(self, steps: int, done: int) -> int | None:
        """The next step after `done` to re-fit a run of `steps` at (None: no more, or too short for real steps
        to tell more than the timed ones); each fraction is used once."""
        while self.left:
            fraction = self.left.pop(0)
            at = max(2 * TIMING_STEPS, round(fraction * steps), round(self.warmup_ratio * steps) + 1)
            if done < at < steps:
                return at
        return None


def within_warmup(steps: int, done: int, warmup_ratio: float) -> int:
    """`steps`, lowered so that its schedule's warm-up ends by step `done` (a re-fit never warms up again)."""
    return min(steps, math.ceil((done + 0.5) / warmup_ratio) - 1) if warmup_ratio > 0 else steps


def real_token_s(seconds: list[float], tokens: list[int]) -> float:
    """Seconds a token took in the later half of the real steps so far, each from the end of the step before
    (records and checkpoints included; the first steps still run slower). Steps over 3x the median held a
    validation, which the fit counts on its own."""
    rates = [s / max(t, 1) for s, t in zip(seconds[len(seconds) // 2:], tokens[len(tokens) // 2:], strict=True)]
    usual = [r for r in rates if r <= 3 * statistics.median(rates)]
    return sum(usual) / len(usual)


def first_steps(samples: Iterator[list[Example]], n: int = TIMING_STEPS) -> tuple[list[list[Example]],
                                                                                  Iterator[list[Example]]]:
    """The first `n` steps' samples, and the stream that still yields them first."""
    head = [next(samples) for _ in range(n)]

    def again() -> Iterator[list[Example]]:
        yield from head
        yield from samples

    return head, again()
