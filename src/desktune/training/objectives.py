"""Training objectives: what a micro-batch's loss is, and what a step's loss is normalised by.

Today one objective, supervised cross-entropy on target tokens (`SupervisedCE`); later ones (preference
tuning) implement the same two methods beside it, and the step (training/step.py) calls only those. Scoring
a dataset (`mean_target_loss`) lives here, before the loop in the chain, so evaluation can use the very
function the loop validates with without importing the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from desktune.config import RunConfig
from desktune.data import Example, micro_batches
from desktune.training.loss import target_ce_sum


class Objective(Protocol):
    """A training objective: a summed loss per micro-batch and the count a whole step divides it by."""

    def normaliser(self, examples: list[Example]) -> int:
        """What the summed losses of one optimizer step's samples are divided by."""
        ...

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The summed (not averaged) loss of one micro-batch."""
        ...


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_ce_sum(model: Any, batch: dict[str, torch.Tensor], device: torch.device,
                 chunked: bool = True) -> tuple[torch.Tensor, int]:
    """Summed target cross-entropy of one packed or padded batch (see data.batching), and its target count."""
    b = _to_device(batch, device)
    return target_ce_sum(model, b["input_ids"], b["labels"], b.get("attention_mask"),
                         position_ids=b.get("position_ids"), chunked=chunked)


@dataclass(frozen=True)
class SupervisedCE:
    """Next-token cross-entropy on target tokens, normalised by the target tokens of the whole step, so any
    split of a step's samples into micro-batches gives the same update."""

    chunked: bool = True  # from hidden states in chunks (training/loss.py); False: full logits

    def normaliser(self, examples: list[Example]) -> int:
        return max(sum(ex.n_target for ex in examples), 1)

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        return batch_ce_sum(model, batch, device, chunked=self.chunked)[0]


@torch.no_grad()
def mean_target_loss(model: Any, examples: list[Example], micro_batch_size: int, pad_id: int,
                     device: torch.device, packing: bool = False) -> tuple[float, int]:
    """Mean cross-entropy per target token over a dataset (eval mode, no dropout), and the target count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for _, batch in micro_batches(examples, micro_batch_size, packing=packing, pad_id=pad_id):
        s, n = batch_ce_sum(model, batch, device)
        total += float(s)
        count += n
    model.train(was_training)
    return (total / count if count else float("nan")), count


def objective_for(cfg: RunConfig) -> Objective:
    """The objective a run trains with (supervised cross-entropy today)."""
    return SupervisedCE(chunked=cfg.train.chunked_loss)
