"""What desktune loads without running code: pickle files are refused unless the user opts in.

Pickled PyTorch files (`.bin`, `.pt`, `.pth`, ...) run code when they are unpickled. desktune writes none of its
own (adapters and models are safetensors, trainer state is JSON + safetensors); one from outside is refused with
a message naming the risk, unless `--allow-pickle` is given, and even then it is read with `weights_only=True`.

The opt-in lives in the environment (DESKTUNE_ALLOW_PICKLE=1, which `--allow-pickle` sets) rather than in a run
config, so a config downloaded beside a model cannot switch it on; torchrun's ranks inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from desktune.errors import DesktuneError

ALLOW_PICKLE_ENV = "DESKTUNE_ALLOW_PICKLE"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_OPT_IN = "pass --allow-pickle if you trust whoever made it (it is then read with torch.load(weights_only=True))"


def pickle_allowed() -> bool:
    """Whether the user opted in to reading pickle files (--allow-pickle or DESKTUNE_ALLOW_PICKLE=1)."""
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def allow_pickle(allowed: bool) -> None:
    """Record the command line's --allow-pickle for everything this process (and its children) loads."""
    if allowed:
        os.environ[ALLOW_PICKLE_ENV] = "1"


def is_pickle(path: Path) -> bool:
    """A file in one of PyTorch's pickle formats (by its name, as the loaders choose them)."""
    return path.suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(files: Iterable[Path], what: str, where: str | Path, convert: str) -> None:
    """Raise DesktuneError naming the risk when `files` must be unpickled and the user did not opt in."""
    found = sorted({p.name for p in files})
    if not found or pickle_allowed():
        return
    raise DesktuneError(
        f"the {what} is stored as a pickle ({', '.join(found)}): loading a pickle can run any code its maker put in "
        "it, so desktune does not load one unless asked", where=str(where), fix=f"{convert}; or {_OPT_IN}")


def unpickle_refusal(err: BaseException) -> str:
    """What torch's weights-only unpickler refused, in one line (its message goes on to explain how to load the
    file unsafely; that part is left out)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line.removeprefix("WeightsUnpickler error: ") for line in lines if "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0]
