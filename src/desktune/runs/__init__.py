"""Run folders, torch-free: their layout (every name once), the typed records of metrics.jsonl, atomic writes.

Everything that reads or writes a run goes through this package: the training loop and its monitor, resume,
and the tools that read finished runs. It imports nothing of desktune but `errors`, so any layer may use it.
"""

from desktune.runs.atomic import write_folder_atomically, write_text_atomically
from desktune.runs.layout import RunDir, find_checkpoint, is_complete_checkpoint, new_run_dir, rescue_dir
from desktune.runs.records import (
    CheckpointRecord,
    EvalRecord,
    EventRecord,
    ForgettingRecord,
    Record,
    RecordWriter,
    SavedRecord,
    TrainRecord,
    read_records,
    records_of,
    truncate_records,
)

__all__ = [
    "CheckpointRecord",
    "EvalRecord",
    "EventRecord",
    "ForgettingRecord",
    "Record",
    "RecordWriter",
    "RunDir",
    "SavedRecord",
    "TrainRecord",
    "find_checkpoint",
    "is_complete_checkpoint",
    "new_run_dir",
    "read_records",
    "records_of",
    "rescue_dir",
    "truncate_records",
    "write_folder_atomically",
    "write_text_atomically",
]
