"""Saving adapters in standard PEFT format: periodic checkpoints (keeping the last K) and the final adapter."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ADAPTER_WEIGHTS = "adapter_model.safetensors"
META = "desktune.json"


def save_adapter(model: Any, tokenizer: Any, out: Path, *, base_path: str, meta: dict[str, Any]) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (+ chat template, desktune.json) atomically."""
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if getattr(tokenizer, "chat_template", None):
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def adapter_size(folder: Path) -> int:
    """Bytes of the adapter weights file."""
    return (folder / ADAPTER_WEIGHTS).stat().st_size


def prune_checkpoints(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step-N checkpoints; return the deleted ones."""
    steps = sorted((p for p in folder.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    doomed = steps[:-keep_last] if keep_last > 0 else steps
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
