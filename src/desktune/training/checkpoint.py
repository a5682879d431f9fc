"""Checkpoints: PEFT adapter folders (periodic, last K kept, final) plus the state an exact resume needs.

Every folder is written to a temporary sibling, fsynced, then renamed, so a crash or a full disk mid-write leaves
the previous checkpoint intact and never a half-written folder under a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
META = "desktune.json"
STATE = "trainer_state.pt"


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary sibling folder, fsync it, then rename it to `out` (replacing an old one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if os.environ.get("DESKTUNE_FAULT_CHECKPOINT_SLEEP"):  # fault injection: widen the window a kill can hit
            time.sleep(float(os.environ["DESKTUNE_FAULT_CHECKPOINT_SLEEP"]))
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_adapter(model: Any, tokenizer: Any, folder: Path, base_path: str, meta: dict[str, Any]) -> None:
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_path
    model.save_pretrained(folder, safe_serialization=True)
    if getattr(tokenizer, "chat_template", None):
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    (folder / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def save_adapter(model: Any, tokenizer: Any, out: Path, *, base_path: str, meta: dict[str, Any]) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (+ chat template, desktune.json) atomically."""
    return write_folder_atomically(out, lambda tmp: _write_adapter(model, tokenizer, tmp, base_path, meta))


def save_checkpoint(model: Any, tokenizer: Any, out: Path, *, base_path: str, meta: dict[str, Any],
                    state: dict[str, Any]) -> Path:
    """An adapter folder that also holds the trainer state (optimizer, scheduler, RNG, data position)."""

    def write(tmp: Path) -> None:
        _write_adapter(model, tokenizer, tmp, base_path, meta)
        torch.save(state, tmp / STATE)

    return write_folder_atomically(out, write)


def is_complete(folder: Path) -> bool:
    """A finished resumable checkpoint (temporary folders start with '.' and are never complete)."""
    return (not folder.name.startswith(".") and (folder / STATE).is_file()
            and (folder / ADAPTER_WEIGHTS).is_file() and (folder / "adapter_config.json").is_file())


def checkpoint_step(folder: Path) -> int:
    """N of a step-N folder."""
    return int(folder.name.split("-")[1])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir() and is_complete(p)]
    return max(found, key=checkpoint_step, default=None)


def load_state(folder: Path) -> dict[str, Any]:
    """The trainer state saved by save_checkpoint (our own file: full unpickling is fine)."""
    return torch.load(folder / STATE, map_location="cpu", weights_only=False)

def adapter_size(folder: Path) -> int:
    """Bytes of the adapter weights file."""
    return (folder / ADAPTER_WEIGHTS).stat().st_size


def prune_checkpoints(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step-N checkpoints; return the deleted ones."""
    steps = sorted((p for p in folder.glob("step-*") if p.is_dir()), key=checkpoint_step)
    doomed = steps[:-keep_last] if keep_last > 0 else steps
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
