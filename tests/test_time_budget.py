"""train.time_budget counts the whole run: its clock starts with setup, its timing is robust to a slow step, and a
budget too short to teach is refused before any update (or trained anyway when the user insists)."""

from __future__ import annotations

import pytest
import torch

from desktune.config import parse_duration
from desktune.data import Example
from desktune.errors import DesktuneError
from desktune.runs import EventRecord, RunDir, TrainRecord, read_records, records_of
from desktune.training import budget
from desktune.training.loop import train
from tests.test_defaults import _budget_cfg, _events


def test_a_budget_too_short_to_teach_is_refused_before_any_update(tiny_model_dir, tmp_path, monkeypatch):
    import desktune.training.loop as loop

    timed = loop.time_steps
    monkeypatch.setattr(loop, "time_steps", lambda *a: 50 * timed(*a))  # a slow machine: few steps fit 4 s
    cfg = _budget_cfg(tiny_model_dir, tmp_path, "short", every=None)
    with pytest.raises(DesktuneError) as e:
        train(cfg, quiet=True)
    message = str(e.value)
    assert message.startswith("train.time_budget: train.time_budget 4s fits only") and "too few to teach" in message
    shortest = message.split("set train.time_budget: ")[1].split(" ")[0]
    assert parse_duration(shortest) > 4 and "-o train.short_budget=train" in message
    records = read_records(RunDir(tmp_path / "runs" / "short").metrics)
    assert records_of(records, TrainRecord) == []  # refused before the first update
    assert [r.name for r in records_of(records, EventRecord)][-1] == "budget_too_short"

    insist = _budget_cfg(tiny_model_dir, tmp_path, "insist", every=None)
    insist = insist.model_copy(update={"train": insist.train.model_copy(update={"short_budget": "train"})})
    result = train(insist, quiet=True)
    (event,) = _events(result.run_dir, "budget_too_short")
    assert "training anyway" in event.message and result.steps == _events(result.run_dir, "time_budget")[0].data[
        "steps"] < 10


def test_the_budget_clock_starts_with_the_run(tiny_model_dir, tmp_path, monkeypatch):
    import time

    import desktune.training.loop as loop

    real = loop.build_datasets

    def slow_data(*a, **k):  # setup (loading, data, replay answers) takes 1.5 s of the budget
        time.sleep(1.5)
        return real(*a, **k)

    monkeypatch.setattr(loop, "build_datasets", slow_data)
    result = train(_budget_cfg(tiny_model_dir, tmp_path, "clock", every=None), quiet=True)
    (event,) = _events(result.run_dir, "time_budget")
    assert event.data["spent_s"] >= 1.5  # counted against the 4 s
    assert result.wall_s >= 1.5 and result.wall_s < 4.0 * 1.5


def test_one_slow_timed_step_does_not_set_the_count(monkeypatch):
    from types import SimpleNamespace

    times = iter([5.0, 1.0, 9.0, 1.2])  # warm-up, then one step slowed by another process
    clock = {"t": 0.0}

    def perf_counter():
        return clock["t"]

    def step(*a):
        clock["t"] += next(times)

    monkeypatch.setattr(budget, "accumulate_with_recovery", lambda *a: step())
    monkeypatch.setattr(budget.time, "perf_counter", perf_counter)
    tr = SimpleNamespace(device=torch.device("cpu"), objective=SimpleNamespace(normaliser=lambda s: 1),
                         optimizer=SimpleNamespace(zero_grad=lambda set_to_none: None))
    steps = [[Example(input_ids=[1] * 100, labels=[1] * 100, source="x:1")] for _ in range(4)]
    assert budget.time_steps(tr, steps, None) == pytest.approx(1.2 / 100)  # the median of 1.0, 9.0, 1.2


def test_shortest_budget_reads_as_a_config_value():
    assert [budget.shortest_budget(s) for s in (94.2, 120, 203, 3600)] == ["100s", "2m", "3m30s", "60m"]
    assert all(parse_duration(budget.shortest_budget(s)) >= s for s in (1.0, 94.2, 203, 7201))
