"""Training data: read files, convert formats, apply chat templates, tokenize with loss masks, and batch."""

from desktune.data.batching import collate, example_stream, micro_batches, pack, step_order
from desktune.data.dataset import DataStats, build_datasets, split_samples
from desktune.data.encode import (
    IGNORE_INDEX,
    Example,
    assistant_spans,
    encode_prompt,
    encode_sample,
    encode_samples,
)
from desktune.data.formats import FORMATS, Sample, convert_rows, detect_format, to_sample
from desktune.data.sources import RawRow, read_rows
from desktune.data.templates import BUILTIN_TEMPLATES, FALLBACK_NOTICE, resolve_chat_template

__all__ = [
    "BUILTIN_TEMPLATES",
    "FALLBACK_NOTICE",
    "FORMATS",
    "IGNORE_INDEX",
    "DataStats",
    "Example",
    "RawRow",
    "Sample",
    "assistant_spans",
    "build_datasets",
    "collate",
    "convert_rows",
    "detect_format",
    "encode_prompt",
    "encode_sample",
    "encode_samples",
    "example_stream",
    "micro_batches",
    "pack",
    "read_rows",
    "resolve_chat_template",
    "split_samples",
    "step_order",
    "to_sample",
]
