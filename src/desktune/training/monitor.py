"""Live progress (rich) over the run's record: every record goes to metrics.jsonl through runs.records, and the
diagnostics (runs/diagnostics.py) read each step and validation record as it is written."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from desktune.runs import (
    CheckpointRecord,
    EvalRecord,
    EventRecord,
    ForgettingRecord,
    Record,
    RecordWriter,
    RunDir,
    SavedRecord,
    TrainRecord,
)
from desktune.runs.diagnostics import DIAGNOSIS, Diagnostics, Finding
from desktune.units import human_bytes


class Monitor:
    """Writes the run's records and drives a progress bar showing loss, lr, tokens/s and memory."""

    def __init__(self, run_dir: RunDir, total_steps: int, console: Console | None = None, *, quiet: bool = False,
                 diagnostics: Diagnostics | None = None, records: bool = True):
        self.path: Path = run_dir.metrics
        self.console = console or Console(stderr=True)
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.quiet = quiet
        self.last_eval: EvalRecord | None = None
        self._progress: Progress | None = None
        self._task: Any = None
        self._writer = RecordWriter(self.path) if records else None  # ranks but 0 of several write nothing
        self.diagnostics = diagnostics

    def __enter__(self) -> Monitor:
        if not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total_steps, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
        if self._writer is not None:
            self._writer.close()

    def retarget(self, total_steps: int) -> None:
        """The run's step count changed (train.time_budget fixed it, or fitted it again from the real steps)."""
        self.total_steps = total_steps
        if self.diagnostics is not None:
            self.diagnostics.limits = replace(self.diagnostics.limits, total_steps=total_steps)
        if self._progress is not None:
            self._progress.update(self._task, total=total_steps)

    def write(self, record: Record) -> Record:
        """Stamp a record with the time since the start and append it (flushed at once)."""
        record.time_s = round(time.perf_counter() - self.start, 3)
        if self._writer is not None:
            self._writer.write(record)
        if self.diagnostics is not None and isinstance(record, TrainRecord | EvalRecord):
            for finding in self.diagnostics.observe(record):
                self.diagnose(finding)
        return record

    def diagnose(self, f: Finding) -> None:
        """A finding: an event record with its numbers, and one sentence on screen."""
        self.event(f.message, name=DIAGNOSIS, step=f.step, check=f.check, **f.data)

    def forgetting(self, rec: ForgettingRecord) -> None:
        """Forgetting measured during training."""
        self.write(rec)
        self.print(f"step {rec.step}: forgetting {rec.loss_increase_pct:+.2f}% reference loss, KL {rec.kl:.4f}")

    def step(self, rec: TrainRecord) -> None:
        """A finished optimizer step."""
        self.write(rec)
        if self._progress is not None:
            info = (f"loss {rec.loss:.4f}  lr {rec.lr:.2e}  {rec.tokens_per_s:.0f} tok/s  "
                    f"mem {human_bytes(rec.mem_bytes)}")
            if self.last_eval is not None and self.last_eval.val_loss is not None:
                info += f"  val {self.last_eval.val_loss:.4f}"
            self._progress.update(self._task, completed=rec.step, info=info)

    def eval(self, step: int, val_loss: float, val_tokens: int) -> None:
        """A validation pass."""
        self.last_eval = EvalRecord(step=step, val_loss=val_loss, val_tokens=val_tokens)
        self.write(self.last_eval)
        self.print(f"step {step}: validation loss {val_loss:.4f} ({val_tokens} target tokens)")

    def checkpoint(self, step: int, path: Path) -> None:
        """A resumable checkpoint was written."""
        self.write(CheckpointRecord(step=step, path=str(path)))

    def saved(self, step: int, path: Path, adapter_bytes: int) -> None:
        """The final adapter was written."""
        self.write(SavedRecord(step=step, path=str(path), adapter_bytes=adapter_bytes))
        self.print(f"adapter saved: [bold]{path}[/] ({human_bytes(adapter_bytes)})")

    def event(self, message: str, *, name: str, step: int | None = None, show: bool = True, **data: Any) -> None:
        """Something the user should know (truncation, recovery, a stop); printed unless `show` is False."""
        self.write(EventRecord(message=message, name=name, step=step, data=data))
        if show:
            self.print(message)

    def print(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)
