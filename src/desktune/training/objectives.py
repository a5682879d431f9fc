"""Training objectives: what a micro-batch's loss is, and what a step's loss is normalised by.

Today one objective, supervised cross-entropy on target tokens (`SupervisedCE`); later ones (preference
tuning) implement the same two methods beside it, and the step (training/step.py) calls only those. Scoring
a dataset (`scoring.score.mean_target_loss`) lives before the loop in the chain, so `desktune eval` uses the
very function the loop validates with without importing the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from desktune.config import RunConfig
from desktune.data import Example
from desktune.scoring.score import batch_ce_sum


class Objective(Protocol):
    """A training objective: a summed loss per micro-batch and the count a whole step divides it by."""

    def normaliser(self, examples: list[Example]) -> int:
        """What the summed losses of one optimizer step's samples are divided by."""
        ...

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The summed (not averaged) loss of one micro-batch."""
        ...


@dataclass(frozen=True)
class SupervisedCE:
    """Next-token cross-entropy on target tokens, normalised by the target tokens of the whole step, so any
    split of a step's samples into micro-batches gives the same update."""

    chunked: bool = True  # from hidden states in chunks (scoring/ce.py); False: full logits

    def normaliser(self, examples: list[Example]) -> int:
        return max(sum(ex.n_target for ex in examples), 1)

    def loss_sum(self, model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        return batch_ce_sum(model, batch, device, chunked=self.chunked)[0]


def objective_for(cfg: RunConfig) -> Objective:
    """The objective a run trains with (supervised cross-entropy today)."""
    return SupervisedCE(chunked=cfg.train.chunked_loss)
