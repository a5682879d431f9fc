"""The runs layer: layout, typed records (one writer, one reader), atomic folders."""

from __future__ import annotations

import json

import pytest

from desktune.errors import DesktuneError
from desktune.runs import (
    CheckpointRecord,
    EvalRecord,
    EventRecord,
    RecordWriter,
    RunDir,
    TrainRecord,
    find_checkpoint,
    new_run_dir,
    read_records,
    truncate_records,
    write_folder_atomically,
)
from desktune.runs.layout import CHECKPOINT_MARKER, TRAINER_STATE, TRAINER_TENSORS


def _train(step: int, loss: float = 1.0) -> TrainRecord:
    return TrainRecord(step=step, loss=loss, lr=1e-3, grad_norm=0.5, tokens=10, target_tokens=5, tokens_per_s=2.0,
                       mem_bytes=1, step_s=0.1, epoch=0.5)


def _write(path, records) -> None:
    writer = RecordWriter(path)
    for r in records:
        writer.write(r)
    writer.close()


def test_records_round_trip_in_the_written_format(tmp_path):
    path = tmp_path / "m.jsonl"
    records = [EvalRecord(step=0, val_loss=2.0, val_tokens=7), _train(1, float("nan")),
               EventRecord(message="hi", name="oom_recovery", step=1, data={"micro_batch_size": 2}),
               EventRecord(message="fit", name="memory_fit"), CheckpointRecord(step=1, path="x")]
    _write(path, records)
    first = json.loads(path.read_text().splitlines()[2])
    assert list(first) == ["type", "time_s", "message", "name", "step", "micro_batch_size"]
    assert json.loads(path.read_text().splitlines()[1])["loss"] is None  # non-finite -> null
    back = read_records(path)
    assert [type(r) for r in back] == [type(r) for r in records]
    assert back[2] == records[2] and back[3].step is None and back[1].loss is None


def test_a_torn_last_line_is_dropped_a_damaged_one_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    _write(path, [_train(1), _train(2)])
    text = path.read_text()
    path.write_text(text + '{"type": "train", "ste')
    assert [r.step for r in read_records(path)] == [1, 2]
    path.write_text('{"type": "train", "ste\n' + text)
    with pytest.raises(DesktuneError, match=r"m.jsonl:1"):
        read_records(path)


def test_truncate_keeps_the_record_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    _write(path, [_train(1), _train(2), CheckpointRecord(step=2, path="c"), EvalRecord(step=2, val_loss=1.0,
               val_tokens=3), _train(3)])
    kept = truncate_records(path, 2)
    assert [type(r).__name__ for r in kept] == ["TrainRecord", "TrainRecord", "CheckpointRecord"]
    assert read_records(path) == kept


def _checkpoint(run: RunDir, step: int, complete: bool = True):
    folder = run.checkpoint(step)
    folder.mkdir(parents=True)
    names = ["adapter_config.json", "adapter_model.safetensors", CHECKPOINT_MARKER] + (
        [TRAINER_STATE, TRAINER_TENSORS] if complete else [])
    for name in names:
        (folder / name).write_text("x")
    return folder


def test_layout_finds_prunes_and_resolves_checkpoints(tmp_path):
    run = new_run_dir(tmp_path, "r")
    for step in (2, 4, 6):
        _checkpoint(run, step)
    _checkpoint(run, 8, complete=False)
    (run.checkpoints / ".step-000010-tmp").mkdir()
    (run.checkpoints / "step-notes").mkdir()  # not ours: never counted or pruned
    assert run.latest_checkpoint() == run.checkpoint(6)
    assert RunDir.of_checkpoint(run.checkpoint(6)) == run
    assert find_checkpoint(tmp_path, "r", True) == run.checkpoint(6)
    assert find_checkpoint(tmp_path, None, run.path) == run.checkpoint(6)
    run.prune_checkpoints(2)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [".step-000010-tmp", "step-000006", "step-000008",
                                                                 "step-notes"]
    with pytest.raises(DesktuneError, match="already holds a run"):
        new_run_dir(tmp_path, "r")


def test_a_failed_atomic_write_leaves_the_old_folder(tmp_path):
    out = tmp_path / "folder"
    write_folder_atomically(out, lambda tmp: (tmp / "a").write_text("old"))

    def fail(tmp):
        (tmp / "a").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_folder_atomically(out, fail)
    assert (out / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["folder"]
