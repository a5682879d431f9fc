"""What an exact resume needs besides weights: RNG states, and fingerprints of config and data to compare."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from desktune.config import RunConfig, resume_may_change
from desktune.errors import DesktuneError
from desktune.training.state import TrainState


def capture_rng() -> dict[str, Any]:
    """Every random generator a step can draw from."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put the generators back where capture_rng found them."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as dotted keys, without the keys that may change on resume (see config.py)."""
    volatile = resume_may_change()
    kept = {k: v for k, v in _flatten(cfg.model_dump(mode="json")).items() if k not in volatile}
    kept["train.samples_per_step"] = cfg.train.samples_per_step
    return kept


def _hash_path(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def data_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """sha256 of the training (and validation) data files."""
    return {p: _hash_path(Path(p)) for p in (cfg.data.train, cfg.data.val) if p}


def changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human lines for every key whose value differs."""
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def check_compatible(state: TrainState, cfg: RunConfig, where: Path, accept: bool,
                     data_now: dict[str, str] | None = None) -> list[str]:
    """Refuse a resume whose config or data changed, unless accepted; returns what changed."""
    diff = changes(state.config_fingerprint, config_fingerprint(cfg))
    saved_data, now_data = state.data_fingerprint, data_now if data_now is not None else data_fingerprint(cfg)
    if list(saved_data) != list(now_data):
        diff.append(f"data files: {list(saved_data)} -> {list(now_data)}")
    else:
        diff += [f"data file {p} changed (content hash differs)" for p in saved_data if saved_data[p] != now_data[p]]
    if diff and not accept:
        raise DesktuneError(
            "cannot resume exactly: " + "; ".join(diff), where=str(where),
            fix="restore the original config/data, or pass --accept-changes to resume anyway",
        )
    return diff
