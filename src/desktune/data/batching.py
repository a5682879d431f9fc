"""Sample order (deterministic per seed and epoch, resumable at any position) and micro-batch layouts.

Two layouts: padding-free packed rows (all samples of a micro-batch in one row, positions restarting per sample)
and right-padded rows (the same samples, padded to the longest).
"""

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


def pack(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """All samples of a micro-batch in one row, no padding: input_ids, labels and position_ids of shape (1, total).

    Positions restart at 0 for each sample, which is how the model's attention tells samples apart. A sample's
    first label is IGNORE_INDEX so no position predicts across a boundary (unpacked, it is never a target either).
    """
    if not examples:
        raise ValueError("cannot pack an empty batch")
    ids, labels, positions = [], [], []
    for e in examples:
        ids.extend(e.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(e.labels[1:])
        positions.extend(range(len(e.input_ids)))
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def step_order(examples: Sequence[Example], *, packing: bool, group_by_length: bool = True) -> list[Example]:
    """The order a step's samples are split into micro-batches in (by length when unpacked and grouped)."""
    return sorted(examples, key=lambda e: len(e.input_ids)) if group_by_length and not packing else list(examples)


def micro_batches(examples: Sequence[Example], micro: int, *, packing: bool, pad_id: int,
                  group_by_length: bool = True) -> list[tuple[list[Example], dict[str, torch.Tensor]]]:
    """One optimizer step's samples split into micro-batches of `micro` samples, each laid out as a batch.

    Unpacked, `group_by_length` orders the step's samples by length first so each micro-batch pads less; the
    step's samples (and so its gradient) are the same either way, only the split differs.
    """
    order = step_order(examples, packing=packing, group_by_length=group_by_length)
    out = []
    for i in range(0, len(order), micro):
        chunk = order[i : i + micro]
        out.append((chunk, pack(chunk) if packing else collate(chunk, pad_id)))
    return out
