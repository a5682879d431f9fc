"""What the loop watches between steps: the best validation (its adapter kept in best/), early stopping on
validation loss with patience, and forgetting measured every N steps (the base's answers to the general reference
and conversations written by people), judged by the forgetting verdict, which warns or stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from desktune.config import RunConfig
from desktune.runs import EvalRecord, ForgettingRecord, Record, records_of
from desktune.runs.diagnostics import Finding
from desktune.scoring.divergence import divergence
from desktune.scoring.forgetting import ReferenceSet
from desktune.scoring.human import HumanHeldout, HumanSet, human_heldout, human_set
from desktune.scoring.verdict import KEPT, LIMITS, Measures, verdict, with_loss_limit

# the live verdict weighs what is cheap to measure between steps; the knowledge probe (generation) is eval's
WATCH_LIMITS = tuple(lim for lim in LIMITS if lim.key != "knowledge_kept_pct")


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
    """Forgetting every `train.forgetting_every` steps: on the base's answers to the general reference (the record)
    and on the shipped human-written conversations (kept in `human`, weighed by the verdict)."""

    reference: ReferenceSet
    warned: bool = False
    base_cache: list[Any] = field(default_factory=list)  # the base's hidden states at the targets, kept
    human_set: HumanSet | None = None  # encoded on the first measurement
    human_cache: list[Any] = field(default_factory=list)
    human: HumanHeldout | None = None  # the latest measurement on the human conversations

    def measure(self, run: Any, step: int) -> ForgettingRecord:
        """The tuned model (as it is now) against the base on the reference and on the human conversations."""
        tok, cfg, device = run.loaded.tokenizer, run.cfg, run.loaded.hardware.device
        d = divergence(run.model, self.reference.examples, cfg.train.micro_batch_size, tok.pad_token_id,
                       device, cfg.data.packing, base_cache=self.base_cache)
        self.human_set = self.human_set or human_set(tok, cfg.data.max_seq_len)
        self.human = human_heldout(run.model, tok, micro_batch_size=cfg.train.micro_batch_size, device=device,
                                   max_seq_len=cfg.data.max_seq_len, packing=cfg.data.packing, human=self.human_set,
                                   base_cache=self.human_cache)
        return ForgettingRecord(step=step, base_loss=d.base_loss, tuned_loss=d.tuned_loss,
                                loss_increase_pct=d.loss_increase_pct, kl=d.kl)

    def measures(self, rec: ForgettingRecord) -> Measures:
        """The verdict's measures at this step (the human text's when it had a target token)."""
        h = self.human.divergence if self.human is not None else None
        return Measures(human_loss_pct=h.loss_increase_pct if h is not None and h.target_tokens else None,
                        kl=rec.kl, base_answers_loss_pct=rec.loss_increase_pct)

    def judge(self, cfg: RunConfig, rec: ForgettingRecord) -> Finding | None:
        """A verdict other than kept (said once): a warning, and a stop when train.forgetting_stop is set. Both loss
        measures count as kept up to train.forgetting_warn_pct."""
        m = self.measures(rec)
        v = verdict(m, with_loss_limit(cfg.train.forgetting_warn_pct, WATCH_LIMITS))
        if self.warned or v is None or v.level == KEPT:
            return None
        self.warned = True
        then = "stopping (train.forgetting_stop)" if cfg.train.forgetting_stop else \
            "set train.forgetting_stop=true to stop at this point"
        shown = ", ".join(f"{label} {value}" for label, value in (
            ("human-written text", _pct(m.human_loss_pct)), ("the base's answers", _pct(m.base_answers_loss_pct)),
            ("KL", "n/a" if m.kl is None else f"{m.kl:.3f}")))
        return Finding("forgetting", rec.step, f"step {rec.step}: forgetting verdict {v.sentence}; {shown} (the "
                       f"knowledge probe runs in `desktune eval`). Lower train.lr or the epochs, or mix general "
                       f"chats into the data; {then}.",
                       {"verdict": v.level, "decided_by": v.measure, "human_loss_pct": m.human_loss_pct,
                        "loss_increase_pct": rec.loss_increase_pct, "kl": rec.kl})


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"
