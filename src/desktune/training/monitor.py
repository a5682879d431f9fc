"""Live progress (rich) over the run's record: every record goes to metrics.jsonl through runs.records, and the
diagnostics (runs/diagnostics.py) read each step and validation record as it is written."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from desktune.console import make_console
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

log = logging.getLogger(__name__)

Listener = Callable[[Record], None]  # called with every record as it is written (a caller's own view of the run)


class Monitor:
    """Writes the run's records and shows progress (loss, lr, tokens/s, memory, the last validation): a live bar
    in a terminal; into a pipe or a log, whole plain lines (about 20 a run) that a live bar cannot give there."""

    def __init__(self, run_dir: RunDir, total_steps: int, console: Console | None = None, *, quiet: bool = False,
                 diagnostics: Diagnostics | None = None, records: bool = True, listeners: Sequence[Listener] = ()):
        self.path: Path = run_dir.metrics
        self.console = console or make_console(stderr=True)
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.quiet = quiet
        self.last_eval: EvalRecord | None = None
        self._last_step: TrainRecord | None = None
        self._lines: tuple[int, float] | None = None  # plain lines: (step, time) of the first step shown
        self._progress: Progress | None = None
        self._task: Any = None
        self._writer = RecordWriter(self.path) if records else None  # ranks but 0 of several write nothing
        self.diagnostics = diagnostics
        self.listeners = list(listeners)

    def __enter__(self) -> Monitor:
        if not self.quiet and self.console.is_terminal:
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
        self._tell(record)
        if self.diagnostics is not None and isinstance(record, TrainRecord | EvalRecord):
            for finding in self.diagnostics.observe(record):
                self.diagnose(finding)
        return record

    def _tell(self, record: Record) -> None:
        """Each listener gets the record; one that raises is dropped with a warning (the run goes on)."""
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception as e:
                self.listeners.remove(listener)
                log.warning("a record listener raised %s: %s; it gets no more records", type(e).__name__, e)
                self.print(f"[yellow]a record listener raised {type(e).__name__}: {escape(str(e))}; it gets no more "
                           "records[/]")

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
        self._last_step = rec
        if self._progress is not None:
            self._progress.update(self._task, completed=rec.step, info=self._info(rec))
        elif not self.quiet:
            self._plain_line(rec)

    def _info(self, rec: TrainRecord) -> str:
        """The numbers of a step, and the latest validation loss (which may come after the step)."""
        info = f"loss {rec.loss:.4f}  lr {rec.lr:.2e}  {rec.tokens_per_s:.0f} tok/s  mem {human_bytes(rec.mem_bytes)}"
        if self.last_eval is not None and self.last_eval.val_loss is not None:
            info += f"  val {self.last_eval.val_loss:.4f}"
        return info

    def _plain_line(self, rec: TrainRecord) -> None:
        """Without a terminal: the first step, every twentieth of the run and the last, one whole line each."""
        now = time.perf_counter()
        if self._lines is None:
            self._lines = (rec.step, now)
        every = max(1, self.total_steps // 20)
        if rec.step not in (self._lines[0], self.total_steps) and rec.step % every:
            return
        first, t0 = self._lines
        eta = (now - t0) / (rec.step - first) * (self.total_steps - rec.step) if rec.step > first else None
        when = f"{now - self.start:.0f} s" + (f", eta {eta:.0f} s" if eta is not None else "")
        self.console.print(f"train {rec.step}/{self.total_steps}  {self._info(rec)}  ({when})", markup=False,
                           highlight=False)

    def eval(self, step: int, val_loss: float, val_tokens: int) -> None:
        """A validation pass (the bar shows it at once: the last one comes after the last step)."""
        self.last_eval = EvalRecord(step=step, val_loss=val_loss, val_tokens=val_tokens)
        self.write(self.last_eval)
        if self._progress is not None and self._last_step is not None:
            self._progress.update(self._task, info=self._info(self._last_step))
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
