"""The forgetting verdict: one word that no single measure can hide (torch-free: eval, the report, the live watch
and the benchmarks all read it).

Four measures, each with a limit up to which it counts as kept and one past which it means forgotten:
  human-text loss    mean assistant-token loss on conversations written by people (scoring/human.py), % over base
  knowledge kept     share of the base's right knowledge-probe answers the tuned model still gets right, %
  KL                 mean KL(base || tuned) per token on the base's answers to the general reference, nats
  base-answer loss   the tuned model's loss on the base's own answers to the general reference, % over base
The worst measure decides (how far past its kept limit, as a share of the way to its forgot limit), and the
sentence names it and its number. The base-answer loss alone can look fine when the model forgot: replay trains
on exactly that kind of text (issue 33: -7.1% there while the probe kept 58% and human text rose 26%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

KEPT, SOME, FORGOT = "kept", "some forgetting", "forgot"

HUMAN_LOSS_KEPT_PCT = 10.0  # the goal (issue 33): people's text at most 10% less likely than under the base
HUMAN_LOSS_FORGOT_PCT = 20.0  # twice the goal; the fictional-facts run that lost 42% of the probe rose 26.3%
KNOWLEDGE_KEPT_PCT = 90.0  # the goal: at least 90% of the base's right probe answers still right
KNOWLEDGE_FORGOT_PCT = 75.0  # a quarter of what the base knew gone (that fictional-facts run kept 58.4%)
KL_KEPT_NATS = 0.30  # the demo's persona run, a deliberate change of style, measured 0.27 nats a token
KL_FORGOT_NATS = 0.60  # the fictional-facts run that forgot measured 0.75
BASE_ANSWERS_KEPT_PCT = 10.0  # train.forgetting_warn_pct's default, the warning this measure always had
BASE_ANSWERS_FORGOT_PCT = 25.0  # replay trains on text of this kind, so this rises last: past 25% it is severe


@dataclass(frozen=True)
class Limit:
    """Where one measure stops counting as kept and where it means forgotten."""

    key: str  # its field in Measures
    label: str  # how a sentence names it
    kept: float
    forgot: float
    higher_is_better: bool = False

    def severity(self, value: float) -> float:
        """<= 0 within the kept limit, 1 at the forgot limit, above 1 past it (a non-finite value: infinite)."""
        if not math.isfinite(value):
            return math.inf
        past = self.kept - value if self.higher_is_better else value - self.kept
        return past / max(abs(self.forgot - self.kept), 1e-9)

    def show(self, value: float) -> str:
        """The value as the sentence writes it."""
        if not math.isfinite(value):
            return "n/a"
        if self.key == "kl":
            return f"{value:.3f} nats/token"
        return f"{value:.1f}%" if self.higher_is_better else f"{value:+.1f}%"

    def bounds(self) -> str:
        """The two limits in words."""
        if self.higher_is_better:
            return f"kept >= {self.show(self.kept)}, forgot < {self.show(self.forgot)}"
        return f"kept <= {self.show(self.kept)}, forgot > {self.show(self.forgot)}"


LIMITS = (
    Limit("human_loss_pct", "human-text loss", HUMAN_LOSS_KEPT_PCT, HUMAN_LOSS_FORGOT_PCT),
    Limit("knowledge_kept_pct", "knowledge kept", KNOWLEDGE_KEPT_PCT, KNOWLEDGE_FORGOT_PCT, higher_is_better=True),
    Limit("kl", "KL(base || tuned)", KL_KEPT_NATS, KL_FORGOT_NATS),
    Limit("base_answers_loss_pct", "loss on the base's answers", BASE_ANSWERS_KEPT_PCT, BASE_ANSWERS_FORGOT_PCT),
)


@dataclass(frozen=True)
class Measures:
    """The four measures (None: not measured)."""

    human_loss_pct: float | None = None
    knowledge_kept_pct: float | None = None
    kl: float | None = None
    base_answers_loss_pct: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The level, the measure that decided it and its value, and one sentence saying so."""

    level: str
    measure: str  # the deciding measure's label
    value: float
    sentence: str
    levels: dict[str, str] = field(default_factory=dict)  # each measured measure's own level, by label
    missing: tuple[str, ...] = ()  # labels of the measures not measured

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _level(severity: float) -> str:
    return KEPT if severity <= 0 else SOME if severity <= 1 else FORGOT


def with_loss_limit(pct: float, limits: tuple[Limit, ...] = LIMITS) -> tuple[Limit, ...]:
    """The limits with both loss measures kept only up to `pct` % (train.forgetting_warn_pct); forgot no lower."""
    return tuple(replace(lim, kept=pct, forgot=max(lim.forgot, pct)) if lim.key.endswith("loss_pct") else lim
                 for lim in limits)


def verdict(measures: Measures, limits: tuple[Limit, ...] = LIMITS) -> Verdict | None:
    """The worst measure's level (None when nothing was measured); the sentence names that measure."""
    measured = [(lim, getattr(measures, lim.key)) for lim in limits if getattr(measures, lim.key) is not None]
    if not measured:
        return None
    worst, value = max(measured, key=lambda m: m[0].severity(m[1]))  # the first of equals: the list's order
    level = _level(worst.severity(value))
    missing = tuple(lim.label for lim in limits if getattr(measures, lim.key) is None)
    sentence = f"{level} - {worst.label} {worst.show(value)} ({worst.bounds()})"
    if level == KEPT:
        sentence = f"{KEPT} - every measure within its limit; the closest: {worst.label} {worst.show(value)} " \
                   f"({worst.bounds()})"
    if missing:
        sentence += f"; not measured: {', '.join(missing)}"
    return Verdict(level=level, measure=worst.label, value=value, sentence=sentence,
                   levels={lim.label: _level(lim.severity(v)) for lim, v in measured}, missing=missing)
