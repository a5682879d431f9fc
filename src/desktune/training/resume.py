"""What an exact resume needs besides weights: RNG states, fingerprints of config and data, the record so far."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from desktune.config import RunConfig
from desktune.errors import DesktuneError

# Keys that may change between an interrupted run and its resume without changing what it computes.
# How samples split into micro-batches, and checkpointing, do not change the result (the loss is normalised per
# step); the samples per step do.
VOLATILE = {"output_dir", "run_name", "checkpoint.keep_last", "train.threads", "train.eval_every", "train.device",
            "train.memory_budget", "train.micro_batch_size", "train.grad_accum", "train.gradient_checkpointing"}


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
    """The resolved config as dotted keys, without the keys that may change on resume."""
    flat = _flatten(cfg.model_dump(mode="json"))
    kept = {k: v for k, v in flat.items() if k not in VOLATILE and not k.startswith("checkpoint.every")}
    kept["train.samples_per_step"] = cfg.train.micro_batch_size * cfg.train.grad_accum
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


def check_compatible(state: dict[str, Any], cfg: RunConfig, where: Path, accept: bool) -> list[str]:
    """Refuse a resume whose config or data changed, unless accepted; returns what changed."""
    diff = changes(state["config_fingerprint"], config_fingerprint(cfg))
    saved_data, now_data = state["data_fingerprint"], data_fingerprint(cfg)
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


def truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep metrics.jsonl up to the checkpoint record of `step` (later lines belong to steps being redone)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    cut = next((i for i, r in enumerate(records) if r["type"] == "checkpoint" and r["step"] == step), None)
    kept = records[: cut + 1] if cut is not None else [r for r in records if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)
    return kept
