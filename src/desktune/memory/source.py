"""Which architecture a run's `model.name` has, read without loading weights (config.json or the catalog)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from desktune.errors import DesktuneError
from desktune.memory.catalog import ArchSpec, arch_from_config, resolve_arch

_EMBEDDED = {"smollm2-135m-instruct", "smollm2-135m", "smollm2", "default", "embedded"}


def _from_hub_cache(repo: str) -> ArchSpec | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    found = try_to_load_from_cache(repo, "config.json")
    if isinstance(found, str) and Path(found).is_file():
        return arch_from_config(json.loads(Path(found).read_text(encoding="utf-8")), name=repo)
    return None


def _catalog_key(repo: str) -> str:
    """'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b' (org, 'meta-' and chat suffixes dropped)."""
    name = repo.rsplit("/", 1)[-1].lower()
    name = re.sub(r"^meta-", "", name)
    name = re.sub(r"-(instruct|chat|it|hf|base)(-.*)?$", "", name)
    return re.sub(r"-v0\.\d+$", "", name)


def arch_for_model(name: str) -> ArchSpec:
    """Architecture of a catalog name, the embedded model, a model folder, a config.json, or a hub id."""
    if name.lower() in _EMBEDDED:
        return resolve_arch("smollm2-135m")
    path = Path(name).expanduser()
    if path.exists():
        return resolve_arch(path)
    try:
        return resolve_arch(name)
    except DesktuneError:
        if "/" not in name:
            raise
    cached = _from_hub_cache(name)
    if cached is not None:
        return cached
    key = _catalog_key(name)
    try:
        return resolve_arch(key)
    except DesktuneError:
        raise DesktuneError(
            f"cannot tell the architecture of '{name}' without its config.json", where="model.name",
            fix="plan with a catalog name (--model llama-3.1-8b) or a local folder holding config.json",
        ) from None
