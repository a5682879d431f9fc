"""Constants shared by the torch-free planner and the runtime: each value is defined here once.

Nothing here imports torch (or anything heavy), so `desktune plan` can use it and still answer in a second.
"""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("desktune")  # one source: the package metadata (pyproject.toml)
except metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    VERSION = "0+unknown"

# The embedded default model and every name a user may call it by.
EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL, "smollm2-135m", "smollm2", "default", "embedded"})
EMBEDDED_CATALOG_NAME = "smollm2-135m"  # its architecture in memory/catalog.py

IGNORE_INDEX = -100  # label of a position that is not trained on (PyTorch's cross-entropy default)

# Compute precisions by their config names, and their bytes per element (torch dtypes: hardware.DTYPES).
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_NAMES = tuple(DTYPE_BYTES)

# The loss computes this many bytes of fp32 logits at once, whatever the vocabulary (scoring/ce.py);
# the planner charges the same chunk (memory/estimate.py).
LOSS_CHUNK_BYTES = 64 * 2**20
LOSS_CHUNK_MIN_ROWS, LOSS_CHUNK_MAX_ROWS = 16, 4096


def chunk_rows(vocab: int) -> int:
    """Target rows per loss chunk: LOSS_CHUNK_BYTES of fp32 logits (341 rows at a 49k vocabulary, 130 at 128k)."""
    return max(LOSS_CHUNK_MIN_ROWS, min(LOSS_CHUNK_MAX_ROWS, LOSS_CHUNK_BYTES // (4 * vocab)))


NF4_BLOCK_SIZE = 64  # weights per absmax scale, as in QLoRA / bitsandbytes / torchao
NF4_SCALER_BLOCK_SIZE = 256  # absmax scales per int8 double-quantization group, as in bitsandbytes

# desktune's own CPU attention kernel (models/cpu_attention.c) for packed bf16 rows: its head size, and the
# variable that switches it off ("0"); the planner charges what it saves (memory/estimate.py).
CPU_ATTENTION_HEAD_DIM = 64
CPU_ATTENTION_ENV = "DESKTUNE_CPU_ATTENTION"

DEBUG_ENV = "DESKTUNE_DEBUG"  # set to 1: a user error also prints the full traceback of its cause
