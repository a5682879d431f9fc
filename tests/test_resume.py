from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from desktune.config import load_config
from desktune.errors import DesktuneError
from desktune.runs import EventRecord, RunDir, TrainRecord, is_complete_checkpoint, read_records, records_of
from desktune.scoring import score as objectives  # where the loss of a batch is taken
from desktune.training import checkpoint as ckpt_mod
from desktune.training.loop import fit, setup, train
from desktune.training.signals import TrainingInterrupted
from tests.tiny import crash_at, inject_fault, tiny_config

STEPS = 6


def _cfg(tiny_model_dir, tmp_path, name: str, **extra):
    raw = tiny_config(tiny_model_dir, tmp_path, run_name=name, lora={"dropout": 0.1},  # dropout draws RNG
                      train={"max_steps": STEPS, "eval_every": 2}, checkpoint={"every": 2, "keep_last": 2}, **extra)
    return load_config(raw)


def _trace(run_dir):
    recs = read_records(run_dir / "metrics.jsonl")
    return [(r.kind, r.step, getattr(r, "loss", None), getattr(r, "lr", None), getattr(r, "grad_norm", None),
             getattr(r, "val_loss", None)) for r in recs if r.kind in ("train", "eval")]


def _weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture()
def interactive_sigint():
    """Ctrl-C as in a terminal: background jobs (and some CI runners) start with SIGINT ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture()
def reference(tiny_model_dir, tmp_path):
    return train(_cfg(tiny_model_dir, tmp_path, "ref"), quiet=True)


def _assert_identical(result, reference):
    a, b = _weights(result.run_dir), _weights(reference.run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs"
    assert _trace(result.run_dir) == _trace(reference.run_dir)


def test_crash_then_resume_is_bit_identical(tiny_model_dir, tmp_path, reference, monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path, "crash")
    run = setup(cfg, quiet=True)

    crash_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="power cut"):
        fit(run)
    monkeypatch.undo()
    assert not (run.run_dir / "adapter").exists()
    resumed = train(cfg, quiet=True, resume=True)  # latest checkpoint of run_name 'crash': step 4
    assert resumed.run_dir == run.run_dir
    events = records_of(read_records(run.run_dir / "metrics.jsonl"), EventRecord)
    assert any(e.name == "resumed" and e.step == 4 for e in events)
    _assert_identical(resumed, reference)


def test_sigint_finishes_the_step_saves_and_resumes(tiny_model_dir, tmp_path, reference, interactive_sigint,
                                                    monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path, "sig")
    run = setup(cfg, quiet=True)

    sent = []

    def ctrl_c(step: int, micro: int) -> None:
        if step == 3 and not sent:  # once: a second Ctrl-C would stop at once (KeyboardInterrupt)
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)

    inject_fault(monkeypatch, ctrl_c)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(run)
    assert stop.value.step == 3 and stop.value.checkpoint.endswith("step-000003")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = train(cfg, quiet=True, resume=stop.value.checkpoint)
    _assert_identical(resumed, reference)


def test_a_stop_token_from_another_thread_stops_like_ctrl_c(tiny_model_dir, tmp_path, reference, monkeypatch):
    from desktune.training.signals import StopToken

    cfg = _cfg(tiny_model_dir, tmp_path, "token")
    run, token, asked = setup(cfg, quiet=True), StopToken(), []

    def caller_asks(step: int, micro: int) -> None:  # during step 3, a caller's thread asks the run to stop
        if step == 3 and not asked:
            asked.append(threading.Thread(target=token.request, args=("stopped by the caller",)))
            asked[0].start()
            asked[0].join(10)

    inject_fault(monkeypatch, caller_asks)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(run, stop=token)
    monkeypatch.undo()
    assert stop.value.step == 3 and stop.value.checkpoint.endswith("step-000003")
    events = records_of(read_records(run.run_dir / "metrics.jsonl"), EventRecord)
    assert any(e.name == "stopped" and e.message == "stopped by the caller: stopped after step 3" for e in events)
    _assert_identical(train(cfg, quiet=True, resume=stop.value.checkpoint), reference)


def test_a_stop_file_from_another_process_stops_like_ctrl_c(tiny_model_dir, tmp_path, reference, monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path, "file")
    run, asked = setup(cfg, quiet=True), []

    def other_process_asks(step: int, micro: int) -> None:  # during step 3: `desktune stop RUN` in its own process
        if step == 3 and not asked:
            asked.append(subprocess.run([sys.executable, "-m", "desktune", "stop", str(run.run_dir)],
                                        capture_output=True, text=True, timeout=120))

    inject_fault(monkeypatch, other_process_asks)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(run)
    monkeypatch.undo()
    assert asked[0].returncode == 0, asked[0].stderr
    assert stop.value.step == 3 and not RunDir(run.run_dir).stop_request.exists()  # consumed: a resume goes on
    events = records_of(read_records(run.run_dir / "metrics.jsonl"), EventRecord)
    assert any(e.name == "stopped" and e.message == "STOP file in the run folder: stopped after step 3"
               for e in events)
    RunDir(run.run_dir).stop_request.write_text("left over")  # one left from before is removed when a run starts
    _assert_identical(train(cfg, quiet=True, resume=stop.value.checkpoint), reference)


def test_listeners_get_every_record_and_a_failing_one_is_dropped(tiny_model_dir, tmp_path, caplog):
    seen, calls = [], []

    def broken(record) -> None:
        calls.append(record)
        raise ValueError("a bug in the caller's callback")

    with caplog.at_level(logging.WARNING, logger="desktune.training.monitor"):
        result = train(_cfg(tiny_model_dir, tmp_path, "listen"), quiet=True, listeners=[seen.append, broken])
    written = read_records(result.run_dir / "metrics.jsonl")
    assert [type(r).__name__ for r in seen] == [type(r).__name__ for r in written]  # every record, in order
    assert [r.step for r in records_of(seen, TrainRecord)] == list(range(1, STEPS + 1))
    assert len(calls) == 1 and "gets no more records" in caplog.text  # dropped; the run went on to the end


def test_an_ignored_sigint_stays_ignored(tiny_model_dir, tmp_path):
    from desktune.training.signals import GracefulStop

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with GracefulStop() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_changed_data_or_config_is_refused_unless_accepted(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path, "changed", data={"val_fraction": 0.0})
    run = setup(cfg, quiet=True)
    inject_fault(monkeypatch, lambda step, micro: (_ for _ in ()).throw(RuntimeError("stop")) if step == 3 else None)
    with pytest.raises(RuntimeError):
        fit(run)
    monkeypatch.undo()
    with open(cfg.data.train, "a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "row"}]}\n')
    with pytest.raises(DesktuneError, match=r"data file .*train.jsonl changed"):
        train(cfg, quiet=True, resume=True)
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 5e-3})})
    with pytest.raises(DesktuneError, match=r"train.lr: 0.01 -> 0.005"):
        train(other, quiet=True, resume=True, accept_changes=False)
    result = train(cfg, quiet=True, resume=True, accept_changes=True)
    assert result.steps == STEPS and (result.run_dir / "adapter").is_dir()


def test_failed_checkpoint_write_keeps_the_previous_one(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path, "disk")
    run = RunDir(tmp_path / "runs" / "disk")
    real_write = Path.write_text

    def full_disk(path, *a, **k):  # the disk fills while step 4's checkpoint is written (into its temporary folder)
        if "step-000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(DesktuneError) as e:
        train(cfg, quiet=True)
    assert str(e.value).startswith(f"{run.checkpoint(4)}: cannot write the checkpoint (No space left on device)")
    assert "free space on that disk" in str(e.value) and f"the last checkpoint, {run.checkpoint(2)}, is intact" \
        in str(e.value)
    assert isinstance(e.value.__cause__, OSError)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000002"]  # no half-written step-4, no temp
    assert run.latest_checkpoint().name == "step-000002" and is_complete_checkpoint(run.checkpoint(2))
    monkeypatch.undo()
    assert train(cfg, quiet=True, resume=True).steps == STEPS  # room again: it continues from step 2


def test_non_finite_steps_are_skipped_then_diagnosed(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path, "nan")
    real = objectives.target_ce_sum
    calls = {"n": 0}

    def nan_after_step_2(model, *args, **kwargs):
        total, n = real(model, *args, **kwargs)
        if not torch.is_grad_enabled():  # validation passes stay finite
            return total, n
        calls["n"] += 1
        return (total * float("nan"), n) if calls["n"] > 2 * 2 else (total, n)  # 2 micro-batches per step

    monkeypatch.setattr(objectives, "target_ce_sum", nan_after_step_2)
    before = None
    with pytest.raises(DesktuneError) as e:
        run = setup(cfg, quiet=True)
        before = run.run_dir
        fit(run)
    msg = str(e.value)
    assert "3 steps in a row had non-finite losses" in msg and "train.jsonl:" in msg
    assert "learning rate 7.5e-03 is high" in msg and "step-000002" in msg
    events = [r for r in records_of(read_records(before / "metrics.jsonl"), EventRecord) if r.name == "nonfinite"]
    assert [ev.step for ev in events] == [3, 4, 5]
    assert RunDir(before).latest_checkpoint().name == "step-000002"


def test_second_ctrl_c_stops_at_once_without_a_partial_checkpoint(tiny_model_dir, tmp_path, interactive_sigint,
                                                                  monkeypatch):
    cfg = _cfg(tiny_model_dir, tmp_path, "twice")
    run = setup(cfg, quiet=True)

    def ctrl_c_twice(step: int, micro: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # first: finish the step; second (next micro-batch): stop now

    inject_fault(monkeypatch, ctrl_c_twice)
    with pytest.raises(KeyboardInterrupt):
        fit(run)
    names = sorted(p.name for p in (run.run_dir / "checkpoints").iterdir())
    assert names == ["step-000002"] and is_complete_checkpoint(run.run_dir / "checkpoints" / "step-000002")
    assert not (run.run_dir / "adapter").exists()


def test_fp16_loss_scaler_state_is_checkpointed(tiny_model_dir, tmp_path):
    state = ckpt_mod.load_state(train(_cfg(tiny_model_dir, tmp_path, "sc"), quiet=True).run_dir
                                / "checkpoints" / "step-000004")
    assert {"optimizer", "scheduler", "scaler", "rng", "step", "micro_batch_size", "config_fingerprint",
            "data_fingerprint"} <= state.to_dict().keys()
    assert state.step == 4 and set(state.rng) >= {"python", "numpy", "torch"}


def test_resume_accepts_a_different_micro_batch_split(tiny_model_dir, tmp_path, reference, monkeypatch):
    """micro x accumulation is what the fingerprint keeps: 1 x 4 resumes a 2 x 2 run exactly (same samples)."""
    cfg = _cfg(tiny_model_dir, tmp_path, "split")
    run = setup(cfg, quiet=True)
    inject_fault(monkeypatch, lambda step, micro: (_ for _ in ()).throw(RuntimeError("stop")) if step == 5 else None)
    with pytest.raises(RuntimeError):
        fit(run)
    monkeypatch.undo()
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": 1, "grad_accum": 4})})
    resumed = train(other, quiet=True, resume=True)
    a, b = _weights(resumed.run_dir), _weights(reference.run_dir)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
