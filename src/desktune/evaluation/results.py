"""The results of `desktune eval`, typed: what eval.json holds, written and read here only (torch-free)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from desktune.errors import DesktuneError
from desktune.runs.atomic import write_text_atomically
from desktune.scoring.verdict import Measures, Verdict, verdict

if TYPE_CHECKING:  # scoring.human needs torch; this module must not
    from desktune.scoring.human import HumanHeldout


@dataclass(frozen=True)
class Score:
    """Mean cross-entropy per target token over a set of examples, and its perplexity."""

    loss: float
    target_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if math.isfinite(self.loss) and self.loss < 700 else math.inf


@dataclass(frozen=True)
class Probe:
    """The general-knowledge probe: questions with one right answer, greedy answers of base and tuned."""

    questions: int
    base_correct: int
    tuned_correct: int
    kept: int  # of the questions the base answers right, how many the tuned model still answers right

    @property
    def retention(self) -> float:
        """Share of the base's right answers the tuned model keeps (1.0 when the base knows none)."""
        return self.kept / self.base_correct if self.base_correct else 1.0


@dataclass(frozen=True)
class Forgetting:
    """How much general ability the adapter cost, on a reference the base model answered itself."""

    reference: str  # what the reference was (the built-in set or the user's file)
    prompts: int
    base: Score  # the base model's loss on its own greedy answers
    tuned: Score  # the tuned model's loss on those same answers
    kl: float  # mean KL(base || tuned) of next-token distributions over the answers' tokens, in nats
    probe: Probe | None = None

    @property
    def loss_increase_pct(self) -> float:
        """How much less likely the tuned model finds the base's own answers: increase of mean token loss, %."""
        return 100.0 * (self.tuned.loss - self.base.loss) / self.base.loss if self.base.loss > 0 else 0.0


@dataclass(frozen=True)
class HumanText:
    """Conversations written by people (shipped, held out from any training): assistant-turn loss base vs tuned."""

    reference: str
    conversations: int
    base: Score
    tuned: Score
    kl: float  # mean KL(base || tuned) per target token, in nats

    @classmethod
    def of(cls, h: HumanHeldout) -> HumanText:
        """The result of scoring.human.human_heldout, as eval.json keeps it."""
        d = h.divergence
        return cls(reference=h.name, conversations=h.conversations, base=Score(d.base_loss, d.target_tokens),
                   tuned=Score(d.tuned_loss, d.target_tokens), kl=d.kl)

    @property
    def loss_increase_pct(self) -> float:
        """How much less likely the tuned model finds what people wrote than the base does: mean token loss, % (NaN
        when a loss is not finite)."""
        if not (math.isfinite(self.base.loss) and math.isfinite(self.tuned.loss)):
            return math.nan
        return 100.0 * (self.tuned.loss - self.base.loss) / self.base.loss if self.base.loss > 0 else 0.0


@dataclass(frozen=True)
class Answer:
    """One prompt answered by the base and by the tuned model."""

    prompt: str
    base: str
    tuned: str


@dataclass
class EvalResult:
    """Everything one `desktune eval` measured."""

    base_model: str
    adapter: str | None
    data: str  # where the held-out examples came from
    base: Score  # held-out loss of the base model
    tuned: Score | None  # held-out loss of base + adapter (None without an adapter)
    bit16_base: Score | None = None  # the held-out loss of the base loaded in 16 bit (its dtype) ...
    nf4_base: Score | None = None  # ... and loaded in 4-bit NF4: what 4-bit loading costs
    # a QLoRA run's adapter on the original 16-bit base (`merge --into original`); `tuned` is it on the NF4 base
    # it trained against, which `merge --into dequantized` reproduces
    tuned_16bit: Score | None = None
    forgetting: Forgetting | None = None
    human: HumanText | None = None  # absent from eval.json files written before it was measured
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part: held_out, forgetting, answers, nf4
    notes: list[str] = field(default_factory=list)

    @property
    def nf4_penalty_pct(self) -> float | None:
        """How much worse the NF4 base scores than the 16-bit base on the held-out data, in %."""
        if self.nf4_base is None or self.bit16_base is None or self.bit16_base.loss <= 0:
            return None
        return 100.0 * (self.nf4_base.loss - self.bit16_base.loss) / self.bit16_base.loss

    @property
    def measures(self) -> Measures:
        """What the forgetting verdict weighs, as far as this eval measured it."""
        f, h = self.forgetting, self.human
        probe = f.probe if f is not None else None
        return Measures(human_loss_pct=h.loss_increase_pct if h is not None and h.base.target_tokens else None,
                        knowledge_kept_pct=100.0 * probe.retention if probe is not None else None,
                        kl=f.kl if f is not None else None,
                        base_answers_loss_pct=f.loss_increase_pct if f is not None else None)

    @property
    def verdict(self) -> Verdict | None:
        """The forgetting verdict (scoring/verdict.py): the worst of the measures decides; None without any."""
        return verdict(self.measures)


def _score(obj: dict[str, Any] | None) -> Score | None:
    if obj is None:
        return None
    return Score(loss=math.nan if obj["loss"] is None else obj["loss"], target_tokens=obj["target_tokens"])


def _with_derived(obj: Any) -> Any:
    """asdict plus the derived numbers a reader wants (perplexity, % increase, retention)."""
    out = asdict(obj)
    if isinstance(obj, EvalResult):
        out["nf4_penalty_pct"] = obj.nf4_penalty_pct
        for key in ("base", "tuned", "bit16_base", "nf4_base", "tuned_16bit"):
            if getattr(obj, key) is not None:
                out[key]["perplexity"] = getattr(obj, key).perplexity
        if obj.forgetting is not None:
            f = obj.forgetting
            out["forgetting"]["loss_increase_pct"] = f.loss_increase_pct
            if f.probe is not None:
                out["forgetting"]["probe"]["retention"] = f.probe.retention
        if obj.human is not None:
            out["human"]["loss_increase_pct"] = obj.human.loss_increase_pct
        v = obj.verdict
        out["verdict"] = None if v is None else v.to_dict()
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_result(result: EvalResult, path: Path) -> None:
    """Write eval.json atomically (non-finite numbers as null)."""
    write_text_atomically(path, json.dumps(_clean(_with_derived(result)), indent=2, ensure_ascii=False) + "\n")


def _human(obj: dict[str, Any] | None) -> HumanText | None:
    if obj is None:
        return None
    return HumanText(reference=obj["reference"], conversations=obj["conversations"], base=_score(obj["base"]),
                     tuned=_score(obj["tuned"]), kl=math.nan if obj["kl"] is None else obj["kl"])


def read_result(path: Path) -> EvalResult:
    """Read an eval.json written by `write_result` (any version: parts measured later are None in older files)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        forgetting = obj.get("forgetting")
        if forgetting is not None:
            probe = forgetting.get("probe")
            forgetting = Forgetting(
                reference=forgetting["reference"], prompts=forgetting["prompts"], base=_score(forgetting["base"]),
                tuned=_score(forgetting["tuned"]), kl=forgetting["kl"],
                probe=None if probe is None else Probe(**{k: probe[k] for k in
                                                          ("questions", "base_correct", "tuned_correct", "kept")}))
        return EvalResult(
            base_model=obj["base_model"], adapter=obj.get("adapter"), data=obj["data"], base=_score(obj["base"]),
            tuned=_score(obj.get("tuned")), bit16_base=_score(obj.get("bit16_base")),
            nf4_base=_score(obj.get("nf4_base")), tuned_16bit=_score(obj.get("tuned_16bit")), forgetting=forgetting,
            human=_human(obj.get("human")),
            answers=[Answer(**a) for a in obj.get("answers", [])], seconds=obj.get("seconds", 0.0),
            timings=dict(obj.get("timings", {})),
            notes=list(obj.get("notes", [])))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DesktuneError(f"not an eval result desktune wrote ({e})", where=str(path),
                            fix="run `desktune eval RUN_DIR` again to rewrite it") from e
