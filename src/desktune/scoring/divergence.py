"""How far a tuned model moved from its base on reference answers: both losses and the mean KL divergence."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from desktune.constants import IGNORE_INDEX, chunk_rows
from desktune.data import Example, micro_batches
from desktune.scoring.ce import decoder_and_head
from desktune.scoring.score import to_device


@dataclass(frozen=True)
class Divergence:
    """Base and tuned mean loss per target token on the same examples, and mean KL(base || tuned) in nats."""

    base_loss: float
    tuned_loss: float
    kl: float
    target_tokens: int

    @property
    def loss_increase_pct(self) -> float:
        """How much less likely the tuned model finds the examples than the base does, in %."""
        return 100.0 * (self.tuned_loss - self.base_loss) / self.base_loss if self.base_loss > 0 else 0.0


def _target_hidden(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at the positions that predict a target token, and those targets."""
    decoder, _, _ = decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                     position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def _log_probs(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    _, head, softcap = decoder_and_head(model)
    z = F.linear(hidden, head.weight, getattr(head, "bias", None)).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return F.log_softmax(z, dim=-1)


def _base_hidden(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    disable = getattr(model, "disable_adapter", None)
    with disable() if disable is not None else nullcontext():  # no adapter: the model is its own base
        return _target_hidden(model, batch)


def _batch_sums(model: Any, batch: dict[str, torch.Tensor], h_base: torch.Tensor, targets: torch.Tensor
                ) -> tuple[float, float, float, int]:
    """Summed base CE, tuned CE and KL(base || tuned) of one batch, and its target count."""
    h_tuned, _ = _target_hidden(model, batch)
    base_ce = tuned_ce = kl = 0.0
    rows = chunk_rows(decoder_and_head(model)[1].weight.shape[0])
    for s in range(0, targets.shape[0], rows):  # one chunk of vocab-sized rows at a time, as the loss does
        lp_base, lp_tuned = _log_probs(model, h_base[s : s + rows]), _log_probs(model, h_tuned[s : s + rows])
        t = targets[s : s + rows, None]
        base_ce -= float(lp_base.gather(1, t).sum())
        tuned_ce -= float(lp_tuned.gather(1, t).sum())
        kl += float((lp_base.exp() * (lp_base - lp_tuned)).sum())
    return base_ce, tuned_ce, kl, int(targets.shape[0])


@torch.no_grad()
def divergence(model: Any, examples: list[Example], micro_batch_size: int, pad_id: int,
               device: torch.device, packing: bool = False,
               base_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Divergence:
    """Base vs tuned (the peft model with its adapter off and on) on `examples`, in eval mode.

    The frozen base's hidden states at the targets never change: pass the same empty list as `base_cache` to
    repeated calls on the same examples and the base's forward pass runs only the first time (half the cost).
    """
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0]
    fill = base_cache is not None and not base_cache
    try:
        for k, (_, batch) in enumerate(micro_batches(examples, micro_batch_size, packing=packing, pad_id=pad_id)):
            batch = to_device(batch, device)
            base = _base_hidden(model, batch) if base_cache is None or fill else base_cache[k]
            if fill:
                base_cache.append(base)
            for i, v in enumerate(_batch_sums(model, batch, *base)):
                sums[i] += v
    finally:
        model.train(was_training)
    n = int(sums[3])
    nan = float("nan")
    return Divergence(base_loss=sums[0] / n if n else nan, tuned_loss=sums[1] / n if n else nan,
                      kl=sums[2] / n if n else nan, target_tokens=n)
