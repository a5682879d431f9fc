"""The records of metrics.jsonl, typed: one writer and one reader for everything that reads runs.

One JSON object per line, `type` first, then `time_s` (seconds since the run, or this resumed part of it,
started), then the record's fields. Non-finite numbers are written as null. A line torn by a kill mid-write can
only be the last one, and has no newline: the reader drops it. Any other line that is not a record is damage.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from desktune.errors import DesktuneError
from desktune.runs.atomic import write_text_atomically


@dataclass(kw_only=True)
class Record:
    """What every record has."""

    kind: ClassVar[str] = ""
    time_s: float = 0.0


@dataclass(kw_only=True)
class TrainRecord(Record):
    """A finished optimizer step."""

    kind: ClassVar[str] = "train"
    step: int
    loss: float | None
    lr: float
    grad_norm: float | None
    tokens: int
    target_tokens: int
    tokens_per_s: float
    mem_bytes: int
    step_s: float
    epoch: float
    # memory telemetry (None where the device has no such counter): process RSS now and at its peak; CUDA
    # allocator bytes in use, peak in use since the run started, and reserved; MPS bytes allocated
    rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    cuda_allocated_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    cuda_reserved_bytes: int | None = None
    mps_allocated_bytes: int | None = None


@dataclass(kw_only=True)
class EvalRecord(Record):
    """A validation pass: mean loss per target token."""

    kind: ClassVar[str] = "eval"
    step: int
    val_loss: float | None
    val_tokens: int


@dataclass(kw_only=True)
class ForgettingRecord(Record):
    """Forgetting measured during training: the tuned model on the base's own answers to the reference."""

    kind: ClassVar[str] = "forgetting"
    step: int
    base_loss: float | None
    tuned_loss: float | None
    loss_increase_pct: float | None
    kl: float | None


@dataclass(kw_only=True)
class CheckpointRecord(Record):
    """A resumable checkpoint was written."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(kw_only=True)
class SavedRecord(Record):
    """The final adapter was written."""

    kind: ClassVar[str] = "saved"
    step: int
    path: str
    adapter_bytes: int


@dataclass(kw_only=True)
class EventRecord(Record):
    """Something the user was told (a note, a recovery, a stop); `data` holds the event's own fields."""

    kind: ClassVar[str] = "event"
    message: str
    name: str
    step: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


RECORD_TYPES: dict[str, type[Record]] = {c.kind: c for c in (TrainRecord, EvalRecord, ForgettingRecord,
                                                               CheckpointRecord, SavedRecord, EventRecord)}


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_json(record: Record) -> dict[str, Any]:
    """The JSON object of a record (field order as declared, `type` first)."""
    out: dict[str, Any] = {"type": record.kind, "time_s": record.time_s}
    for f in fields(record):
        if f.name in ("time_s", "data"):
            continue
        value = getattr(record, f.name)
        if f.name == "step" and value is None and isinstance(record, EventRecord):
            continue
        out[f.name] = _finite(value)
    if isinstance(record, EventRecord):
        out.update({k: _finite(v) for k, v in record.data.items()})
    return out


def from_json(obj: dict[str, Any]) -> Record:
    """The typed record of a JSON object (KeyError/TypeError when it is not one)."""
    cls = RECORD_TYPES[obj["type"]]
    names = {f.name for f in fields(cls)}
    known = {k: v for k, v in obj.items() if k in names and k != "data"}
    if cls is EventRecord:
        known.setdefault("name", "note")
        known["data"] = {k: v for k, v in obj.items() if k not in names and k != "type"}
    return cls(**known)


class RecordWriter:
    """Appends records to metrics.jsonl, flushed at once, so a crash loses nothing already written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: Record) -> Record:
        self._file.write(json.dumps(to_json(record)) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        self._file.close()


def read_records(path: Path) -> list[Record]:
    """Every record of a metrics.jsonl file, in order; a torn last line (no newline: a kill mid-write) is dropped."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DesktuneError(f"cannot read the run's record ({e.strerror or e})", where=str(path),
                            fix="make the file readable, or start a new run") from e
    lines = raw.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline, as every complete write does
    records = [r for number, line in enumerate(lines, 1) if (r := _parse(line, path, number)) is not None]
    if torn.strip(b"\x00 \t\r"):  # a power cut can also leave NUL bytes where the end of the file was
        with contextlib.suppress(ValueError, KeyError, TypeError):  # the step it describes is redone on resume
            records.append(from_json(json.loads(torn.decode("utf-8"))))
    return records


def _parse(line: bytes, path: Path, number: int) -> Record | None:
    """The record of one complete line (None for a blank one); a damaged line raises, naming file:line."""
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _damaged(path, number, "not UTF-8 text") from e
    try:
        return from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(path, number, str(e)) from e


def _damaged(path: Path, number: int, why: str) -> DesktuneError:
    return DesktuneError(f"line {number} is not a desktune record ({why})", where=f"{path}:{number}",
                         fix=f"delete or repair line {number} (only that record is lost), or restore the file from "
                         "a backup")


R = TypeVar("R", bound=Record)


def records_of(records: list[Record], cls: type[R]) -> list[R]:
    """The records of one type."""
    return [r for r in records if isinstance(r, cls)]


def truncate_records(path: Path, step: int, *, rewrite: bool = True) -> list[Record]:
    """Keep metrics.jsonl up to the checkpoint record of `step` (later lines belong to steps being redone);
    `rewrite=False` only reads what would be kept (the ranks of a run that do not write)."""
    records = read_records(path)
    cut = next((i for i, r in enumerate(records) if isinstance(r, CheckpointRecord) and r.step == step), None)
    kept = records[: cut + 1] if cut is not None else [r for r in records if (getattr(r, "step", 0) or 0) <= step]
    if rewrite:
        write_text_atomically(path, "".join(json.dumps(to_json(r)) + "\n" for r in kept))
    return kept
