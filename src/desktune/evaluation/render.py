"""The eval result as tables on screen."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from desktune.evaluation.results import EvalResult, Score
from desktune.scoring.verdict import FORGOT, KEPT, SOME


def _ppl(s: Score | None) -> str:
    return "-" if s is None else f"{s.loss:.4f}  (ppl {s.perplexity:.2f})"


def scores_table(r: EvalResult) -> Table:
    """Held-out loss and perplexity, base vs tuned, and the 4-bit base against the 16-bit base."""
    t = Table(title=f"Held-out: {r.data}", show_header=True)
    t.add_column("model")
    t.add_column("loss per target token (perplexity)", justify="right", no_wrap=True)
    t.add_row("base", _ppl(r.base))
    if r.tuned is not None:
        label = "base + adapter" if r.tuned_16bit is None else "NF4 base + adapter (merge --into dequantized)"
        t.add_row(label, _ppl(r.tuned), style="green")
    if r.nf4_base is not None and r.bit16_base is not None:
        t.add_row("base, 16-bit", _ppl(r.bit16_base))
        t.add_row("base, 4-bit NF4", _ppl(r.nf4_base))
        t.add_row("cost of 4-bit loading", f"{r.nf4_penalty_pct:+.2f}% loss")
    if r.tuned_16bit is not None:  # a QLoRA run: its adapter on the NF4 base it trained on, and on the 16-bit base
        t.add_row("adapter on the 16-bit base (merge --into original)", _ppl(r.tuned_16bit))
    return t


VERDICT_STYLES = {KEPT: "bold green", SOME: "bold yellow", FORGOT: "bold red"}


def verdict_line(r: EvalResult) -> Text | None:
    """The forgetting verdict in one line: the level, the measure that decided it and its number."""
    v = r.verdict
    return None if v is None else Text(f"forgetting verdict: {v.sentence}", style=VERDICT_STYLES[v.level])


def forgetting_table(r: EvalResult) -> Table | None:
    """Loss increase on human-written text and on the reference, KL, and knowledge-probe retention."""
    f, h = r.forgetting, r.human
    if f is None and h is None:
        return None
    t = Table(title=f"Forgetting: {f.reference}" if f is not None else "Forgetting", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right", no_wrap=True)
    if h is not None:
        t.add_row(f"human-written text: base / tuned loss ({h.conversations} conversations)",
                  f"{h.base.loss:.4f} / {h.tuned.loss:.4f}")
        t.add_row("human-written text: loss increase", f"{h.loss_increase_pct:+.2f}%")
    if f is None:
        return t
    t.add_row("base loss on its own answers", f"{f.base.loss:.4f}")
    t.add_row("tuned loss on the base's answers", f"{f.tuned.loss:.4f}")
    t.add_row("loss increase on the base's answers", f"{f.loss_increase_pct:+.2f}%")
    t.add_row("mean KL(base || tuned) per token", f"{f.kl:.4f} nats")
    if f.probe is not None:
        p = f.probe
        t.add_row("knowledge probe: base right", f"{p.base_correct} / {p.questions}")
        t.add_row("knowledge probe: tuned right", f"{p.tuned_correct} / {p.questions}")
        t.add_row("knowledge kept (of the base's right answers)", f"{p.kept} / {p.base_correct} "
                  f"({100 * p.retention:.1f}%)")
    return t


def answers_table(r: EvalResult) -> Table | None:
    """Base vs tuned answers."""
    if not r.answers:
        return None
    t = Table(title="Answers: base vs tuned", show_lines=True, expand=True)
    t.add_column("prompt", ratio=1, style="bold")
    t.add_column("base", ratio=2)
    t.add_column("tuned", ratio=2, style="green")
    for a in r.answers:
        t.add_row(Text(a.prompt), Text(a.base), Text(a.tuned))  # a model's answer is text, never markup
    return t


def render(r: EvalResult) -> Group:
    """The forgetting verdict as the headline, every table of a result, then its notes."""
    parts: list[RenderableType] = [t for t in (verdict_line(r), scores_table(r), forgetting_table(r), answers_table(r))
                                   if t is not None]
    parts += [Text(f"note: {n}") for n in r.notes]  # a note is text: a path like data[v2].jsonl is not markup
    parts.append(f"[dim]evaluated in {r.seconds:.0f} s[/]")
    return Group(*parts)
