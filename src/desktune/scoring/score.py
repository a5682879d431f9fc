"""Mean loss per target token of a model over examples: the loop's validation and `desktune eval`'s number."""

from __future__ import annotations

from typing import Any

import torch

from desktune.data import Example, micro_batches
from desktune.scoring.ce import target_ce_sum


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_ce_sum(model: Any, batch: dict[str, torch.Tensor], device: torch.device,
                 chunked: bool = True) -> tuple[torch.Tensor, int]:
    """Summed target cross-entropy of one packed or padded batch (see data.batching), and its target count."""
    b = to_device(batch, device)
    return target_ce_sum(model, b["input_ids"], b["labels"], b.get("attention_mask"),
                         position_ids=b.get("position_ids"), chunked=chunked)


@torch.no_grad()
def mean_target_loss(model: Any, examples: list[Example], micro_batch_size: int, pad_id: int,
                     device: torch.device, packing: bool = False) -> tuple[float, int]:
    """Mean cross-entropy per target token over a dataset (eval mode, no dropout), and the target count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for _, batch in micro_batches(examples, micro_batch_size, packing=packing, pad_id=pad_id):
            s, n = batch_ce_sum(model, batch, device)
            total += float(s)
            count += n
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count
