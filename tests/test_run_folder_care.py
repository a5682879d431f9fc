"""What a run leaves behind when something fails around it: a full disk at the final save keeps the weights and
says only what is true; best/ is never named in a record without one saying it went; a failed setup leaves no
empty output folder; running out of memory while attaching adapters is a message, not a traceback."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

import desktune.training.loop as loop
from desktune.config import load_config
from desktune.errors import DesktuneError
from desktune.runs import EventRecord, RunDir, read_records, records_of
from desktune.training.loop import train
from tests.tiny import tiny_config


def _full(monkeypatch, *names: str) -> None:
    """The disk is full for adapter folders of these names (their temporary folders included)."""
    real = loop.save_adapter

    def save(model, tokenizer, out, **kwargs):
        if out.name in names:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(model, tokenizer, out, **kwargs)

    monkeypatch.setattr(loop, "save_adapter", save)


def test_a_full_disk_at_the_final_save_keeps_the_trained_weights(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    _full(monkeypatch, "adapter")
    with pytest.raises(DesktuneError) as e:
        train(load_config(tiny_config(tiny_model_dir, tmp_path, run_name="full")), quiet=True)
    message, rescued = str(e.value), tmp_path / "tmp" / "desktune-rescue" / "full"
    assert message.startswith(f"{tmp_path / 'runs' / 'full' / 'adapter'}: cannot write the final adapter (No space")
    assert f"the trained adapter was written to {rescued} instead" in message
    assert "--resume" not in message and "checkpoint" not in message  # the run has none: nothing to resume
    assert (rescued / "adapter_model.safetensors").is_file() and (rescued / "adapter_config.json").is_file()


def test_with_nowhere_to_write_it_says_the_run_must_be_trained_again(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    _full(monkeypatch, "adapter", "gone")
    with pytest.raises(DesktuneError) as e:
        train(load_config(tiny_config(tiny_model_dir, tmp_path, run_name="gone")), quiet=True)
    assert "no checkpoint of this run exists, so it must be trained again" in str(e.value)
    assert "--resume" not in str(e.value)


def test_with_a_checkpoint_and_nowhere_else_it_says_resume(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    _full(monkeypatch, "adapter", "ck")
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, run_name="ck", checkpoint={"every": 2}))
    with pytest.raises(DesktuneError) as e:
        train(cfg, quiet=True)
    run = RunDir(tmp_path / "runs" / "ck")
    assert f"--resume {run.path}" in str(e.value) and f"the last checkpoint, {run.checkpoint(2)}, is intact" in str(
        e.value)


def test_a_best_folder_that_went_is_recorded(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, run_name="b", train={"eval_every": 2})),
                   quiet=True)  # the validation loss falls to the end: the final adapter is the best
    run = RunDir(result.run_dir)
    events = records_of(read_records(run.metrics), EventRecord)
    assert [e.name for e in events if e.name.startswith("best")] == ["best_saved", "best_removed"]
    assert not run.best.exists() and events[-1].data["path"] == str(run.adapter) and result.best_step is None


def test_a_failed_setup_leaves_no_empty_output_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "new" / "runs"
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, output_dir=str(out), lora={"target_modules": ["nope"]}))
    with pytest.raises(DesktuneError, match="nope"):
        train(cfg, quiet=True)
    assert not out.exists()


def test_out_of_memory_while_attaching_adapters_is_a_message(tiny_model_dir, tmp_path, monkeypatch):
    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 230400000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(loop, "attach_lora", no_memory)
    with pytest.raises(DesktuneError) as e:
        train(load_config(tiny_config(tiny_model_dir, tmp_path, run_name="oom")), quiet=True)
    assert str(e.value).startswith("lora.r=4: out of memory while attaching the adapters")
    assert "desktune plan" in str(e.value) and not (tmp_path / "runs" / "oom").exists()


def test_a_plan_beyond_the_machine_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from desktune.memory import budget

    monkeypatch.setattr(budget, "machine_bytes", lambda hw: 2**20)  # a machine of 1 MiB: the tiny run needs more
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("loaded a model that cannot fit"))
    with pytest.raises(DesktuneError) as e:
        train(load_config(tiny_config(tiny_model_dir, tmp_path, run_name="huge")), quiet=True)
    assert "but this machine's cpu has 1.0 MiB in all" in str(e.value) and "total" in str(e.value)
    assert not (tmp_path / "runs").exists()
    unchecked = tiny_config(tiny_model_dir, tmp_path, run_name="none", train={"memory_budget": "none"})
    monkeypatch.undo()
    monkeypatch.setattr(budget, "machine_bytes", lambda hw: 2**20)
    assert train(load_config(unchecked), quiet=True).steps == 4  # train.memory_budget: none skips the check
