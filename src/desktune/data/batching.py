"""Sample order (deterministic per seed and epoch, resumable at any position) and right-padded micro-batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from desktune.data.encode import IGNORE_INDEX, Example


def example_stream(n: int, seed: int, shuffle: bool, start: int = 0) -> Iterator[int]:
    """Sample indices epoch after epoch, each epoch in its own seeded order, from sample number `start` on."""
    epoch, offset = divmod(start, n)
    while True:
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        yield from order[offset:]
        offset = 0
        epoch += 1


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
