"""Stopping a run cleanly: Ctrl-C / SIGTERM, a caller's StopToken (another thread) or the run folder's STOP file
(another process, `desktune stop RUN`). Each finishes the current step, saves a checkpoint and stops, resumable; a
second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any


class TrainingInterrupted(Exception):
    """Raised after a requested stop has saved its checkpoint."""

    def __init__(self, step: int, checkpoint: str) -> None:
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"stopped after step {step}; checkpoint: {checkpoint}")


@dataclass
class StopToken:
    """A request to stop a run after its current step: `request()` from any thread, or a file (the run folder's
    STOP, watched when `file` is set) that another process creates. Pass one to `desktune.train(stop=...)`."""

    file: Path | None = None
    reason: str | None = None
    _event: threading.Event = field(default_factory=threading.Event, repr=False)

    def request(self, reason: str = "stop requested") -> None:
        """Ask the run to stop after the step it is in (safe from any thread)."""
        self.reason = self.reason or reason
        self._event.set()

    def requested(self) -> str | None:
        """Why the run should stop, or None: a request, else the stop file when it exists."""
        if self._event.is_set():
            return self.reason
        if self.file is not None and self.file.exists():
            return f"{self.file.name} file in the run folder"
        return None


class GracefulStop:
    """Context manager: the first SIGINT/SIGTERM (or the token's request) sets `requested`; the next SIGINT raises
    KeyboardInterrupt."""

    def __init__(self, token: StopToken | None = None) -> None:
        self.signalled: str | None = None
        self.token = token or StopToken()
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> str | None:
        """The signal's name, else the token's reason; None while nobody asked."""
        return self.signalled or self.token.requested()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = self.signalled or signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C leaves at once
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # a rank keeps waiting: torch's launcher follows a
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Ctrl-C with SIGTERM, and the step must be saved

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. a background job: leave it ignoring
                    continue
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
