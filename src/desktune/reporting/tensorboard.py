"""A run's records as TensorBoard scalars, for those who watch runs in TensorBoard (`pip install tensorboard`)."""

from __future__ import annotations

from pathlib import Path

from desktune.errors import DesktuneError
from desktune.runs.layout import RunDir
from desktune.runs.records import EvalRecord, TrainRecord, read_records, records_of

MIB = 1024**2
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")
# memory/<counter>_mib: every memory counter of the step record, where the device has it
MEMORY_SCALARS = ("mem_bytes", "rss_bytes", "peak_rss_bytes", "cuda_allocated_bytes", "cuda_peak_bytes",
                  "cuda_reserved_bytes", "mps_allocated_bytes")


def write_tensorboard(run_dir: Path, logdir: Path) -> Path:
    """Write the run's train/*, memory/* and eval/val_loss scalars as TensorBoard event files under `logdir`."""
    try:
        import tensorboard  # noqa: F401  (torch's SummaryWriter needs it; say so before torch does, less clearly)
    except ImportError as e:
        raise DesktuneError("TensorBoard logging needs the tensorboard package", fix="pip install tensorboard") from e
    from torch.utils.tensorboard import SummaryWriter

    run = RunDir(Path(run_dir))
    records = read_records(run.metrics) if run.metrics.is_file() else []
    logdir = Path(logdir)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for r in records_of(records, TrainRecord):
            for name in TRAIN_SCALARS:
                if getattr(r, name) is not None:
                    writer.add_scalar(f"train/{name}", getattr(r, name), r.step)
            for name in MEMORY_SCALARS:
                if getattr(r, name) is not None:
                    writer.add_scalar(f"memory/{name.removesuffix('_bytes')}_mib", getattr(r, name) / MIB, r.step)
        for r in records_of(records, EvalRecord):
            if r.val_loss is not None:
                writer.add_scalar("eval/val_loss", r.val_loss, r.step)
    finally:
        writer.close()
    return logdir
