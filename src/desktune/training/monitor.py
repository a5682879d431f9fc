"""Live progress (rich) and the run's record: one JSON line per step, evaluation and event in metrics.jsonl."""

from __future__ import annotations

import json
import math
import time
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

from desktune.hardware import human_bytes


class Monitor:
    """Writes metrics.jsonl and drives a progress bar showing loss, lr, tokens/s and memory."""

    def __init__(self, run_dir: Path, total_steps: int, console: Console | None = None, *, quiet: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.console = console or Console(stderr=True)
        self.total_steps = total_steps
        self.start = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        self._progress: Progress | None = None
        self._task: Any = None
        self.quiet = quiet
        self._file = self.path.open("a", encoding="utf-8")

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
        self._file.close()

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record to metrics.jsonl (flushed at once, so a crash loses nothing written)."""
        rec = {"type": kind, "time_s": round(time.perf_counter() - self.start, 3), **fields}
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self.history.append(rec)
        return rec

    def step(self, **fields: Any) -> None:
        """A finished optimizer step."""
        rec = self.record("train", **fields)
        if self._progress is not None:
            info = (f"loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {rec['tokens_per_s']:.0f} tok/s  "
                    f"mem {human_bytes(rec['mem_bytes'])}")
            val = self.last("eval")
            if val:
                info += f"  val {val['val_loss']:.4f}"
            self._progress.update(self._task, completed=rec["step"], info=info)

    def eval(self, step: int, val_loss: float, val_tokens: int) -> None:
        """A validation pass."""
        self.record("eval", step=step, val_loss=val_loss, val_tokens=val_tokens)
        self.print(f"step {step}: validation loss {val_loss:.4f} ({val_tokens} target tokens)")

    def event(self, message: str, **fields: Any) -> None:
        """Something the user should know (truncation, checkpoint, recovery)."""
        self.record("event", message=message, **fields)
        self.print(message)

    def print(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((r for r in reversed(self.history) if r["type"] == kind), None)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
