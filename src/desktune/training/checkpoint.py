"""Adapter folders in PEFT format (periodic resumable checkpoints and the final adapter), written atomically.

Names and places come from runs/layout.py; the atomic write (temporary folder, fsync, rename) from runs/atomic.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from desktune.adapters import write_base_fingerprint
from desktune.runs.atomic import write_folder_atomically
from desktune.runs.layout import ADAPTER_WEIGHTS, CHAT_TEMPLATE, META, TRAINER_STATE
from desktune.training.state import TrainState


def _write_adapter(model: Any, tokenizer: Any, folder: Path, base_path: str, meta: dict[str, Any]) -> None:
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_path
    model.save_pretrained(folder, safe_serialization=True)
    if getattr(tokenizer, "chat_template", None):
        (folder / CHAT_TEMPLATE).write_text(tokenizer.chat_template, encoding="utf-8")
    (folder / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    write_base_fingerprint(folder, base_path)


def save_adapter(model: Any, tokenizer: Any, out: Path, *, base_path: str, meta: dict[str, Any]) -> Path:
    """Write the PEFT adapter (+ chat template, desktune.json) atomically."""
    return write_folder_atomically(out, lambda tmp: _write_adapter(model, tokenizer, tmp, base_path, meta))


def save_checkpoint(model: Any, tokenizer: Any, out: Path, *, base_path: str, meta: dict[str, Any],
                    state: TrainState) -> Path:
    """An adapter folder that also holds the trainer state (optimizer, scheduler, RNG, data position)."""

    def write(tmp: Path) -> None:
        _write_adapter(model, tokenizer, tmp, base_path, meta)
        torch.save(state.to_dict(), tmp / TRAINER_STATE)

    return write_folder_atomically(out, write)


def load_state(folder: Path) -> TrainState:
    """The trainer state saved by save_checkpoint (our own file: full unpickling is fine)."""
    return TrainState.from_dict(torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False))


def load_adapter_weights(model: Any, folder: Path) -> None:
    """Put a checkpoint's adapter weights into the (same-shaped) adapters of `model`."""
    from peft import set_peft_model_state_dict  # peft imports torchao: only after models/ silenced it

    set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)))


def adapter_size(folder: Path) -> int:
    """Bytes of the adapter weights file."""
    return (folder / ADAPTER_WEIGHTS).stat().st_size
