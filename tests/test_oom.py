"""Out of memory outside the micro-batch loop: validation recovers (it holds no gradients), the optimizer update
stops the run with one message (exit 2) and the last checkpoint intact."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from desktune.config import load_config
from desktune.runs import EvalRecord, EventRecord, RunDir, SavedRecord, is_complete_checkpoint, read_records, records_of
from desktune.training import loop
from desktune.training.loop import train
from tests.test_cli import run_main
from tests.tiny import tiny_config

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"


def _raw(tiny_model_dir: Path, tmp_path: Path, name: str) -> dict:
    return tiny_config(tiny_model_dir, tmp_path, run_name=name, train={"eval_every": 2, "max_steps": 4},
                       checkpoint={"every": 2})


def _config_file(tiny_model_dir: Path, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_raw(tiny_model_dir, tmp_path, name)), encoding="utf-8")
    return path


def _oom_validation(monkeypatch, when) -> list[int]:
    """Validation raises out of memory when `when(call, micro_batch_size)`; returns the micro-batch of each call."""
    real, calls = loop.mean_target_loss, []

    def maybe_oom(model, examples, micro, *args, **kwargs):
        calls.append(micro)
        if when(len(calls), micro):
            raise torch.OutOfMemoryError(OOM)
        return real(model, examples, micro, *args, **kwargs)

    monkeypatch.setattr(loop, "mean_target_loss", maybe_oom)
    return calls


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_oom_in_validation_halves_its_micro_batch_and_the_run_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    reference = train(load_config(_raw(tiny_model_dir, tmp_path, "ref")), quiet=True)
    calls = _oom_validation(monkeypatch, lambda call, micro: call == 2 and micro == 2)  # the validation at step 2
    result = train(load_config(_raw(tiny_model_dir, tmp_path, "oom")), quiet=True)
    assert calls == [2, 2, 1, 1]  # step 0, step 2 (out of memory, redone with 1), the end: stays at 1
    events = [e for e in records_of(read_records(RunDir(result.run_dir).metrics), EventRecord)
              if e.name == "val_oom_recovery"]
    assert len(events) == 1 and events[0].step == 2 and events[0].data == {"val_micro_batch_size": 1}
    evals = records_of(read_records(RunDir(result.run_dir).metrics), EvalRecord)
    assert [r.step for r in evals] == [0, 2, 4]
    assert [s for s, _ in result.val_losses] == [s for s, _ in reference.val_losses]
    assert [v for _, v in result.val_losses] == pytest.approx([v for _, v in reference.val_losses], rel=1e-5)
    assert result.train_losses == reference.train_losses  # validation draws no RNG and changes no weight


def test_oom_in_validation_at_micro_batch_1_stops_with_one_message(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _oom_validation(monkeypatch, lambda call, micro: call >= 3)  # from the validation at step 4 (the end) on
    code, out, err = run_main(monkeypatch, capsys, "train", str(_config_file(tiny_model_dir, tmp_path, "val")))
    run = RunDir(tmp_path / "runs" / "val")
    flat = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err, err
    assert "error: data.max_seq_len: out of memory in validation at step 4 even with micro-batch 1" in flat
    assert "Fix: lower data.max_seq_len" in flat and f"the last checkpoint, {run.checkpoint(2)}, is intact" in flat
    assert is_complete_checkpoint(run.checkpoint(2)) and not run.adapter.exists()


def test_oom_in_the_optimizer_update_stops_with_one_message_and_the_checkpoint_intact(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    real, calls = torch.optim.AdamW.step, []
    saved: dict[str, str] = {}

    def step_3_oom(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # step 3: the checkpoint of step 2 is on disk
            saved.update(_files(run.checkpoint(2)))
            raise torch.OutOfMemoryError(OOM)
        return real(self, *args, **kwargs)

    run = RunDir(tmp_path / "runs" / "opt")
    monkeypatch.setattr(torch.optim.AdamW, "step", step_3_oom)
    code, out, err = run_main(monkeypatch, capsys, "train", str(_config_file(tiny_model_dir, tmp_path, "opt")))
    flat = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err, err
    assert "error: train.optimizer: out of memory in the optimizer update of step 3" in flat
    assert "Fix: use train.optimizer: adamw_8bit" in flat
    assert f"the last checkpoint, {run.checkpoint(2)}, is intact" in flat
    assert saved and _files(run.checkpoint(2)) == saved and is_complete_checkpoint(run.checkpoint(2))
    assert not run.adapter.exists() and not records_of(read_records(run.metrics), SavedRecord)
    assert run.latest_checkpoint() == run.checkpoint(2)  # no checkpoint of the half-updated weights
