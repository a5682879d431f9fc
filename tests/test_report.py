"""The run report: the page as headless Chromium renders it (plots, diagnostics, eval numbers, a painted screenshot),
a run with no records, escaping, and the TensorBoard export."""

from __future__ import annotations

import math
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from desktune.errors import DesktuneError
from desktune.evaluation.results import Answer, EvalResult, Forgetting, HumanText, Probe, Score, write_result
from desktune.reporting.html import write_report
from desktune.reporting.svg import nice_ticks, tick_label
from desktune.reporting.tensorboard import write_tensorboard
from desktune.runs import EvalRecord, EventRecord, RecordWriter, RunDir, TrainRecord

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT_S = 60
PLOTS = ("loss", "lr", "grad_norm", "tokens_per_s", "memory")
STEPS = 30
EVAL_STEPS = (10, 20, 30)
DIAGNOSIS = "loss stopped falling after step 18: the learning rate may be too low"
ROOT = Path(__file__).resolve().parents[1]
CONFIG = "base_model: embedded\nrun_name: report-test\ntrain:\n  lr: 0.0002\n  max_steps: 30\n"
GIB = 1024**3


# --- a run folder, written by hand ------------------------------------------------------------------------------

def _train_record(step: int) -> TrainRecord:
    warm = min(1.0, step / 5)
    return TrainRecord(step=step, loss=0.4 + 2.0 * math.exp(-step / 9), lr=2e-4 * warm * (1 - step / 40),
                       grad_norm=1.5 + math.sin(step) * 0.4, tokens=2048, target_tokens=1500,
                       tokens_per_s=1800 + 150 * math.cos(step / 3), mem_bytes=int(1.1 * GIB) + step * 2**20,
                       step_s=1.1, epoch=step / STEPS, rss_bytes=int(1.3 * GIB) + step * 2**20,
                       peak_rss_bytes=int(1.4 * GIB) + step * 3 * 2**20, time_s=step * 1.1)


def _eval_result(run: RunDir) -> EvalResult:
    return EvalResult(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct", adapter=f"runs/{run.path.name}/adapter",
        data="held-out 10% of train.jsonl",
        base=Score(2.3456, 1200), tuned=Score(1.2345, 1200), bit16_base=Score(2.3456, 1200), nf4_base=Score(2.4, 1200),
        forgetting=Forgetting(reference="built-in general set", prompts=16, base=Score(0.8, 900), tuned=Score(0.9, 900),
                              kl=0.0321, probe=Probe(questions=20, base_correct=15, tuned_correct=14, kept=13)),
        human=HumanText(reference="human-written conversations (60)", conversations=60, base=Score(2.0, 2400),
                        tuned=Score(2.1, 2400), kl=0.05),
        answers=[Answer("What is the capital of France?", "Paris is the capital.", "Paris.")],
        seconds=12.3, notes=["the NF4 base was loaded with torchao"])


def make_run(root: Path, *, records: bool = True, evaluated: bool = True) -> RunDir:
    """A run folder as `desktune train` + `desktune eval` leave it: config, records, eval results."""
    run = RunDir(root / "report-test")
    run.path.mkdir(parents=True)
    run.config.write_text(CONFIG, encoding="utf-8")
    if records:
        writer = RecordWriter(run.metrics)
        for step in range(1, STEPS + 1):
            writer.write(_train_record(step))
            if step in EVAL_STEPS:
                writer.write(EvalRecord(step=step, val_loss=0.6 + 1.5 * math.exp(-step / 10), val_tokens=400))
            if step == 18:
                writer.write(EventRecord(message=DIAGNOSIS, name="diagnosis", step=18, data={"check": "loss_flat"}))
                writer.write(EventRecord(message="3 examples were cut to max_seq_len", name="truncation", step=18))
        writer.close()
    if evaluated:
        write_result(_eval_result(run), run.eval)
    return run


# --- reading the page back ---------------------------------------------------------------------------------------

class PlotParser(HTMLParser):
    """The plots of a page: per data-plot, its series (name -> coordinate pairs) and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: dict[str, dict] = {}
        self._plot: str | None = None  # the plot being read
        self._points: str | None = None  # the series whose circles are being counted

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg" and a.get("data-plot"):
            self._plot = a["data-plot"]
            self.plots[self._plot] = {"series": {}, "points": {}, "text": ""}
        elif self._plot and "series" in (a.get("class") or "").split():
            coords = a.get("points") if tag == "polyline" else a.get("d") if tag == "path" else None
            numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", coords or "")]
            self.plots[self._plot]["series"][a.get("data-series")] = list(zip(numbers[::2], numbers[1::2], strict=True))
        elif self._plot and "series-points" in (a.get("class") or "").split():
            self.plots[self._plot]["points"][a.get("data-series")] = 0
            self._points = a.get("data-series")
        elif self._plot and tag == "circle" and self._points:
            self.plots[self._plot]["points"][self._points] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._plot = None
        elif tag == "g":
            self._points = None

    def handle_data(self, data: str) -> None:
        if self._plot:
            self.plots[self._plot]["text"] += data


def plots_of(page: str) -> dict[str, dict]:
    parser = PlotParser()
    parser.feed(page)
    return parser.plots


def need_chromium() -> None:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return
    message = f"headless Chromium is not installed ({CHROMIUM}): run `bash scripts/test-tools.sh`"
    if os.environ.get("DESKTUNE_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def chromium(page: Path, profile: Path, *args: str) -> str:
    """Run headless Chromium on a local page; its stdout."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def png_colours(path: Path) -> int:
    """How many distinct colours a PNG holds (Pillow when there is one; else distinct bytes of its pixel data)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    try:
        from PIL import Image
    except ImportError:  # a coarse stand-in: a blank page's filtered scanlines hold one or two byte values
        chunks, pos = [], 8
        while pos < len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            chunks += [data[pos + 8:pos + 8 + length]] if kind == b"IDAT" else []
            pos += 12 + length
        return len(set(zlib.decompress(b"".join(chunks))))
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """The report of a full run, written."""
    root = tmp_path_factory.mktemp("report")
    run = make_run(root)
    page = write_report(run.path)
    return {"root": root, "run": run, "page": page, "html": page.read_text(encoding="utf-8")}


@pytest.fixture(scope="module")
def rendered(written) -> dict:
    """The written report as Chromium renders it: its DOM, and a screenshot."""
    need_chromium()
    root, page = written["root"], written["page"]
    png = root / "report.png"
    dom = chromium(page, root / "profile-dom", "--dump-dom")
    chromium(page, root / "profile-shot", f"--screenshot={png}", "--window-size=1200,3000", "--hide-scrollbars")
    if os.environ.get("DESKTUNE_WRITE_SCREENSHOT") == "1":
        shutil.copyfile(png, ROOT / "docs" / "report.png")
    return {**written, "dom": dom, "png": png}


# --- the tests ---------------------------------------------------------------------------------------------------

def test_the_report_is_written_atomically_to_the_run_folder(written):
    run, html = written["run"], written["html"]
    assert written["page"] == run.report and run.report.is_file()
    assert not list(run.path.glob(".*.tmp"))
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html  # self-contained
    assert "<style>" in html and "report-test" in html


def test_every_plot_draws_its_series_in_chromium(rendered):
    plots = plots_of(rendered["dom"])
    assert set(plots) == set(PLOTS)
    for name in PLOTS:
        series = plots[name]["series"]
        assert any(len(points) >= 2 for points in series.values()), (name, series)
        assert "no data" not in plots[name]["text"], name
        for x, y in (p for points in series.values() for p in points):
            assert 0 <= x <= 560 and 0 <= y <= 300, (name, x, y)  # inside the viewBox
    loss = plots["loss"]
    assert len(loss["series"]["train"]) == STEPS
    assert len(loss["series"]["validation"]) == len(EVAL_STEPS)
    assert loss["points"]["validation"] == len(EVAL_STEPS)
    assert "train" in loss["text"] and "validation" in loss["text"] and "Loss" in loss["text"]  # legend, title
    assert {"peak RSS", "in use"} <= set(plots["memory"]["series"])
    assert "GiB" in plots["memory"]["text"]


def test_the_page_shows_diagnostics_events_and_eval_numbers(rendered):
    dom = rendered["dom"]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert DIAGNOSIS in text and "loss_flat" in text
    assert "3 examples were cut to max_seq_len" in text
    for number in ("2.3456", "1.2345", "3.44", "+2.32%", "+12.50%", "0.0321", "86.7%", "13 of 15 kept", "+5.00%"):
        assert number in text, number
    assert "Forgetting verdict: some forgetting - knowledge kept 86.7%" in text
    assert "Paris is the capital." in text  # the answers table
    assert "max_steps: 30" in text  # the resolved config
    assert re.search(r"steps\s*30\b", text) and "final train loss" in text


def test_the_forgetting_verdict_heads_the_evaluation(written, tmp_path):
    html = written["html"]
    verdict = html.index('<p class="verdict some-forgetting">')
    assert html.index('id="eval"') < verdict < html.index("Held-out loss")
    assert "loss increase on human-written text" in html
    old = make_run(tmp_path)  # an eval.json written before the human text was measured still makes a page
    result = _eval_result(old)
    write_result(EvalResult(**{**result.__dict__, "human": None}), old.eval)
    page = write_report(old.path).read_text(encoding="utf-8")
    assert "some forgetting - knowledge kept 86.7%" in page and "not measured: human-text loss" in page
    assert "loss increase on human-written text" not in page


def test_the_screenshot_is_painted(rendered):
    png = rendered["png"]
    assert png.is_file() and png.stat().st_size > 10_000
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert (width, height) == (1200, 3000)
    assert png_colours(png) > 2


def test_a_run_without_records_says_no_data_in_every_plot(tmp_path):
    run = make_run(tmp_path, records=False, evaluated=False)
    plots = plots_of(write_report(run.path).read_text(encoding="utf-8"))
    assert set(plots) == set(PLOTS)
    for name in PLOTS:
        assert plots[name]["series"] == {} and "no data" in plots[name]["text"], name
    run.metrics.write_text("", encoding="utf-8")  # an empty record file too
    assert all("no data" in p["text"] for p in plots_of(write_report(run.path).read_text(encoding="utf-8")).values())


def test_text_from_the_run_is_escaped(tmp_path):
    run = make_run(tmp_path, records=False, evaluated=False)
    evil = "<script>alert(1)</script>"
    run.config.write_text(f"run_name: '{evil}'\n", encoding="utf-8")
    writer = RecordWriter(run.metrics)
    writer.write(EventRecord(message=f"diagnosis {evil}", name="diagnosis", step=1, data={"check": evil}))
    writer.write(EventRecord(message=f"note {evil}", name=evil))
    writer.close()
    run.demo_answers.write_text(f'[{{"prompt": "{evil}", "base": "{evil}", "tuned": "{evil}"}}]', encoding="utf-8")
    html = write_report(run.path, tmp_path / "out" / "page.html").read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert html.count("&lt;script&gt;") >= 7  # config, message, check, note, its name, three answers


def test_nice_ticks_and_labels():
    assert nice_ticks(1, 30) == [0, 5, 10, 15, 20, 25, 30]
    assert nice_ticks(0.42, 2.38) == [0, 0.5, 1, 1.5, 2, 2.5]
    assert nice_ticks(2e-5, 1.9e-4) == [0, 5e-5, 1e-4, 1.5e-4, 2e-4]
    assert nice_ticks(3, 3)[0] < 3 < nice_ticks(3, 3)[-1]
    assert [tick_label(v) for v in (0, 0.00012, 2.5, 12000, 1.5e-5)] == ["0", "1.2e-04", "2.5", "12000", "1.5e-05"]


def test_tensorboard_reads_back_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_run(tmp_path, evaluated=False)
    logdir = write_tensorboard(run.path, tmp_path / "tb")
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/val_loss"} <= tags
    assert {"memory/mem_mib", "memory/rss_mib", "memory/peak_rss_mib"} <= tags
    assert not any(t.startswith("memory/cuda") for t in tags)  # counters the run did not record are left out
    loss = acc.Scalars("train/loss")
    assert len(loss) == STEPS and [s.step for s in loss] == list(range(1, STEPS + 1))
    assert loss[0].value == pytest.approx(_train_record(1).loss)
    assert [s.step for s in acc.Scalars("eval/val_loss")] == list(EVAL_STEPS)


def test_tensorboard_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(DesktuneError, match="needs the tensorboard package") as caught:
        write_tensorboard(make_run(tmp_path).path, tmp_path / "tb")
    assert caught.value.fix == "pip install tensorboard"
