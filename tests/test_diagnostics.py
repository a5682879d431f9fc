"""Run diagnostics: each rule fires on a constructed stream that shows its problem, once, and never on a healthy run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

from desktune.runs import CheckpointRecord, EvalRecord, EventRecord, Record, TrainRecord
from desktune.runs.diagnostics import CHECKS, Diagnostics, Finding, Limits

GIB = 2**30


def train(step: int, loss: float | None, *, lr: float = 1e-3, grad_norm: float | None = 1.0,
          tokens_per_s: float = 1000.0, **extra: int | None) -> TrainRecord:
    """A training step with sensible defaults."""
    extra.setdefault("mem_bytes", 2 * GIB)
    return TrainRecord(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=2000, target_tokens=800,
                       tokens_per_s=tokens_per_s, step_s=2000 / tokens_per_s, epoch=step / 100, **extra)


def ev(step: int, val_loss: float | None) -> EvalRecord:
    """A validation pass."""
    return EvalRecord(step=step, val_loss=val_loss, val_tokens=5000)


def observe_all(diag: Diagnostics, records: list[Record]) -> list[Finding]:
    return [f for r in records for f in diag.observe(r)]


def noise(step: int, scale: float) -> float:
    """Deterministic, zero-mean-ish jitter."""
    return scale * math.sin(step * 2.3 + 0.7)


def warmup_cosine(step: int, total: int, peak: float = 1e-3, warmup: int = 2) -> float:
    if step <= warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------- streams that show one problem each


def flat_stream() -> tuple[Limits, list[Record]]:
    """Loss around 2.5 for 30 steps at a tiny constant lr: nothing is being learned."""
    return Limits(total_steps=100, lr=1e-7), [train(s, 2.5 + noise(s, 0.05), lr=1e-7) for s in range(1, 31)]


def diverging_stream() -> tuple[Limits, list[Record]]:
    """Loss falls to 1.0, then jumps to 4.0 (above the first 3.0) and stays there."""
    losses = [3.0, 2.5, 2.0, 1.6, 1.3, 1.1, 1.0, 1.0, 1.0, 1.0] + [4.0] * 8
    return Limits(total_steps=200, lr=3e-3), [train(s, x) for s, x in enumerate(losses, 1)]


def spike_stream() -> tuple[Limits, list[Record]]:
    """Grad norms ~1, a 30x spike at step 12, another at step 14."""
    norms = {12: 30.0, 14: 40.0}
    return Limits(total_steps=200), [train(s, 2.0 - 0.01 * s, grad_norm=norms.get(s, 1.0 + noise(s, 0.1)))
                                     for s in range(1, 17)]


def overfit_stream() -> tuple[Limits, list[Record]]:
    """Training loss falls all along; validation is best at step 20, then rises at 30, 40 and 50."""
    records: list[Record] = []
    vals = {10: 1.5, 20: 1.2, 30: 1.25, 40: 1.32, 50: 1.4}
    for s in range(1, 51):
        records.append(train(s, 2.0 * math.exp(-s / 15) + 0.1))
        if s in vals:
            records.append(ev(s, vals[s]))
    return Limits(total_steps=50), records


def collapse_stream() -> tuple[Limits, list[Record]]:
    """Loss goes to ~0.01 and stays: three steps below 0.02 end at step 6."""
    losses = [1.0, 0.5, 0.1, 0.015, 0.01, 0.012, 0.008, 0.005]
    return Limits(total_steps=200), [train(s, x) for s, x in enumerate(losses, 1)]


def throughput_stream() -> tuple[Limits, list[Record]]:
    """Two slow warm-up steps, ten at ~1000 tokens/s, then 200 tokens/s from step 13 on."""
    def speed(s: int) -> float:
        return 150.0 if s <= 2 else 1000.0 + noise(s, 60) if s <= 12 else 200.0
    return Limits(total_steps=200), [train(s, 2.0 - 0.01 * s, tokens_per_s=speed(s)) for s in range(1, 21)]


def memory_stream() -> tuple[Limits, list[Record]]:
    """CUDA peak climbs past 95% of an 8 GiB budget at step 5 and stays there."""
    peaks = [6.0, 6.5, 7.0, 7.5, 7.7, 7.8, 7.9]
    return Limits(total_steps=200, memory_budget_bytes=8 * GIB), [
        train(s, 2.0, cuda_peak_bytes=int(p * GIB), peak_rss_bytes=3 * GIB) for s, p in enumerate(peaks, 1)]


def non_finite_stream() -> tuple[Limits, list[Record]]:
    """A step whose loss is not finite at step 4, another at step 6."""
    losses = [2.0, 1.9, 1.8, None, 1.7, float("nan"), 1.6]
    return Limits(total_steps=200, lr=5e-3), [train(s, x) for s, x in enumerate(losses, 1)]


# check id -> (stream, step it is noticed at, the fix the message must name)
STREAMS: dict[str, tuple[Callable[[], tuple[Limits, list[Record]]], int, str]] = {
    "loss_flat": (flat_stream, 20, "train.lr"),
    "loss_diverging": (diverging_stream, 13, "train.lr"),
    "grad_norm_spike": (spike_stream, 12, "train.lr"),
    "overfitting": (overfit_stream, 40, "train.early_stopping_patience"),
    "loss_collapse": (collapse_stream, 6, "data.train_on"),
    "throughput_collapse": (throughput_stream, 15, "train.micro_batch_size"),
    "memory_near_budget": (memory_stream, 5, "train.gradient_checkpointing"),
    "non_finite": (non_finite_stream, 4, "train.lr"),
}


def test_every_check_has_a_stream():
    assert set(STREAMS) == set(CHECKS)
    assert len(CHECKS) == len(set(CHECKS))


@pytest.mark.parametrize("check", CHECKS)
def test_each_check_fires_once_at_its_step_and_names_the_fix(check):
    make, step, fix = STREAMS[check]
    limits, records = make()
    found = observe_all(Diagnostics(limits), records)
    assert [f.check for f in found] == [check]  # once, although the condition persists; no other check fires
    (f,) = found
    assert f.step == step
    assert fix in f.message
    assert f.message.startswith(f"step {step}: ")
    assert f.message.endswith(".") and ". " not in f.message  # one sentence
    json.dumps(f.data, allow_nan=False)  # JSON-serialisable, finite


def test_messages_carry_the_configured_lr():
    limits, records = diverging_stream()
    (f,) = observe_all(Diagnostics(limits), records)
    assert "lower train.lr (now 3e-03)" in f.message
    limits, records = non_finite_stream()
    (f,) = observe_all(Diagnostics(Limits(total_steps=200)), records)
    assert "(now 1e-03)" in f.message  # no configured lr: the peak seen in the records


def test_the_overfitting_message_names_the_best_step():
    limits, records = overfit_stream()
    (f,) = observe_all(Diagnostics(limits), records)
    assert "step 20" in f.message
    assert f.data["best_step"] == 20 and f.data["best_val_loss"] == 1.2


# ---------------------------------------------------------------- what must not fire


def healthy_stream(steps: int = 27) -> list[Record]:
    """Loss 3.9*exp(-s/10)+1 with small noise, grad norms ~1, evals falling, steady throughput."""
    records: list[Record] = [ev(0, 4.95)]
    for s in range(1, steps + 1):
        records.append(train(s, 3.9 * math.exp(-s / 10) + 1.0 + noise(s, 0.03), lr=warmup_cosine(s, steps),
                             grad_norm=1.0 + noise(s + 1, 0.2), tokens_per_s=(400.0 if s <= 2 else 1000.0)
                             + noise(s, 40), peak_rss_bytes=int((2.0 + 0.01 * s) * GIB)))
        if s % 7 == 0 or s == steps:
            records.append(ev(s, 3.9 * math.exp(-s / 10) + 1.05))
    return records


def demo_stream() -> list[Record]:
    """Shaped like the real demo run: 27 steps, 3 epochs of 9, loss 3.873 -> 0.991, val 3.435 -> 1.016."""
    losses = [3.873, 3.611, 2.987, 2.552, 2.164, 1.978, 1.702, 1.745, 1.590,
              1.398, 1.452, 1.301, 1.334, 1.262, 1.281, 1.204, 1.229, 1.176,
              1.083, 1.102, 1.041, 1.057, 1.018, 1.032, 0.996, 1.009, 0.991]
    norms = [3.9, 3.2, 2.6, 2.1, 1.8, 1.6, 1.3, 1.5, 1.2, 1.1, 1.3, 1.0, 1.1, 0.9, 1.0, 0.9, 0.95, 0.85,
             0.8, 0.9, 0.75, 0.8, 0.7, 0.75, 0.7, 0.72, 0.68]
    speeds = [430, 880, 1010, 960, 1040, 990, 905, 1070, 1000] * 3
    vals = {0: 3.435, 7: 1.702, 14: 1.251, 21: 1.083, 27: 1.016}
    records: list[Record] = [ev(0, vals[0])]
    for s in range(1, 28):
        records.append(train(s, losses[s - 1], lr=warmup_cosine(s, 27), grad_norm=norms[s - 1],
                             tokens_per_s=float(speeds[s - 1]), peak_rss_bytes=int(1.6 * GIB)))
        if s in vals:
            records.append(ev(s, vals[s]))
    return records


def long_healthy_stream(steps: int = 300) -> list[Record]:
    """A long run that plateaus: validation wiggles by 0.2% at the end, throughput and grad norms wander."""
    records: list[Record] = []
    for s in range(1, steps + 1):
        speed = 300.0 if s <= 2 or s % 50 == 0 else 1000.0 + noise(s, 150)  # slow steps: warm-up, checkpoints
        norm = 3.0 if s % 37 == 0 else 1.0 + noise(s + 3, 0.3)
        records.append(train(s, 3.9 * math.exp(-s / 30) + 1.0 + noise(s, 0.05), lr=warmup_cosine(s, steps, 2e-4, 9),
                             grad_norm=norm, tokens_per_s=speed, cuda_peak_bytes=int(6.5 * GIB)))
        if s % 20 == 0:
            records.append(ev(s, 3.9 * math.exp(-s / 30) + 1.05 + 0.002 * math.sin(s)))
    return records


@pytest.mark.parametrize("records", [healthy_stream(), demo_stream(), long_healthy_stream()],
                         ids=["healthy", "demo", "long-healthy"])
def test_a_healthy_run_triggers_nothing(records):
    steps = max(r.step for r in records if isinstance(r, TrainRecord))
    diag = Diagnostics(Limits(total_steps=steps, memory_budget_bytes=8 * GIB, lr=1e-3))
    assert observe_all(diag, records) == []


def test_a_single_bad_batch_is_not_divergence():
    losses = [3.0, 2.5, 2.0, 1.6, 1.3, 1.1, 1.0, 1.0, 50.0, 1.0, 0.98, 0.97]
    found = observe_all(Diagnostics(Limits(total_steps=100)), [train(s, x) for s, x in enumerate(losses, 1)])
    assert found == []


def test_a_slow_but_steady_drop_is_not_flat():
    """Under 2% relative, yet well beyond the noise: learning."""
    records = [train(s, 2.5 - 0.001 * s + noise(s, 0.0005), lr=1e-5) for s in range(1, 31)]
    assert observe_all(Diagnostics(Limits(total_steps=30)), records) == []


def test_a_noisy_but_clear_drop_is_not_flat():
    """Within the noise of five steps, yet 6% down: learning."""
    records = [train(s, (2.5 if s <= 10 else 2.35) + noise(s, 0.4), lr=1e-5) for s in range(1, 21)]
    assert observe_all(Diagnostics(Limits(total_steps=20)), records) == []


def test_flat_waits_for_the_warmup_to_end():
    lr = [min(s, 30) * 1e-8 for s in range(1, 41)]  # rising until step 30
    records = [train(s, 2.5 + noise(s, 0.05), lr=lr[s - 1]) for s in range(1, 41)]
    (f,) = observe_all(Diagnostics(Limits(total_steps=100)), records)
    assert (f.check, f.step) == ("loss_flat", 31)


def test_a_spike_needs_ten_previous_norms():
    records = [train(s, 2.0, grad_norm=1.0) for s in range(1, 10)] + [train(10, 2.0, grad_norm=50.0)]
    assert observe_all(Diagnostics(Limits(total_steps=100)), records) == []


def test_overfitting_needs_the_training_loss_falling():
    records: list[Record] = []
    vals = {10: 1.5, 20: 1.2, 30: 1.25, 40: 1.32}
    for s in range(1, 41):
        records.append(train(s, 2.0 - 0.05 * s if s <= 20 else 1.0 + 0.01 * (s - 20)))  # rising after the best
        if s in vals:
            records.append(ev(s, vals[s]))
    assert observe_all(Diagnostics(Limits(total_steps=40)), records) == []


def test_overfitting_needs_two_rises_in_a_row():
    records: list[Record] = []
    vals = {10: 1.5, 20: 1.2, 30: 1.25, 40: 1.22, 50: 1.3}  # up, down, up: no two rises in a row
    for s in range(1, 51):
        records.append(train(s, 2.0 * math.exp(-s / 15) + 0.1))
        if s in vals:
            records.append(ev(s, vals[s]))
    assert observe_all(Diagnostics(Limits(total_steps=50)), records) == []


def test_overfitting_ignores_a_plateau_that_wiggles():
    records: list[Record] = []
    vals = {10: 1.5, 20: 1.2, 30: 1.201, 40: 1.203, 50: 1.205}  # rising twice, but by under 1%
    for s in range(1, 51):
        records.append(train(s, 2.0 * math.exp(-s / 15) + 0.1))
        if s in vals:
            records.append(ev(s, vals[s]))
    assert observe_all(Diagnostics(Limits(total_steps=50)), records) == []


def test_throughput_leaves_the_warmup_steps_out_of_its_reference():
    """Two slow compile steps must not drag down what a collapse right after them is measured against."""
    speeds = [100.0, 100.0, 1000.0, 1000.0] + [200.0] * 6
    records = [train(s, 2.0 - 0.01 * s, tokens_per_s=x) for s, x in enumerate(speeds, 1)]
    found = observe_all(Diagnostics(Limits(total_steps=100)), records)
    assert [(f.check, f.step) for f in found] == [("throughput_collapse", 8)]


def test_memory_uses_cuda_peak_before_rss_and_skips_without_a_budget():
    rec = train(1, 2.0, cuda_peak_bytes=4 * GIB, peak_rss_bytes=8 * GIB)
    assert Diagnostics(Limits(total_steps=10, memory_budget_bytes=8 * GIB)).observe(rec) == []
    rss = train(1, 2.0, peak_rss_bytes=int(7.9 * GIB))
    assert [f.check for f in Diagnostics(Limits(total_steps=10, memory_budget_bytes=8 * GIB)).observe(rss)] == [
        "memory_near_budget"]
    assert Diagnostics(Limits(total_steps=10)).observe(train(1, 2.0, mem_bytes=100 * GIB)) == []


def test_a_non_finite_gradient_is_noticed():
    (f,) = Diagnostics(Limits(total_steps=10)).observe(train(3, 2.0, grad_norm=float("inf")))
    assert (f.check, f.step) == ("non_finite", 3)
    assert "gradient" in f.message
    assert f.data["grad_norm"] is None


def test_other_records_are_ignored():
    diag = Diagnostics(Limits(total_steps=10))
    others = [EventRecord(message="note", name="note"), CheckpointRecord(step=1, path="x")]
    assert observe_all(diag, others) == []


# ---------------------------------------------------------------- best and replay


def test_best_tracks_the_lowest_finite_validation_loss():
    diag = Diagnostics(Limits(total_steps=30))
    assert diag.best is None
    observe_all(diag, [ev(0, 3.0), ev(7, 2.0), ev(14, None), ev(21, float("nan")), ev(24, 2.0), ev(27, 2.5)])
    assert diag.best == (7, 2.0)  # a tie keeps the earlier step
    diag.observe(ev(30, 1.5))
    assert diag.best == (30, 1.5)


def test_replay_suppresses_what_was_reported_and_detection_goes_on():
    limits, records = spike_stream()
    diag = Diagnostics(limits)
    diag.replay(records)  # the spike at step 12 was reported before the resume
    later = [train(17, 1.8, grad_norm=60.0), train(18, 0.01), train(19, 0.01), train(20, 0.01)]
    found = observe_all(diag, later)
    assert [(f.check, f.step) for f in found] == [("loss_collapse", 20)]  # no second spike; a new check fires


@pytest.mark.parametrize("check", ["throughput_collapse", "overfitting", "loss_diverging", "loss_flat"])
def test_replay_keeps_the_history_a_check_needs(check):
    """Resumed mid-stream: the finding comes at the same step as in one uninterrupted run."""
    make, step, _ = STREAMS[check]
    limits, records = make()
    cut = next(i for i, r in enumerate(records) if isinstance(r, TrainRecord) and r.step == step - 2)
    diag = Diagnostics(limits)
    diag.replay(records[:cut])
    assert [(f.check, f.step) for f in observe_all(diag, records[cut:])] == [(check, step)]


def test_replay_of_a_run_with_findings_reports_nothing_again():
    for check, (make, _, _) in STREAMS.items():
        limits, records = make()
        diag = Diagnostics(limits)
        diag.replay(records)
        assert observe_all(diag, records[-3:]) == [], check
