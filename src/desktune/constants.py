"""Constants shared by the torch-free planner and the runtime: each value is defined here once.

Nothing here imports torch (or anything heavy), so `desktune plan` can use it and still answer in a second.
"""

from __future__ import annotations

import math
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


# On the CPU a bf16 sample of a packed row whose attention probabilities (heads x len^2, 2 bytes each) fit in
# CPU_EAGER_ATTENTION_BYTES runs the grouped eager attention, which keeps them for backward; a longer one runs in
# blocks of CPU_ATTENTION_ROWS query rows (fewer where a block's probabilities would pass CPU_ATTENTION_BLOCK_BYTES),
# recomputed in backward (models/packed_attention.py); the planner charges both (memory/estimate.py). Measured on a
# 2-core bf16 EPYC, forward and backward of one layer (9 heads, 3 key/value heads, d 64): kept probabilities 4.8 ms
# at 500 tokens against 7-9 ms in blocks; 19 ms at 700 and 44 ms at 965 against 13 and 21 ms in blocks of 256; at
# 32 heads (d 128) the two meet at 300-450 tokens. Blocks of 128-256 rows ran fastest at 994-2048 tokens.
CPU_EAGER_ATTENTION_BYTES = 4 * 2**20
CPU_ATTENTION_BLOCK_BYTES = 16 * 2**20
CPU_ATTENTION_ROWS = 256
CPU_ATTENTION_MIN_ROWS = 32


def cpu_eager_attention_len(heads: int) -> int:
    """The longest sample whose attention keeps its probabilities on the CPU in bf16: 482 tokens at 9 heads, 256
    at 32."""
    return math.isqrt(CPU_EAGER_ATTENTION_BYTES // (2 * heads))


def cpu_eager_attention_rows(heads: int, n: int) -> int:
    """Query rows of a block of a longer sample of `n` tokens: 256 at 9 heads and 2048 tokens, 128 at 32 heads."""
    fit = CPU_ATTENTION_BLOCK_BYTES // (2 * heads * n)
    return max(CPU_ATTENTION_MIN_ROWS, min(CPU_ATTENTION_ROWS, fit))


NF4_BLOCK_SIZE = 64  # weights per absmax scale, as in QLoRA / bitsandbytes / torchao
NF4_SCALER_BLOCK_SIZE = 256  # absmax scales per int8 double-quantization group, as in bitsandbytes

DEBUG_ENV = "DESKTUNE_DEBUG"  # set to 1: a user error also prints the full traceback of its cause
