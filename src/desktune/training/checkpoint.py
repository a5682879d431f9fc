"""Adapter folders in PEFT format (periodic resumable checkpoints and the final adapter), written atomically.

Names and places come from runs/layout.py; the atomic write (temporary folder, fsync, rename) from runs/atomic.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from desktune.adapters import write_base_fingerprint
from desktune.errors import DesktuneError
from desktune.runs.atomic import write_folder_atomically
from desktune.runs.layout import (
    ADAPTER_WEIGHTS,
    CHAT_TEMPLATE,
    CHECKPOINT_MARKER,
    META,
    TRAINER_STATE,
    TRAINER_STATE_PICKLE,
    TRAINER_TENSORS,
    RunDir,
)
from desktune.safety import refuse_pickle, unpickle_refusal
from desktune.training.state import TrainState, read_state, write_state


def _write_adapter(model: Any, tokenizer: Any, folder: Path, base_path: str, meta: dict[str, Any],
                   weights: dict[str, Any] | None) -> None:
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_path
    model.save_pretrained(folder, safe_serialization=True, state_dict=weights)  # weights: gathered shards
    if getattr(tokenizer, "chat_template", None):
        (folder / CHAT_TEMPLATE).write_text(tokenizer.chat_template, encoding="utf-8")
    (folder / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    write_base_fingerprint(folder, base_path)


def save_adapter(model: Any, tokenizer: Any, out: Path, *, base_path: str, meta: dict[str, Any],
                 weights: dict[str, Any] | None = None) -> Path:
    """Write the PEFT adapter (+ chat template, desktune.json) atomically; `weights` (the model's trainable
    tensors by name) instead of the model's own, when they were gathered from shards."""
    return write_folder_atomically(out, lambda tmp: _write_adapter(model, tokenizer, tmp, base_path, meta, weights))


def save_checkpoint(model: Any, tokenizer: Any, out: Path, *, base_path: str, meta: dict[str, Any],
                    state: TrainState, weights: dict[str, Any] | None = None) -> Path:
    """An adapter folder that also holds the trainer state (optimizer, scheduler, RNG, data position) and the
    marker that desktune made it."""

    def write(tmp: Path) -> None:
        _write_adapter(model, tokenizer, tmp, base_path, meta, weights)
        write_state(state, tmp / TRAINER_STATE, tmp / TRAINER_TENSORS)
        (tmp / CHECKPOINT_MARKER).write_text(f"step {state.step}\n", encoding="utf-8")

    return write_folder_atomically(out, write)


def _earlier(folder: Path) -> str:
    """What to do about a checkpoint that cannot be resumed: the run's other checkpoints."""
    others = [p.name for p in RunDir.of_checkpoint(folder).step_folders() if p != folder]
    return (f"resume from an earlier checkpoint of the run ({', '.join(others)})" if others else
            "start the run again (no other checkpoint of this run exists)")


def load_state(folder: Path) -> TrainState:
    """The trainer state saved by save_checkpoint; an older pickled trainer_state.pt only with --allow-pickle,
    and then with weights_only=True. A damaged state is a DesktuneError naming the file."""
    tree, tensors, pickled = folder / TRAINER_STATE, folder / TRAINER_TENSORS, folder / TRAINER_STATE_PICKLE
    if not tree.is_file() and pickled.is_file():
        refuse_pickle([pickled], "trainer state", folder, convert=_earlier(folder))
        return _load_pickled(pickled, folder)
    try:
        return read_state(tree, tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DesktuneError(f"the trainer state is damaged or incomplete, so this checkpoint cannot be resumed "
                            f"({detail})", where=str(tree), fix=_earlier(folder)) from e


def _load_pickled(file: Path, folder: Path) -> TrainState:
    """An older desktune trainer_state.pt through the weights-only unpickler (numpy's RNG state allowed)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            return TrainState.from_dict(torch.load(file, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, KeyError, TypeError) as e:
        detail = unpickle_refusal(e)
        raise DesktuneError(f"the pickled trainer state holds more than tensors and plain values, or is damaged "
                            f"({detail}); it was not loaded", where=str(file), fix=_earlier(folder)) from e


def load_adapter_weights(model: Any, folder: Path) -> None:
    """Put a checkpoint's adapter weights into the (same-shaped) adapters of `model`."""
    from peft import set_peft_model_state_dict  # peft imports torchao: only after models/ silenced it

    set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)))


def adapter_size(folder: Path) -> int:
    """Bytes of the adapter weights file."""
    return (folder / ADAPTER_WEIGHTS).stat().st_size
