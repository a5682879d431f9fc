"""What the loop watches on a real (tiny) run: the best adapter, early stopping, forgetting during training (the
verdict over the reference and human-written text), diagnostics before and during training, and memory telemetry
in every step record."""

from __future__ import annotations

import json

import pytest

from desktune.config import load_config
from desktune.runs import EventRecord, ForgettingRecord, RunDir, TrainRecord, read_records, records_of
from desktune.runs.layout import META
from desktune.scoring.divergence import Divergence
from desktune.scoring.forgetting import ReferenceSet
from desktune.scoring.human import HumanHeldout
from desktune.scoring.verdict import FORGOT, KEPT
from desktune.training import loop
from desktune.training.loop import train
from desktune.training.watch import ForgettingWatch
from tests.tiny import tiny_config


def _events(run_dir, name):
    return [e for e in records_of(read_records(RunDir(run_dir).metrics), EventRecord) if e.name == name]


def _checks(run_dir):
    return [e.data["check"] for e in _events(run_dir, "diagnosis")]


def _scripted_validation(monkeypatch, losses):
    """Validation returns these losses in turn (the loop's own scorer replaced from outside)."""
    it = iter(losses)
    monkeypatch.setattr(loop, "mean_target_loss", lambda *a, **k: (next(it), 10))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))


def test_best_adapter_is_kept_when_validation_rises_after_it(tiny_model_dir, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [3.0, 2.0, 1.5, 1.7, 1.9])  # steps 0, 2, 4, 6 and the end (8)
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 8, "eval_every": 2}))
    result = train(cfg, quiet=True)
    best = RunDir(result.run_dir).best
    assert result.best_step == 4 and json.loads((best / META).read_text())["step"] == 4
    assert [e.step for e in _events(result.run_dir, "best")] == [4]
    assert "overfitting" in _checks(result.run_dir)  # validation rose twice after its best while training fell


def test_best_folder_is_removed_when_the_end_is_best(tiny_model_dir, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [3.0, 2.0, 1.5, 1.4, 1.3])
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 8, "eval_every": 2}))
    result = train(cfg, quiet=True)
    assert result.best_step is None and not RunDir(result.run_dir).best.exists()
    assert "overfitting" not in _checks(result.run_dir)


def test_early_stopping_after_patience(tiny_model_dir, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [3.0, 2.0, 2.1, 2.2, 2.3, 2.4])
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 20, "eval_every": 2,
                                                                    "early_stopping_patience": 2}))
    result = train(cfg, quiet=True)
    run = RunDir(result.run_dir)
    assert result.steps == 6  # best at step 2, no better at 4 and 6
    assert "early_stopped" in _checks(result.run_dir)
    assert run.latest_checkpoint().name == "step-000006"  # resumable where it stopped
    assert json.loads((run.adapter / META).read_text())["step"] == 6
    assert json.loads((run.best / META).read_text())["step"] == 2


def test_forgetting_measured_during_training(tiny_model_dir, tmp_path):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 6, "forgetting_every": 2,
                                                                    "forgetting_warn_pct": 0.01}))
    result = train(cfg, quiet=True)
    recs = records_of(read_records(RunDir(result.run_dir).metrics), ForgettingRecord)
    assert [r.step for r in recs] == [2, 4]
    assert all(r.kl > 0 for r in recs) and recs[1].kl > recs[0].kl  # the adapter moves further from the base
    assert _checks(result.run_dir).count("forgetting") == 1  # warned once
    warning = next(e for e in _events(result.run_dir, "diagnosis") if e.data["check"] == "forgetting")
    assert "forgetting verdict" in warning.message and warning.data["verdict"] != KEPT
    assert warning.data["human_loss_pct"] is not None  # the human-written text was measured too
    assert result.steps == 6  # a warning only: train.forgetting_stop is off
    assert _events(result.run_dir, "forgetting_reference")[0].data["cached"] is False


def _watch_with(human_pct: float) -> ForgettingWatch:
    """A watch whose latest human-text measurement rose by `human_pct` (base loss 3.0)."""
    watch = ForgettingWatch(ReferenceSet(name="reference", examples=[], cached=True))
    watch.human = HumanHeldout(name="human", conversations=60, divergence=Divergence(
        base_loss=3.0, tuned_loss=3.0 * (1 + human_pct / 100), kl=0.2, target_tokens=2400))
    return watch


def test_the_live_warning_is_the_verdict_and_human_text_cannot_hide(tiny_model_dir, tmp_path):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path))
    looks_better = ForgettingRecord(step=8, base_loss=1.0, tuned_loss=0.929, loss_increase_pct=-7.1, kl=0.1)
    found = _watch_with(26.3).judge(cfg, looks_better)  # issue 33: the base's answers -7.1%, human text +26.3%
    assert found is not None and found.data["verdict"] == FORGOT and found.data["decided_by"] == "human-text loss"
    assert "forgot - human-text loss +26.3%" in found.message and "the base's answers -7.1%" in found.message
    assert _watch_with(3.0).judge(cfg, looks_better) is None  # every measure kept: nothing said
    kl_far = ForgettingRecord(step=8, base_loss=1.0, tuned_loss=1.0, loss_increase_pct=0.0, kl=0.75)
    assert _watch_with(3.0).judge(cfg, kl_far).data["decided_by"] == "KL(base || tuned)"


def test_forgetting_stop(tiny_model_dir, tmp_path):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={
        "max_steps": 6, "forgetting_every": 2, "forgetting_warn_pct": 0.01, "forgetting_stop": True}))
    result = train(cfg, quiet=True)
    assert result.steps == 2 and RunDir(result.run_dir).latest_checkpoint().name == "step-000002"


def test_step_records_carry_memory_telemetry(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path)), quiet=True)
    for r in records_of(read_records(RunDir(result.run_dir).metrics), TrainRecord):
        assert r.rss_bytes > 50 * 2**20 and r.peak_rss_bytes >= r.rss_bytes
        assert r.cuda_allocated_bytes is None and r.mps_allocated_bytes is None  # a CPU run


def test_lr_far_too_high_is_said_before_training(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, train={"lr": 5.0})), quiet=True)
    found = [e for e in _events(result.run_dir, "diagnosis") if e.data["check"] == "lr_out_of_range"]
    assert found and found[0].step == 0 and "train.lr" in found[0].message and "high" in found[0].message


def test_end_of_turn_cut_off_and_many_truncated(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, data={"max_seq_len": 40})), quiet=True)
    checks = _checks(result.run_dir)
    assert "end_of_turn_untrained" in checks and "truncated_many" in checks


def test_a_healthy_tiny_run_is_told_nothing(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 6})), quiet=True)
    assert _checks(result.run_dir) == []


def test_diagnostics_can_be_switched_off(tiny_model_dir, tmp_path):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"lr": 5.0, "diagnostics": False}))
    assert _checks(train(cfg, quiet=True).run_dir) == []
