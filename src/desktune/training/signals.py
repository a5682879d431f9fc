"""Ctrl-C / SIGTERM: finish the current step, save, and stop; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any


class TrainingInterrupted(Exception):
    """Raised after a requested stop has saved its checkpoint."""

    def __init__(self, step: int, checkpoint: str) -> None:
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"stopped after step {step}; checkpoint: {checkpoint}")


class GracefulStop:
    """Context manager: the first SIGINT/SIGTERM sets `requested`; the next SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = self.requested or signal.Signals(signum).name
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
