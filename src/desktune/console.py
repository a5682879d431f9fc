"""The one place desktune makes a rich Console: in a terminal, rich's own; into a pipe or a file, full lines."""

from __future__ import annotations

from typing import IO

from rich.console import Console

PIPE_WIDTH = 160  # columns tables may take without a terminal: the widest (`plan --list`, 136) is never cut


def make_console(*, stderr: bool = False, file: IO[str] | None = None, soft_wrap: bool = False) -> Console:
    """A Console for stdout (or stderr, or `file`). Without a terminal (a pipe, a file, a log), text is never
    wrapped (one message, one line: grep finds it whole) and tables are laid out at least PIPE_WIDTH wide, so
    names are not cut to "llama-…" however narrow the terminal the pipe started from. The choice is made once,
    for the stream as it is now."""
    console = Console(stderr=stderr, file=file, soft_wrap=soft_wrap)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, file=file, soft_wrap=True, width=max(console.width, PIPE_WIDTH))
