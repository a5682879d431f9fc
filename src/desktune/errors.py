"""The one error type a user can cause; the CLI prints its message and exits with code 2."""

from __future__ import annotations


class DesktuneError(Exception):
    """A problem with the user's input (config, data, files, hardware fit), with what to do about it."""

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.where = where
        self.fix = fix
        parts = [f"{where}: {message}" if where else message]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__("\n".join(parts))
