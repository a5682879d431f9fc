"""A run that diverged or learned nothing is not a success: it stops early, keeps its best adapter as the result,
says so last, and `desktune train` exits with code 3 (README)."""

from __future__ import annotations

import pytest
import yaml

from desktune.config import load_config
from desktune.runs import EventRecord, RunDir, TrainRecord, read_records, records_of
from desktune.runs.diagnostics import Diagnostics, Limits, judge_outcome
from desktune.scoring import score
from desktune.training.loop import train
from tests.test_cli import run_main
from tests.test_diagnostics import observe_all
from tests.test_diagnostics import train as record
from tests.tiny import tiny_config


def test_a_model_wrecked_in_one_step_is_diverging():
    """lr 1e9 on the embedded model: 3.6 before the first update, the uniform guess (10.8) after; the lowest
    smoothed loss is 10.8 itself, so only the first step's loss shows the climb."""
    losses = [3.6] + [10.8] * 6
    found = observe_all(Diagnostics(Limits(total_steps=60)), [record(s, x) for s, x in enumerate(losses, 1)])
    assert [f.check for f in found] == ["loss_diverging"] and found[0].step == 6


def test_a_noisy_start_is_not_diverging():
    losses = [2.0, 3.5, 3.4, 3.6, 3.3, 3.2, 3.1, 3.0]  # an easy first batch, then the usual ones
    assert observe_all(Diagnostics(Limits(total_steps=60)), [record(s, x) for s, x in enumerate(losses, 1)]) == []


def test_the_outcome_of_a_run():
    down = [3.0 - 0.05 * i for i in range(20)]
    assert judge_outcome(frozenset({"loss_diverging"}), 30, [(0, 3.0), (30, 2.0)], down).check == "loss_diverging"
    assert judge_outcome(frozenset(), 30, [(0, 3.0), (30, 2.0)], down).learned
    flat_val = judge_outcome(frozenset(), 30, [(0, 3.0), (10, 2.99), (30, 3.1)], down)
    assert flat_val.check == "no_learning" and "3.0000 at step 0, best 2.9900" in flat_val.reason
    assert judge_outcome(frozenset(), 30, [], [3.0] * 20).check == "no_learning"  # no validation: the train loss
    assert judge_outcome(frozenset(), 30, [], down).learned
    assert judge_outcome(frozenset(), 4, [(0, 3.0), (4, 3.2)], [3.0] * 4).learned  # a smoke test is not judged


def _climbing(monkeypatch, from_step: int = 1) -> None:
    """Training losses that climb step after step (validation unchanged): a diverging run."""
    real, calls = score.target_ce_sum, {"n": 0}

    def climbing(model, *args, **kwargs):
        total, n = real(model, *args, **kwargs)
        if model.training:
            calls["n"] += 1
            total = total * (1.0 + 0.5 * max(0, calls["n"] // 2 - from_step))  # 2 micro-batches a step
        return total, n

    monkeypatch.setattr(score, "target_ce_sum", climbing)


def test_a_diverging_run_stops_early_and_says_so(tiny_model_dir, tmp_path, monkeypatch):
    _climbing(monkeypatch)
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, run_name="div", train={"max_steps": 40}))
    result = train(cfg, quiet=True)
    assert not result.outcome.learned and result.outcome.check == "loss_diverging"
    assert 6 <= result.steps < 15  # stopped soon after the diagnosis, not at step 40
    records = read_records(RunDir(result.run_dir).metrics)
    names = [r.name for r in records_of(records, EventRecord)]
    assert "stopped_diverging" in [r.data.get("check") for r in records_of(records, EventRecord)]
    assert names[-1] == "run_failed" and len(records_of(records, TrainRecord)) == result.steps


def test_a_failed_run_keeps_its_best_adapter_as_the_result(tiny_model_dir, tmp_path, monkeypatch):
    real, seen = score.mean_target_loss, {"n": 0}

    def val_worse_after_step_4(*args, **kwargs):  # validations at steps 0, 2, 4, ...: best at 4, then worse
        loss, n = real(*args, **kwargs)
        seen["n"] += 1
        return loss - 0.1 * min(seen["n"], 3) + 0.5 * max(0, seen["n"] - 3), n

    import desktune.training.loop as loop

    monkeypatch.setattr(loop, "mean_target_loss", val_worse_after_step_4)
    _climbing(monkeypatch, from_step=6)
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, run_name="best", train={"max_steps": 40, "eval_every": 2}))
    result = train(cfg, quiet=True)
    run = RunDir(result.run_dir)
    assert result.outcome.check == "loss_diverging" and result.adapter_dir == run.adapter and not run.best.exists()
    (promoted,) = [r for r in records_of(read_records(run.metrics), EventRecord) if r.name == "best_promoted"]
    assert promoted.step == 4 and yaml.safe_load((run.adapter / "desktune.json").read_text())["step"] == 4


def test_the_cli_exits_3_when_the_run_taught_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _climbing(monkeypatch)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path, run_name="cli", train={"max_steps": 40})))
    code, _, err = run_main(monkeypatch, capsys, "train", str(path))
    last = err.strip().splitlines()[-1]
    assert code == 3 and last.startswith("the run did not teach the model: the training loss diverged"), err


@pytest.mark.parametrize("steps", [40])
def test_a_healthy_run_exits_0(tiny_model_dir, tmp_path, monkeypatch, capsys, steps):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path, run_name="ok", train={"max_steps": steps})))
    code, _, err = run_main(monkeypatch, capsys, "train", str(path))
    assert code == 0, err
