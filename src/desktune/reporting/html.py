"""The run report: one self-contained HTML page (inline CSS and SVG, no scripts, no external URLs)."""

from __future__ import annotations

import json
import math
import statistics
from html import escape
from pathlib import Path

from desktune.errors import DesktuneError
from desktune.evaluation.results import EvalResult, Score, read_result
from desktune.reporting.svg import Series, line_plot
from desktune.runs.atomic import write_text_atomically
from desktune.runs.diagnostics import DIAGNOSIS
from desktune.runs.layout import RunDir
from desktune.runs.records import (
    EvalRecord,
    EventRecord,
    ForgettingRecord,
    Record,
    TrainRecord,
    read_records,
    records_of,
)
from desktune.units import human_bytes

MIB, GIB = 1024**2, 1024**3
# the memory plot's series: label and TrainRecord field, drawn where the run recorded them
MEMORY_FIELDS = (("peak RSS", "peak_rss_bytes"), ("CUDA peak", "cuda_peak_bytes"), ("in use", "mem_bytes"))

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       padding: 0 16px; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } th, td { border: 1px solid #ddd; padding: 4px 10px;
       text-align: left; vertical-align: top; } th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.answers td { white-space: pre-wrap; max-width: 380px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
svg.plot { border: 1px solid #e0e0e0; background: #fff; font-family: inherit; }
svg .plot-title { font-size: 14px; font-weight: 600; fill: #222; }
svg .tick, svg .legend-label, svg .axis-label { font-size: 11px; fill: #444; }
svg .grid { stroke: #ececec; } svg .axis { stroke: #555; }
svg .frame { fill: #fafafa; stroke: #e0e0e0; } svg .no-data { font-size: 18px; fill: #888; }
pre { background: #f7f7f7; border: 1px solid #e0e0e0; padding: 12px; overflow-x: auto; }
p.none { color: #777; font-style: italic; }
p.verdict { padding: 8px 12px; border-left: 6px solid; } p.kept { border-color: #2e7d32; background: #edf7ed; }
p.some-forgetting { border-color: #f9a825; background: #fff8e1; }
p.forgot { border-color: #c62828; background: #fdecea; }
"""


def _fmt(value: float | None, spec: str = ".4f", suffix: str = "") -> str:
    """A number for the page; "n/a" for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def _table(headers: list[str], rows: list[list[str]], cls: str = "", align: bool = True) -> str:
    """An HTML table; cells are escaped here, and (with `align`) cells that look numeric are right-aligned."""
    def cell(text: str) -> str:
        numeric = align and text.replace(".", "", 1).replace("%", "").lstrip("+-").isdigit()
        return f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _none(what: str = "none") -> str:
    return f'<p class="none">{escape(what)}</p>'


def _summary(train: list[TrainRecord], evals: list[EvalRecord]) -> str:
    """Steps, final train loss, first and last validation loss, median tokens/s, peak memory."""
    losses = [r.loss for r in train if r.loss is not None]
    vals = [r for r in evals if r.val_loss is not None]
    speeds = [r.tokens_per_s for r in train if r.tokens_per_s is not None and math.isfinite(r.tokens_per_s)]
    rows = [["steps", str(train[-1].step) if train else "n/a"],
            ["final train loss", _fmt(losses[-1] if losses else None)],
            ["first validation loss", f"{_fmt(vals[0].val_loss)} (step {vals[0].step})" if vals else "n/a"],
            ["last validation loss", f"{_fmt(vals[-1].val_loss)} (step {vals[-1].step})" if vals else "n/a"],
            ["tokens/s (median)", _fmt(statistics.median(speeds) if speeds else None, ".0f")]]
    for label, name in MEMORY_FIELDS:
        values = [getattr(r, name) for r in train if getattr(r, name) is not None]
        if values:
            rows.append([f"peak memory ({label})", human_bytes(max(values))])
    if not any(r[0].startswith("peak memory") for r in rows):
        rows.append(["peak memory", "n/a"])
    return _table(["", "value"], rows, "summary", align=False)


def _memory_series(train: list[TrainRecord]) -> tuple[list[Series], str]:
    """The memory counters the run recorded, in MiB, or GiB once any of them reaches 1 GiB."""
    found = [(label, [(r.step, getattr(r, name)) for r in train if getattr(r, name) is not None])
             for label, name in MEMORY_FIELDS]
    found = [(label, pts) for label, pts in found if pts]
    top = max((v for _, pts in found for _, v in pts), default=0)
    unit, div = ("GiB", GIB) if top >= GIB else ("MiB", MIB)
    return [Series(label, [(x, v / div) for x, v in pts]) for label, pts in found], unit


def _plots(train: list[TrainRecord], evals: list[EvalRecord], forgetting: list[ForgettingRecord]) -> str:
    """The five plots: loss (train and validation), learning rate, gradient norm, throughput, memory; and
    forgetting during training when the run measured it (train.forgetting_every)."""
    def per_step(name: str) -> list[tuple[float, float]]:
        return [(r.step, getattr(r, name)) for r in train if getattr(r, name) is not None]
    val = Series("validation", [(r.step, r.val_loss) for r in evals if r.val_loss is not None], dashed=True)
    memory, unit = _memory_series(train)
    plots = [line_plot("loss", "Loss", [Series("train", per_step("loss")), val], y_label="loss"),
             line_plot("lr", "Learning rate", [Series("lr", per_step("lr"))], y_label="lr"),
             line_plot("grad_norm", "Gradient norm", [Series("grad norm", per_step("grad_norm"))],
                       y_label="grad norm"),
             line_plot("tokens_per_s", "Throughput", [Series("tokens/s", per_step("tokens_per_s"))],
                       y_label="tokens/s"),
             line_plot("memory", "Memory", memory, y_label=unit)]
    if forgetting:
        plots.append(line_plot("forgetting", "Forgetting (reference loss increase)", [Series(
            "loss increase %", [(r.step, r.loss_increase_pct) for r in forgetting if r.loss_increase_pct is not None])],
            y_label="%"))
    return f'<div class="plots">{"".join(plots)}</div>'


def _step(event: EventRecord) -> str:
    return "" if event.step is None else str(event.step)


def _events(events: list[EventRecord]) -> str:
    """Diagnoses (step, check, message), then the other events (step, name, message); "none" when empty."""
    diagnoses = [e for e in events if e.name == DIAGNOSIS]
    notes = [e for e in events if e.name != DIAGNOSIS]
    diag = (_table(["step", "check", "message"], [[_step(e), str(e.data.get("check", "")), e.message]
                                                  for e in diagnoses], "diagnostics") if diagnoses else _none())
    other = (_table(["step", "event", "message"], [[_step(e), e.name, e.message] for e in notes], "events")
             if notes else _none())
    return _section("diagnostics", "Diagnostics", diag) + _section("events", "Events", other)


def _score_row(label: str, score: Score | None) -> list[str]:
    if score is None:
        return [label, "n/a", "n/a", "n/a"]
    return [label, _fmt(score.loss), _fmt(score.perplexity, ".2f"), str(score.target_tokens)]


def _verdict(result: EvalResult) -> str:
    """The forgetting verdict, one line: its level, the measure that decided it and that measure's number."""
    v = result.verdict
    if v is None:
        return ""
    return (f'<p class="verdict {v.level.replace(" ", "-")}"><strong>Forgetting verdict:</strong> '
            f"{escape(v.sentence)}</p>")


def _forgetting(result: EvalResult) -> str:
    """Loss increase on human-written text and on the base's own answers, KL, and the knowledge probe's retention."""
    f, h = result.forgetting, result.human
    if f is None and h is None:
        return _none("forgetting: not measured")
    rows = []
    if h is not None:
        rows += [["human-written text", f"{h.reference}: loss {_fmt(h.base.loss)} (base) / {_fmt(h.tuned.loss)} "
                  "(tuned)"], ["loss increase on human-written text", _fmt(h.loss_increase_pct, "+.2f", "%")]]
    if f is not None:
        rows += [["reference", f.reference],
                 ["loss increase on the base's answers", _fmt(f.loss_increase_pct, "+.2f", "%")],
                 ["KL(base || tuned), nats/token", _fmt(f.kl)]]
    if f is not None and f.probe is not None:
        p = f.probe
        rows += [["probe retention", f"{_fmt(100 * p.retention, '.1f', '%')} ({p.kept} of {p.base_correct} kept)"],
                 ["probe correct (base / tuned)", f"{p.base_correct} / {p.tuned_correct} of {p.questions}"]]
    return "<h3>Forgetting</h3>" + _table(["", "value"], rows, "forgetting", align=False)


def _eval(result: EvalResult) -> str:
    """The forgetting verdict first; held-out loss and perplexity base vs tuned (and base 16-bit vs NF4), the NF4
    penalty, forgetting, notes."""
    facts = [["base model", result.base_model], ["adapter", result.adapter or "none"], ["data", result.data],
             ["NF4 penalty", _fmt(result.nf4_penalty_pct, "+.2f", "%")], ["seconds", _fmt(result.seconds, ".1f")]]
    scores = [_score_row("base", result.base), _score_row("tuned", result.tuned)]
    if result.bit16_base is not None or result.nf4_base is not None:
        scores += [_score_row("base, 16-bit", result.bit16_base), _score_row("base, 4-bit NF4", result.nf4_base)]
    if result.tuned_16bit is not None:  # a QLoRA run's adapter on the original 16-bit weights
        scores.append(_score_row("tuned, adapter on the 16-bit base", result.tuned_16bit))
    notes = "".join(f"<li>{escape(n)}</li>" for n in result.notes)
    return (_verdict(result) + _table(["", "value"], facts, "eval-facts", align=False) + "<h3>Held-out loss</h3>"
            + _table(["model", "loss", "perplexity", "target tokens"], scores, "eval-scores")
            + _forgetting(result) + (f"<h3>Notes</h3><ul>{notes}</ul>" if notes else ""))


def _answers(answers: list[tuple[str, str, str]]) -> str:
    if not answers:
        return _none()
    return _table(["prompt", "base", "tuned"], [list(a) for a in answers], "answers")


def _demo_answers(path: Path) -> list[tuple[str, str, str]]:
    """The (prompt, base, tuned) triples `desktune demo` wrote."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        return [(str(a["prompt"]), str(a["base"]), str(a["tuned"])) for a in items]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DesktuneError(f"not the answers file desktune demo writes ({e})", where=str(path),
                            fix="run `desktune demo` again, or delete the file to leave the answers out") from e


def _results(run: RunDir) -> str:
    """The evaluation section (when eval.json exists) and the answers: eval's, else the demo's."""
    if run.eval.is_file():
        result = read_result(run.eval)
        answers = [(a.prompt, a.base, a.tuned) for a in result.answers]
        body = _section("eval", "Evaluation", _eval(result))
    else:
        answers = _demo_answers(run.demo_answers) if run.demo_answers.is_file() else []
        body = _section("eval", "Evaluation", _none(f"not evaluated (run `desktune eval {run.path}`)"))
    return body + _section("answers", "Answers: base vs tuned", _answers(answers))


def render_report(run_dir: Path) -> str:
    """The report page of a run folder, as HTML text."""
    run = RunDir(Path(run_dir))
    records: list[Record] = read_records(run.metrics) if run.metrics.is_file() else []
    train, evals = records_of(records, TrainRecord), records_of(records, EvalRecord)
    config = run.config.read_text(encoding="utf-8") if run.config.is_file() else ""
    name = escape(run.path.resolve().name)
    return "".join([
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>desktune run {name}</title>',
        f"<style>{CSS}</style></head><body>",
        f"<h1>desktune run <code>{name}</code></h1>",
        _section("summary", "Summary", _summary(train, evals)),
        _section("plots", "Training", _plots(train, evals, records_of(records, ForgettingRecord))),
        _events(records_of(records, EventRecord)),
        _results(run),
        _section("config", "Resolved config", f"<pre>{escape(config)}</pre>" if config else _none()),
        "</body></html>\n"])


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report page atomically (to the run's report.html unless `out` is given); returns its path."""
    path = Path(out) if out is not None else RunDir(Path(run_dir)).report
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, render_report(run_dir))
    return path
