"""Which architecture a run's `model.name` has, read without loading weights (config.json or the catalog)."""

from __future__ import annotations

import re
from pathlib import Path

from desktune.errors import DesktuneError
from desktune.memory.catalog import ArchSpec, resolve_arch


def _catalog_key(repo: str) -> str:
    """'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b' (org, 'meta-' and chat suffixes dropped)."""
    name = repo.rsplit("/", 1)[-1].lower()
    name = re.sub(r"^meta-", "", name)
    name = re.sub(r"-(instruct|chat|it|hf|base)(-.*)?$", "", name)
    return re.sub(r"-v0\.\d+$", "", name)


def arch_for_model(name: str) -> ArchSpec:
    """Architecture of a catalog name (the embedded model's aliases included), a model folder, a config.json,
    or a hub id (its cached config.json, else the catalog entry its name points to)."""
    path = Path(name).expanduser()
    if path.exists():
        return resolve_arch(path)
    try:
        return resolve_arch(name)  # catalog names and aliases, then the hub cache
    except DesktuneError:
        if "/" not in name:
            raise
    try:
        return resolve_arch(_catalog_key(name))
    except DesktuneError as e:
        raise DesktuneError(
            f"cannot tell the architecture of '{name}' without its config.json", where="model.name",
            fix="plan with a catalog name (--model llama-3.1-8b; desktune plan --list shows them all) or a "
            "local folder holding config.json",
        ) from e
