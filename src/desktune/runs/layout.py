"""The run folder: every file and folder name a run writes, defined here once, and where each one lives.

    OUTPUT_DIR/RUN_NAME/
      config.yaml              the resolved config of the run
      metrics.jsonl            one record per step, evaluation, checkpoint and event (runs/records.py)
      checkpoints/step-NNNNNN/ resumable adapter folders (the last `checkpoint.keep_last` kept)
      adapter/                 the final adapter
      best/                    the adapter of the lowest validation loss (runs with train.eval_every)
      demo_answers.json        base vs tuned answers (`desktune demo` only)
      eval.json                `desktune eval`: held-out loss, forgetting, 4-bit cost, answers
      report.html              `desktune report`: one self-contained page

    TMPDIR/desktune-rescue/RUN_NAME/  the final adapter, when the run's own disk was full as it was saved

An adapter folder (adapter/ or a checkpoint) is a PEFT adapter plus desktune's own files:

      adapter_config.json, adapter_model.safetensors   PEFT's
      chat_template.jinja      the template used in training
      desktune.json            what trained it (version, base, quantization, step)
      base_fingerprint.json    the base's tensor names, shapes and sampled values (merge checks the base)
      trainer_state.json       checkpoints only: what an exact resume needs (training/state.py), as JSON
      trainer_state.safetensors  ... and its tensors (optimizer moments, RNG states); no pickle anywhere
      .desktune-checkpoint     checkpoints only: the marker that desktune made this folder (pruning needs it)
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from desktune.errors import DesktuneError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
BEST = "best"
DEMO_ANSWERS = "demo_answers.json"
EVAL = "eval.json"
REPORT = "report.html"
RESCUE = "desktune-rescue"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PICKLE = "adapter_model.bin"  # older PEFT adapters
CHAT_TEMPLATE = "chat_template.jinja"
META = "desktune.json"
BASE_FINGERPRINT = "base_fingerprint.json"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_STATE_PICKLE = "trainer_state.pt"  # older desktune checkpoints: a pickle (read only when allowed)
CHECKPOINT_MARKER = ".desktune-checkpoint"
STOP_REQUEST = "STOP"  # a file another process writes into a running run's folder: stop after this step, resumable

_STEP = re.compile(r"step-(\d+)")


def rescue_dir(run_path: Path) -> Path:
    """Where a run's final adapter goes when its own disk is full: the system's temporary folder."""
    return Path(tempfile.gettempdir()) / RESCUE / run_path.name


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after `step`."""
    return f"step-{step:06d}"


def checkpoint_step(folder: Path) -> int | None:
    """N of a step-N checkpoint folder (None for any other name)."""
    m = _STEP.fullmatch(folder.name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(folder: Path) -> bool:
    """A finished resumable checkpoint (folders being written start with '.' and are never complete)."""
    state = ((folder / TRAINER_STATE).is_file() and (folder / TRAINER_TENSORS).is_file()) or \
        (folder / TRAINER_STATE_PICKLE).is_file()
    return (checkpoint_step(folder) is not None and state and (folder / ADAPTER_WEIGHTS).is_file()
            and (folder / ADAPTER_CONFIG).is_file())


@dataclass(frozen=True)
class RunDir:
    """A run folder and the paths inside it."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def demo_answers(self) -> Path:
        return self.path / DEMO_ANSWERS

    @property
    def eval(self) -> Path:
        return self.path / EVAL

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def stop_request(self) -> Path:
        return self.path / STOP_REQUEST

    def checkpoint(self, step: int) -> Path:
        """Where the checkpoint after `step` goes."""
        return self.checkpoints / checkpoint_name(step)

    @classmethod
    def of_checkpoint(cls, folder: Path) -> RunDir:
        """The run a checkpoint folder belongs to."""
        return cls(Path(folder).parent.parent)

    def step_folders(self) -> list[Path]:
        """Every step-N folder under checkpoints/, oldest step first (complete or not)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.is_dir() and not p.is_symlink() and checkpoint_step(p) is not None]
        return sorted(found, key=lambda p: checkpoint_step(p) or 0)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint."""
        done = [p for p in self.step_folders() if is_complete_checkpoint(p)]
        return done[-1] if done else None

    def prune_checkpoints(self, keep_last: int) -> list[Path]:
        """Delete all but the newest `keep_last` step-N folders desktune made (they hold CHECKPOINT_MARKER; never a
        symlink or a user's folder that happens to match the name); returns the deleted ones."""
        steps = [p for p in self.step_folders() if (p / CHECKPOINT_MARKER).is_file()]
        doomed = steps[:-keep_last] if keep_last > 0 else steps
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        return doomed

    def holds_only_config(self) -> bool:
        """Nothing but the config was written (a run that failed during setup)."""
        return [p.name for p in self.path.iterdir()] == [CONFIG]


_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]{0,127}$")


def check_run_name(name: str) -> str:
    """`name` when it names one folder inside output_dir (no '/', '\\', '..', absolute path or leading '.')."""
    if not _RUN_NAME.match(name) or ".." in name:
        raise DesktuneError(f"not a usable run name: {name!r} (a run name is one folder inside output_dir)",
                            where="run_name", fix="use letters, digits and . _ - + = @ (no '/', no '..', "
                            "not starting with '.'); put the runs elsewhere with output_dir")
    return name


def new_run_dir(output_dir: str | Path, run_name: str | None) -> RunDir:
    """Create OUTPUT_DIR/RUN_NAME (a timestamp when unnamed); refuse a named folder that already holds a run."""
    name = check_run_name(run_name) if run_name else datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(output_dir) / name
    if path.is_symlink():
        raise DesktuneError("the run folder is a symbolic link: desktune writes runs only into folders it makes",
                            where=str(path), fix="choose another run_name (-o run_name=...) or remove the link")
    if path.exists() and any(path.iterdir()):
        if run_name:
            raise DesktuneError("the run folder already holds a run", where=str(path),
                                fix="choose another run_name (-o run_name=...) or move the old run away")
        path = Path(f"{path}-{time.time_ns() % 10**6}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DesktuneError(f"cannot write the run folder ({e.strerror or e})", where=str(path),
                            fix="choose a writable output_dir (-o output_dir=...)") from e
    return RunDir(path)


def find_checkpoint(output_dir: str | Path, run_name: str | None, resume: str | Path | bool) -> Path:
    """The checkpoint to resume: a checkpoint folder, a run folder's latest, or (True) the latest run's latest."""
    if resume is True:
        root = Path(output_dir)
        candidates = [root / check_run_name(run_name)] if run_name else sorted(
            (p for p in root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:
            found = RunDir(path).latest_checkpoint() if path.is_dir() else None
            if found is not None:
                return found
        raise DesktuneError("no checkpoint to resume from", where=str(root / (run_name or "")),
                            fix="set checkpoint.every so runs save checkpoints, or pass --resume PATH")
    path = Path(resume)
    if is_complete_checkpoint(path):
        return path
    found = RunDir(path).latest_checkpoint() if path.is_dir() else None
    if found is None:
        raise DesktuneError("not a complete checkpoint nor a run folder holding one", where=str(path),
                            fix=f"pass a run folder or one of its {CHECKPOINTS}/step-N folders")
    return found
