"""Micro-batches: a deterministic order per seed and epoch, and right-padded tensors."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

import torch

from desktune.data.encode import IGNORE_INDEX, Example

T = TypeVar("T")


def batches(
    examples: Sequence[T], micro_batch_size: int, *, shuffle: bool, seed: int, epoch: int
) -> list[list[T]]:
    """Split examples into micro-batches (the last may be smaller); shuffled the same way for a seed+epoch."""
    if micro_batch_size <= 0:
        raise ValueError("micro_batch_size must be positive")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [
        [examples[i] for i in order[k : k + micro_batch_size]] for k in range(0, len(order), micro_batch_size)
    ]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch into input_ids, labels (IGNORE_INDEX on padding) and attention_mask."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
