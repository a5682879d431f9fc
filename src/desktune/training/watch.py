"""What the loop watches between steps: the best validation (its adapter kept in best/), early stopping on
validation loss with patience, and forgetting measured every N steps with a threshold that warns or stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from desktune.config import RunConfig
from desktune.runs import EvalRecord, ForgettingRecord, Record, records_of
from desktune.runs.diagnostics import Finding
from desktune.scoring.divergence import divergence
from desktune.scoring.forgetting import ReferenceSet


@dataclass
class Best:
    """The lowest validation loss so far and how many validations since did not beat it."""

    step: int | None = None
    loss: float = math.inf
    since: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Take a validation; True when it is a new best."""
        if math.isfinite(loss) and loss < self.loss:
            self.step, self.loss, self.since = step, loss, 0
            return True
        self.since += 1
        return False

    @classmethod
    def of(cls, records: list[Record]) -> Best:
        """The best as a resumed run's kept records left it."""
        best = cls()
        for r in records_of(records, EvalRecord):
            best.update(r.step, r.val_loss if r.val_loss is not None else math.nan)
        return best


def early_stop(cfg: RunConfig, best: Best, step: int) -> Finding | None:
    """Patience used up: this many validations in a row did not improve on the best."""
    patience = cfg.train.early_stopping_patience
    if patience is None or best.since < patience:
        return None
    return Finding("early_stopped", step, f"early stop after step {step}: {best.since} validations without "
                   f"improving on {best.loss:.4f} (step {best.step}); the best adapter is in best/.",
                   {"best_step": best.step, "best_val_loss": best.loss})


@dataclass
class ForgettingWatch:
    """Forgetting every `train.forgetting_every` steps, on the base's answers to the general reference."""

    reference: ReferenceSet
    warned: bool = False
    base_cache: list[Any] = field(default_factory=list)  # the base's hidden states at the targets, kept

    def measure(self, run: Any, step: int) -> ForgettingRecord:
        """The tuned model (as it is now) against the base on the reference."""
        tok = run.loaded.tokenizer
        d = divergence(run.model, self.reference.examples, run.cfg.train.micro_batch_size, tok.pad_token_id,
                       run.loaded.hardware.device, run.cfg.data.packing, base_cache=self.base_cache)
        return ForgettingRecord(step=step, base_loss=d.base_loss, tuned_loss=d.tuned_loss,
                                loss_increase_pct=d.loss_increase_pct, kl=d.kl)

    def judge(self, cfg: RunConfig, rec: ForgettingRecord) -> Finding | None:
        """Past the threshold (said once): a warning, and a stop when train.forgetting_stop is set."""
        limit = cfg.train.forgetting_warn_pct
        if self.warned or rec.loss_increase_pct is None or rec.loss_increase_pct <= limit:
            return None
        self.warned = True
        then = "stopping (train.forgetting_stop)" if cfg.train.forgetting_stop else \
            "set train.forgetting_stop=true to stop at this point"
        return Finding("forgetting", rec.step, f"step {rec.step}: the tuned model finds the base's own general "
                       f"answers {rec.loss_increase_pct:.1f}% less likely (over train.forgetting_warn_pct={limit:g}%)"
                       f", KL {rec.kl:.3f} - lower train.lr or the epochs, or mix general chats into the data; "
                       f"{then}.", {"loss_increase_pct": rec.loss_increase_pct, "kl": rec.kl})
