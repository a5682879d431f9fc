"""Settings the tool chooses (`auto` learning rate and epochs) and train.time_budget."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from desktune.config import load_config, parse_duration
from desktune.data import Example
from desktune.defaults import TIMING_STEPS, auto_epochs, auto_val_fraction, budget_steps, typical_lora_lr
from desktune.errors import DesktuneError
from desktune.runs import EvalRecord, EventRecord, RunDir, TrainRecord, read_records, records_of
from desktune.training import budget
from desktune.training.budget import Refits, fit_steps, mean_step_tokens, within_warmup
from desktune.training.loop import fit, resolve_auto, setup, train
from tests.tiny import crash_at, tiny_config


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("6m", 360), ("2h", 7200), ("1h30m", 5400),
                                               ("1.5m", 90), ("45", 45), ("10 min", 600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["6 minutes", "abc", "0s", "5d", ""])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_a_bad_budget_names_the_field():
    with pytest.raises(DesktuneError, match=r"train\.time_budget"):
        load_config({"data": {"train": "x"}}, ["train.time_budget=6x"])


def test_auto_epochs_give_small_sets_more_passes():
    assert [auto_epochs(n).value for n in (50, 480, 1200, 50_000)] == [10, 3, 1, 1]


def test_a_time_budget_sets_the_passes_of_auto_epochs():
    assert auto_epochs(480, budgeted=True).value == 10 and auto_epochs(50_000, budgeted=True).value == 10
    for limit, epochs in ((None, 3), ("6m", 10)):
        cfg = load_config({"data": {"train": "x"}, "train": {"time_budget": limit}})
        resolved, reasons = resolve_auto(cfg, 135_000_000, 480, chats=True)
        assert resolved.train.epochs == epochs and any("train.epochs auto" in r for r in reasons)
    explicit = load_config({"data": {"train": "x"}, "train": {"time_budget": "6m", "epochs": 2}})
    assert resolve_auto(explicit, 135_000_000, 480, chats=True)[0].train.epochs == 2


class _Clock:
    """A perf_counter that advances only when a fake step computes: 1 ms a token."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_step_is_timed_per_token_so_short_first_steps_do_not_under_count(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(budget.time, "perf_counter", clock)

    def compute(tr, samples, normaliser, mon):
        clock.now += 1e-3 * sum(len(e.input_ids) for e in samples)

    monkeypatch.setattr(budget, "accumulate_with_recovery", compute)
    tr = type("T", (), {"device": torch.device("cpu"), "optimizer": torch.optim.SGD([torch.zeros(1)], lr=1.0),
                        "objective": type("O", (), {"normaliser": staticmethod(lambda s: 1)})()})()
    ex = [Example(input_ids=[1] * n, labels=[1] * n, source="x") for n in (10, 20, 30, 100)]
    per_token = budget.time_steps(tr, [[ex[0]], [ex[1]], [ex[2]]], None)
    assert per_token == pytest.approx(1e-3)  # a per-step mean would be 25 ms
    assert mean_step_tokens(ex, 4) == pytest.approx(160.0)  # 4 samples of the set's mean 40 tokens


def test_budget_steps_cap_at_the_wish():
    assert budget_steps(60, 10, 1.0, 1000) == 50 and budget_steps(60, 10, 1.0, 20) == 20
    assert budget_steps(60, 70, 1.0, 20) == 1


def test_defaults_are_auto_and_all_linear():
    cfg = load_config({"data": {"train": "x"}})
    assert (cfg.train.lr, cfg.train.epochs, cfg.lora.target_modules) == ("auto", "auto", "all-linear")
    assert (cfg.data.replay, cfg.lora.dropout) == ("auto", 0.0)


def _events(run_dir, name):
    return [e for e in records_of(read_records(RunDir(run_dir).metrics), EventRecord) if e.name == name]


def test_auto_values_are_chosen_said_and_saved(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, train={"lr": "auto", "max_steps": None, "epochs": "auto"})
    result = train(load_config(raw), quiet=True)
    said = [e.message for e in _events(result.run_dir, "auto_setting")]
    assert any(m.startswith("train.lr auto =") for m in said) and any("train.epochs auto = 10" in m for m in said)
    saved = load_config(RunDir(result.run_dir).config)
    base = result.trainable.total - result.trainable.trainable
    expected = float(f"{typical_lora_lr(base):.1e}")
    assert saved.train.lr == expected and saved.train.epochs == 10  # the resolved config, not 'auto'
    assert records_of(read_records(RunDir(result.run_dir).metrics), TrainRecord)[0].lr == pytest.approx(expected)
    assert result.steps == 10 * 19 // 4 + 1  # 19 training samples x 10 epochs / 4 per step, rounded up


def test_explicit_values_win(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path)), quiet=True)  # lr 1e-2, max_steps 4
    assert _events(result.run_dir, "auto_setting") == []
    assert records_of(read_records(RunDir(result.run_dir).metrics), TrainRecord)[0].lr == pytest.approx(1e-2)


def _budget_cfg(tiny_model_dir, tmp_path, name, every=2, warmup=0.1):
    raw = tiny_config(tiny_model_dir, tmp_path, run_name=name, lora={"dropout": 0.1},
                      train={"max_steps": 100_000, "time_budget": "4s", "warmup_ratio": warmup},
                      checkpoint={"every": every})
    return load_config(raw)


def test_time_budget_fixes_the_steps_and_the_schedule_ends(tiny_model_dir, tmp_path):
    result = train(_budget_cfg(tiny_model_dir, tmp_path, "b", every=None), quiet=True)
    (event,) = _events(result.run_dir, "time_budget")
    refits = _events(result.run_dir, "time_budget_refit")  # none when the real steps agreed with the timed ones
    steps = refits[-1].data["steps"] if refits else event.data["steps"]
    assert 2 < steps < 100_000 and result.steps == steps and len(refits) <= 5
    lrs = [r.lr for r in records_of(read_records(RunDir(result.run_dir).metrics), TrainRecord)]
    assert len(lrs) == steps and lrs[-1] < 0.01 * max(lrs)  # the cosine schedule ran to its end
    print(f"budget 4 s: {steps} steps, optimizer steps {result.train_s:.2f} s, training {result.wall_s:.2f} s")
    # fit() from its start to the final adapter: within the budget but for the estimate's error on a loaded
    # machine (a timing, so only a loose bound here; the step arithmetic is checked exactly below)
    assert result.wall_s < 4.0 * 1.5


def test_fit_steps_leaves_room_for_validations():
    assert fit_steps(100, 10, 1.0, 10_000, 0.0, None) == int(90 / 1.05)
    steps = fit_steps(100, 10, 1.0, 10_000, 2.0, 10)  # a 2 s validation every 10 steps and one at the end
    assert 10 + steps * 1.05 + 2.0 * (1 + (steps - 1) // 10) <= 100 < 10 + (steps + 1) * 1.05 + 2.0 * (
        1 + steps // 10)
    assert fit_steps(100, 10, 1.0, 20, 2.0, 10) == 20  # the data's wish caps it


def test_a_refit_counts_from_the_steps_done():
    assert fit_steps(100, 10, 1.0, 10_000, 0.0, None, done=20) == 20 + int(90 / 1.05)
    steps = fit_steps(100, 10, 1.0, 10_000, 2.0, 10, done=25)  # validations at 30, 40, ... and at the end
    vals = 1 + (steps - 1) // 10 - 2
    assert 10 + (steps - 25) * 1.05 + 2.0 * vals <= 100 < 10 + (steps - 24) * 1.05 + 2.0 * (1 + steps // 10 - 2)
    assert fit_steps(100, 10, 1.0, 40, 0.0, None, done=25) == 40  # the data's wish still caps it


def test_refits_come_at_fractions_of_the_way_past_the_warmup_and_never_warm_up_again():
    refits = Refits(0.03)
    assert [refits.next(650, 0), refits.next(1300, 65), refits.next(1300, 390), refits.next(1300, 650)] == [
        65, 390, 650, 910]  # a stretched run: each fraction once, of the count in force
    assert (refits.next(1300, 910), refits.next(1300, 1170)) == (1170, None)
    assert Refits(0.2).next(650, 0) == 131 and Refits(0.03).next(20, 0) == 8 and Refits(0.03).next(8, 0) is None
    assert within_warmup(10_000, 65, 0.03) == 2183 and round(0.03 * 2183) == 65 < round(0.03 * 2184)
    assert within_warmup(700, 65, 0.03) == 700 and within_warmup(700, 65, 0.0) == 700


def test_a_refit_stretches_a_run_whose_timing_over_estimated(tiny_model_dir, tmp_path, monkeypatch):
    import desktune.training.loop as loop

    timed = loop.time_steps
    monkeypatch.setattr(loop, "time_steps", lambda *a: 3 * timed(*a))  # the timed steps ran 3x slower
    result = train(_budget_cfg(tiny_model_dir, tmp_path, "slow", every=None, warmup=0.03), quiet=True)
    first = _events(result.run_dir, "time_budget")[0].data["steps"]
    refit, *later = _events(result.run_dir, "time_budget_refit")
    assert refit.data["at"] == max(2 * TIMING_STEPS, round(0.1 * first)) and refit.data["steps"] > 1.5 * first
    assert result.steps == (later or [refit])[-1].data["steps"] and len(later) <= 4
    lrs = [r.lr for r in records_of(read_records(RunDir(result.run_dir).metrics), TrainRecord)]
    at = refit.data["at"]
    assert len(lrs) == result.steps and lrs[-1] < 0.01 * max(lrs)  # the rebuilt schedule ran to its end
    if at == round(0.1 * first):  # early in the first schedule: both still at the peak
        assert lrs[at - 1] == pytest.approx(max(lrs), rel=0.02) and lrs[at] == pytest.approx(max(lrs), rel=0.02)
    else:  # a loaded machine timed few steps, so the first refit comes later: the stretched schedule lifts the lr
        assert lrs[at] > lrs[at - 1]
    print(f"budget 4 s: timed {first} steps, re-fitted to {result.steps}; training {result.wall_s:.2f} s")
    assert result.wall_s < 4.0 * 1.5


def test_a_run_resumed_after_its_refit_ends_as_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    import desktune.training.loop as loop

    monkeypatch.setattr(loop, "fit_steps", lambda *a, done=0: 20 if done else 12)  # the clock made exact
    whole = train(_budget_cfg(tiny_model_dir, tmp_path, "whole", warmup=0.03), quiet=True)
    cfg = _budget_cfg(tiny_model_dir, tmp_path, "cut", warmup=0.03)
    run = setup(cfg, quiet=True)
    crash_at(monkeypatch, 15)  # after the refit at step 8; the checkpoint of step 14 holds the count 20
    with pytest.raises(RuntimeError, match="power cut"):
        fit(run)
    monkeypatch.undo()
    resumed = train(cfg, quiet=True, resume=True)
    assert whole.steps == resumed.steps == 20 and len(_events(run.run_dir, "time_budget_refit")) == 1
    lrs = [[r.lr for r in records_of(read_records(RunDir(r.run_dir).metrics), TrainRecord)] for r in (whole, resumed)]
    assert lrs[0] == lrs[1]
    a = load_file(str(RunDir(whole.run_dir).adapter / "adapter_model.safetensors"))
    b = load_file(str(RunDir(resumed.run_dir).adapter / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budgeted_run_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _budget_cfg(tiny_model_dir, tmp_path, "crash")
    run = setup(cfg, quiet=True)

    crash_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="power cut"):
        fit(run)
    monkeypatch.undo()
    steps = _events(run.run_dir, "time_budget")[0].data["steps"]
    resumed = train(cfg, quiet=True, resume=True)
    assert resumed.steps == steps and len(_events(run.run_dir, "time_budget")) == 1  # not timed again
    # the timed steps changed nothing: the same run without a budget, at that length, gives the same adapter
    plain = train(load_config(tiny_config(tiny_model_dir, tmp_path, run_name="plain", lora={"dropout": 0.1},
                                          train={"max_steps": steps, "warmup_ratio": 0.1})), quiet=True)
    a = load_file(str(RunDir(resumed.run_dir).adapter / "adapter_model.safetensors"))
    b = load_file(str(RunDir(plain.run_dir).adapter / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- data.val_fraction: auto


@pytest.mark.parametrize(("n", "held"), [(39, 0), (40, 8), (160, 8), (161, 8), (200, 10), (1999, 100),
                                         (20_000, 100)])
def test_auto_val_fraction_holds_out_5_percent_from_8_to_100(n, held):
    from desktune.data import split_samples

    choice = auto_val_fraction(n)
    assert round(n * choice.value) == held and choice.reason.startswith("data.val_fraction auto = ")
    assert len(split_samples(list(range(n)), choice.value, seed=0)[1]) == held  # the count the data split makes
    assert (f"{held} of {n} samples held out" in choice.reason) if held else ("too few" in choice.reason)


def test_a_minimal_config_gets_a_validation_split_said_saved_and_resumed(tiny_model_dir, tmp_path, monkeypatch):
    raw = tiny_config(tiny_model_dir, tmp_path, run_name="split", checkpoint={"every": 2})
    del raw["data"]["val_fraction"]  # what a minimal config says: nothing about validation
    chats = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ahoy " * (1 + i % 24)}]
             for i in range(48)]  # replies of many lengths: another held-out set has another token count
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    cfg = load_config(raw)
    run = setup(cfg, quiet=True)
    assert (len(run.train_set), len(run.val_set)) == (40, 8)
    assert any(n.startswith("data.val_fraction auto = 0.167: 8 of 48 samples") for n in run.data_stats.notes)
    assert load_config(RunDir(run.run_dir).config).data.val_fraction == 8 / 48  # the resolved config records it
    crash_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="power cut"):
        fit(run)
    monkeypatch.undo()
    resumed = train(cfg, quiet=True, resume=True)  # refused if the config or data fingerprint differed
    evals = records_of(read_records(RunDir(resumed.run_dir).metrics), EvalRecord)
    assert resumed.steps == 4 and len(evals) >= 2 and len({e.val_tokens for e in evals}) == 1  # one held-out set
