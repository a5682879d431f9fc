"""Write a folder (checkpoints, merged models, conversions) or a file (eval.json, caches) so that its name only ever
holds a complete copy.

The writer fills a temporary sibling folder (its name starts with '.'), every file is fsynced, then the folder
is renamed into place; a crash, a kill or a full disk mid-write leaves the previous folder (or none), never a
half-written one under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

FAULT_SLEEP_ENV = "DESKTUNE_FAULT_CHECKPOINT_SLEEP"  # seconds to wait before the rename (kill tests widen the window)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: so a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fsync_path(f)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(d)
    fsync_path(folder)


def write_folder_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary sibling folder, fsync it, then rename it to `out` (replacing an old one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if os.environ.get(FAULT_SLEEP_ENV):
            time.sleep(float(os.environ[FAULT_SLEEP_ENV]))
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_path(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary sibling of `path`, fsync it, then rename it over `path` in one step (readers see
    the old file or the new one, never a mix); the temporary file never outlives a failure."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace a text file in one rename (readers see the old or the new content, never a mix)."""
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
