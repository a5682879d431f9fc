"""What desktune prints into a pipe or a file (whole lines, whole names) and into a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from desktune.console import PIPE_WIDTH, make_console
from desktune.memory.catalog import ALIASES, CATALOG
from desktune.memory.render import catalog
from desktune.runs import RunDir, TrainRecord
from desktune.training.monitor import Monitor


class _Tty(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


def test_a_pipe_gets_whole_lines_and_wide_tables():
    console = make_console(file=io.StringIO())
    long = " ".join(f"word{i}" for i in range(60))  # ~400 characters, wrapped at 80 before
    console.print(long)
    assert console.file.getvalue() == long + "\n"
    assert console.width >= PIPE_WIDTH


def test_a_terminal_keeps_its_own_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    console = make_console(file=_Tty())
    assert console.is_terminal and console.width == 80 and not console.soft_wrap


def test_plan_list_into_a_pipe_shows_every_name_whole_on_its_row():
    """`desktune plan --list | grep qwen` (a terminal's stdin gave rich its 80 columns before: no stdin here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run([sys.executable, "-m", "desktune", "plan", "--list"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=120, check=True)
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") > 2}
    assert set(CATALOG) <= set(rows), done.stdout
    assert "qwen2" in rows["qwen2.5-7b"] and "…" not in done.stdout
    assert any("llama-3-8b" in line and "llama-3.1-8b" in line for line in done.stdout.splitlines())


def test_plan_list_fits_an_80_column_terminal_without_cutting_a_name():
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    console.print(catalog())
    text = console.file.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert all(name in text for name in [*CATALOG, *ALIASES])


def _step(step: int) -> TrainRecord:
    return TrainRecord(step=step, loss=3.0 - step / 100, lr=1e-4, grad_norm=1.0, tokens=100, target_tokens=50,
                       tokens_per_s=1234.0, mem_bytes=1 << 30, step_s=0.1, epoch=0.1)


def _train(monitor_console: Console, tmp_path, steps: int = 60) -> None:
    """A run's progress as the loop reports it: validations every 20 steps and one after the last step."""
    with Monitor(RunDir(tmp_path), total_steps=steps, console=monitor_console) as mon:
        for step in range(1, steps + 1):
            mon.step(_step(step))
            if step % 20 == 0 and step != steps:
                mon.eval(step, 2.5 - step / 100, 99)
        mon.eval(steps, 1.2345, 99)


def test_progress_into_a_pipe_is_whole_lines_with_the_last_validation(tmp_path):
    console = make_console(file=io.StringIO())
    _train(console, tmp_path)
    lines = console.file.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("train ")]
    assert [p.split()[1] for p in progress] == ["1/60", *(f"{n}/60" for n in range(3, 61, 3))]
    assert progress[-1].startswith("train 60/60  loss 2.4000") and "val 2.1000" in progress[-1]
    assert lines[-1] == "step 60: validation loss 1.2345 (99 target tokens)"
    assert all("\x1b" not in line and "━" not in line for line in lines)  # no bar drawn into a file


def test_the_progress_bar_ends_showing_the_last_validation(tmp_path):
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    _train(console, tmp_path)
    bars = [line for line in console.file.getvalue().split("\n") if "60/60" in line]
    assert bars and "val 1.2345" in bars[-1]
