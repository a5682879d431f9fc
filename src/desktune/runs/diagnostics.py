"""Rules that watch a run's records as they are written and say what is wrong, its likely cause and the fix.

Torch-free like the rest of desktune.runs: plain `math` and `statistics` over the records of metrics.jsonl.
Each check fires at most once per run; a resumed run feeds its earlier records through `replay`, silently.
Every check keeps O(1) work per record (amortised), so a run of many thousand steps pays nothing for it.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from desktune.runs.records import EvalRecord, Record, TrainRecord

DIAGNOSIS = "diagnosis"  # the event name of every finding in metrics.jsonl, live or before training
CHECKS: tuple[str, ...] = ("non_finite", "loss_diverging", "grad_norm_spike", "loss_collapse", "loss_flat",
                           "overfitting", "throughput_collapse", "memory_near_budget")

FLAT_MIN_STEPS = 20  # fewer steps are too noisy to call a run flat
FLAT_MIN_SHARE = 0.2  # and a fifth of the run: a long run's schedule takes longer before the loss must move
FLAT_WINDOW_SHARE = 0.25  # the first and the last quarter of the steps so far are compared
FLAT_MIN_WINDOW = 5  # the fewest steps a window's mean and spread are taken over
FLAT_SE = 1.0  # a drop within one standard error of the difference cannot be told from noise
FLAT_REL = 0.02  # and one under 2% of the starting loss is not learning (both must hold to call it flat)
DIVERGE_WINDOW = 5  # the loss is smoothed by the median of the last 5 steps: one bad batch is not divergence
DIVERGE_FACTOR = 1.5  # 50% above the lowest smoothed loss is far past a healthy run's step-to-step noise
DIVERGE_FROM_START = 2.0  # twice the first step's loss (the base's, before any update): a wrecked model (lr 1e9
# took the embedded model from 3.6 to 10.8, the uniform guess, in one step: its lowest smoothed loss was 10.8)
OUTCOME_MIN_STEPS = 10  # fewer steps are a smoke test, not a run whose result can be called a failure
OUTCOME_MIN_DROP = 0.01  # validation must end 1% below the base's (step 0) on the same fixed set to count as taught
GRAD_WINDOW = 50  # the spike reference is the median of the last 50 norms: recent, yet steady
GRAD_MIN_HISTORY = 10  # fewer previous norms give no stable median
GRAD_FACTOR = 10.0  # healthy norms vary 2-3x between batches; 10x is one batch far outside the rest
OVERFIT_MIN_RISE = 0.01  # validation must end 1% above its best: a plateau's wiggles on a fixed set are smaller
COLLAPSE_LOSS = 0.02  # 0.02 nats per token is ~98% probability on every target token: text is being recited
COLLAPSE_STEPS = 3  # three steps in a row, so not one easy batch
THROUGHPUT_MIN_STEPS = 8  # the first point with a recent window and at least one earlier step to compare
THROUGHPUT_SKIP = 2  # the first steps compile kernels and warm caches, slow even on a healthy run
THROUGHPUT_WINDOW = 5  # median of the last 5 steps: one slow step (a checkpoint write, a long batch) is not it
THROUGHPUT_FACTOR = 1 / 3  # batch lengths move tokens/s by well under 3x; a 3x fall is the machine
MEMORY_SHARE = 0.95  # within 5% of the budget, a longer batch or allocator fragmentation runs out


@dataclass(frozen=True)
class Finding:
    """One problem noticed in a run, for the screen (`message`) and for tools (`data`)."""

    check: str
    step: int | None
    message: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """What the checks compare against: the run's length, its memory budget, its configured peak lr."""

    total_steps: int
    memory_budget_bytes: int | None = None
    lr: float | None = None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()}


def _lr_text(lr: float) -> str:
    """3e-03, 2.5e-04: the way a config writes it."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def _bytes_text(n: float) -> str:
    """Bytes as GiB/MiB, one decimal."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _median_sorted(values: list[float]) -> float:
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class Diagnostics:
    """Feed every record of a run in order to `observe`; it answers the findings that are new."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._fired: set[str] = set()
        self._steps: list[int] = []  # steps with a finite loss, in order
        self._losses: list[float] = []  # their losses
        self._lowest: tuple[int, float] | None = None  # the lowest smoothed loss and its step
        self._low_run = 0  # consecutive steps below COLLAPSE_LOSS
        self._flat_judged = False
        self._grads: deque[float] = deque(maxlen=GRAD_WINDOW)
        self._speeds: list[float] = []  # tokens/s of every step
        self._speed_ref: list[float] = []  # sorted: the steps after the skipped ones, before the recent window
        self._prev_lr: float | None = None
        self._peak_lr: float | None = None
        self._evals: list[tuple[int, float]] = []
        self._best_index: int | None = None

    @property
    def fired(self) -> frozenset[str]:
        """The checks that have reported so far."""
        return frozenset(self._fired)

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, val_loss) of the lowest validation loss so far."""
        return None if self._best_index is None else self._evals[self._best_index]

    def observe(self, record: Record) -> list[Finding]:
        """The new findings this record brings (each check at most once per run)."""
        if isinstance(record, TrainRecord):
            found = self._train(record)
        elif isinstance(record, EvalRecord):
            found = [self._overfitting(record)]
        else:
            return []
        return [f for f in found if f is not None]

    def replay(self, records: list[Record]) -> None:
        """Feed a resumed run's earlier records: what they showed was reported then, so it stays quiet now."""
        for record in records:
            self.observe(record)

    def _say(self, check: str, step: int | None, message: str, **data: Any) -> Finding | None:
        if check in self._fired:
            return None
        self._fired.add(check)
        return Finding(check=check, step=step, message=message, data=_clean(data))

    def _lr_note(self) -> str:
        lr = self.limits.lr if self.limits.lr is not None else self._peak_lr
        return f" (now {_lr_text(lr)})" if lr is not None else ""

    def _train(self, rec: TrainRecord) -> list[Finding | None]:
        if math.isfinite(rec.lr):
            self._peak_lr = rec.lr if self._peak_lr is None else max(self._peak_lr, rec.lr)
        loss = _finite(rec.loss)
        found = [self._non_finite(rec), self._grad_spike(rec), self._memory(rec), self._throughput(rec)]
        if loss is None:
            self._low_run = 0
        else:
            self._steps.append(rec.step)
            self._losses.append(loss)
            found += [self._diverging(rec.step), self._collapse(rec.step, loss), self._flat(rec)]
        self._prev_lr = rec.lr
        return found

    def _non_finite(self, rec: TrainRecord) -> Finding | None:
        bad_loss = _finite(rec.loss) is None
        bad_grad = rec.grad_norm is not None and not math.isfinite(rec.grad_norm)
        if not (bad_loss or bad_grad):
            return None
        what = "loss" if bad_loss and not bad_grad else "gradient" if bad_grad and not bad_loss else "loss and gradient"
        return self._say("non_finite", rec.step,
                         f"step {rec.step}: the {what} was not finite (NaN or infinite), so the step taught the model "
                         f"nothing - the learning rate is likely too high or fp16 overflowed; lower train.lr"
                         f"{self._lr_note()}, keep train.max_grad_norm set, or use train.autocast bf16 or off.",
                         loss=_finite(rec.loss), grad_norm=_finite(rec.grad_norm), step_lr=_finite(rec.lr))

    def _grad_spike(self, rec: TrainRecord) -> Finding | None:
        norm = _finite(rec.grad_norm)
        if norm is None:
            return None
        found = None
        if len(self._grads) >= GRAD_MIN_HISTORY:
            median = statistics.median(self._grads)
            if median > 0 and norm > GRAD_FACTOR * median:
                found = self._say("grad_norm_spike", rec.step,
                                  f"step {rec.step}: the gradient norm jumped to {norm:.3g}, {norm / median:.0f}x "
                                  f"the median {median:.3g} of the steps before - likely a bad batch (a corrupt or "
                                  f"unusually long sample) or too high a learning rate; check the data of this step, "
                                  f"lower train.lr{self._lr_note()} or keep train.max_grad_norm set.",
                                  grad_norm=norm, median_grad_norm=median, previous=len(self._grads))
        self._grads.append(norm)
        return found

    def _memory(self, rec: TrainRecord) -> Finding | None:
        budget = self.limits.memory_budget_bytes
        if not budget:
            return None
        peak = next(v for v in (rec.cuda_peak_bytes, rec.peak_rss_bytes, rec.mem_bytes) if v is not None)
        if peak <= MEMORY_SHARE * budget:
            return None
        return self._say("memory_near_budget", rec.step,
                         f"step {rec.step}: peak memory {_bytes_text(peak)} is {peak / budget:.0%} of the "
                         f"{_bytes_text(budget)} budget - a longer batch may run out of memory; lower "
                         f"train.micro_batch_size (raise train.grad_accum to keep the step size) or enable "
                         f"train.gradient_checkpointing.",
                         peak_bytes=peak, budget_bytes=budget, share=peak / budget)

    def _throughput(self, rec: TrainRecord) -> Finding | None:
        if not math.isfinite(rec.tokens_per_s):
            return None
        self._speeds.append(rec.tokens_per_s)
        leaving = len(self._speeds) - THROUGHPUT_WINDOW - 1  # the step that just left the recent window
        if leaving >= THROUGHPUT_SKIP:
            bisect.insort(self._speed_ref, self._speeds[leaving])
        if len(self._speeds) < THROUGHPUT_MIN_STEPS or not self._speed_ref:
            return None
        recent = statistics.median(self._speeds[-THROUGHPUT_WINDOW:])
        before = _median_sorted(self._speed_ref)
        if recent >= THROUGHPUT_FACTOR * before:
            return None
        return self._say("throughput_collapse", rec.step,
                         f"step {rec.step}: throughput fell to {recent:.0f} tokens/s from {before:.0f} (median of "
                         f"the last {THROUGHPUT_WINDOW} steps against the earlier ones) - the machine is likely "
                         f"swapping under memory pressure or another process is competing; close other programs, "
                         f"or lower train.micro_batch_size or set train.memory_budget.",
                         recent_tokens_per_s=recent, earlier_tokens_per_s=before)

    def _diverging(self, step: int) -> Finding | None:
        if len(self._losses) < DIVERGE_WINDOW:
            return None
        smooth = statistics.median(self._losses[-DIVERGE_WINDOW:])
        if self._lowest is None or smooth < self._lowest[1]:
            self._lowest = (step, smooth)
        low_step, low = self._lowest
        first = self._losses[0]
        if smooth > DIVERGE_FROM_START * first and first < low:
            low_step, low = self._steps[0], first
        if len(self._losses) <= DIVERGE_WINDOW or smooth <= DIVERGE_FACTOR * low or smooth <= first:
            return None
        return self._say("loss_diverging", step,
                         f"step {step}: the training loss is climbing (median {smooth:.3f} of the last "
                         f"{DIVERGE_WINDOW} steps, from its lowest {low:.3f} at step {low_step} and above the first "
                         f"step's {first:.3f}) - the learning rate is likely too high; lower "
                         f"train.lr{self._lr_note()}, raise train.warmup_ratio, or keep train.max_grad_norm set.",
                         smoothed_loss=smooth, lowest_loss=low, lowest_step=low_step, first_loss=first)

    def _collapse(self, step: int, loss: float) -> Finding | None:
        self._low_run = self._low_run + 1 if loss < COLLAPSE_LOSS else 0
        if self._low_run < COLLAPSE_STEPS:
            return None
        return self._say("loss_collapse", step,
                         f"step {step}: the training loss is below {COLLAPSE_LOSS} for {self._low_run} steps in a "
                         f"row - the model is reciting the training set, or the answer leaks into what it sees (in "
                         f"the prompt, or data.train_on all on templated data); check the data and data.train_on, "
                         f"add validation data (data.val) and lower train.epochs.",
                         loss=loss, steps_below=self._low_run, threshold=COLLAPSE_LOSS)

    def _flat(self, rec: TrainRecord) -> Finding | None:
        """Judged once: at the first step past the minimum that is no longer in warm-up (lr not rising)."""
        n = len(self._losses)
        warming = self._prev_lr is not None and rec.lr > self._prev_lr
        if self._flat_judged or warming or n < max(FLAT_MIN_STEPS, FLAT_MIN_SHARE * self.limits.total_steps):
            return None
        self._flat_judged = True
        w = max(FLAT_MIN_WINDOW, int(n * FLAT_WINDOW_SHARE))
        first, last = self._losses[:w], self._losses[-w:]
        start, end = statistics.fmean(first), statistics.fmean(last)
        se = math.sqrt((statistics.variance(first) + statistics.variance(last)) / w)
        drop = start - end
        if drop > FLAT_SE * se or drop >= FLAT_REL * abs(start):
            return None
        return self._say("loss_flat", rec.step,
                         f"step {rec.step}: the training loss has not dropped ({start:.3f} over the first {w} "
                         f"steps, {end:.3f} over the last {w}) - the learning rate is likely too low or the labels "
                         f"are wrong; raise train.lr{self._lr_note()} and check data.train_on and data.format.",
                         first_mean=start, last_mean=end, drop=drop, standard_error=se, window=w)

    def _overfitting(self, rec: EvalRecord) -> Finding | None:
        val = _finite(rec.val_loss)
        if val is None:
            return None
        self._evals.append((rec.step, val))
        if self._best_index is None or val < self._evals[self._best_index][1]:
            self._best_index = len(self._evals) - 1
            return None
        best, since = self._evals[self._best_index], self._evals[self._best_index:]
        if len(since) < 3 or not (since[-3][1] < since[-2][1] < val) or val <= best[1] * (1 + OVERFIT_MIN_RISE):
            return None
        train = self._losses[bisect.bisect_right(self._steps, best[0]):bisect.bisect_right(self._steps, rec.step)]
        half = len(train) // 2
        if half == 0 or statistics.fmean(train[-half:]) >= statistics.fmean(train[:half]):
            return None
        return self._say("overfitting", rec.step,
                         f"step {rec.step}: validation loss rose at two evaluations in a row ({best[1]:.3f} at "
                         f"step {best[0]}, now {val:.3f}) while the training loss kept falling - the model is "
                         f"memorising the training set; the best weights are those of step {best[0]}, so lower "
                         f"train.epochs, set train.early_stopping_patience, or add more data.",
                         val_loss=val, best_step=best[0], best_val_loss=best[1],
                         train_loss_early=statistics.fmean(train[:half]),
                         train_loss_late=statistics.fmean(train[-half:]))


@dataclass(frozen=True)
class Outcome:
    """Whether a finished run taught the model anything, and if not, why (the last line a run prints)."""

    learned: bool
    reason: str = ""
    check: str | None = None  # "loss_diverging" or "no_learning" when not learned


def judge_outcome(fired: frozenset[str], steps: int, val_losses: list[tuple[int, float]],
                  train_losses: list[float]) -> Outcome:
    """A run diverged (its diagnosis fired), or ended with validation no better than the base's at step 0 (or,
    without validation, its training loss flat), is a failure; runs under OUTCOME_MIN_STEPS are not judged."""
    if "loss_diverging" in fired:
        return Outcome(False, "the training loss diverged", "loss_diverging")
    if steps < OUTCOME_MIN_STEPS:
        return Outcome(True)
    base = next((v for s, v in val_losses if s == 0), None)
    if base is not None and len(val_losses) > 1 and math.isfinite(base):
        best = min(v for s, v in val_losses if s > 0)
        if not best < base * (1 - OUTCOME_MIN_DROP):
            return Outcome(False, f"the validation loss never went {OUTCOME_MIN_DROP:.0%} below the base's "
                                  f"({base:.4f} at step 0, best {best:.4f})", "no_learning")
        return Outcome(True)
    if "loss_flat" in fired or not _dropped(train_losses):
        return Outcome(False, "the training loss did not drop", "no_learning")
    return Outcome(True)


def _dropped(losses: list[float]) -> bool:
    """The last quarter's mean training loss below the first quarter's by OUTCOME_MIN_DROP."""
    finite = [v for v in losses if math.isfinite(v)]
    w = max(1, len(finite) // 4)
    return bool(finite) and statistics.fmean(finite[-w:]) < statistics.fmean(finite[:w]) * (1 - OUTCOME_MIN_DROP)
