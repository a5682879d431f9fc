"""Ctrl-C, SIGTERM or `desktune stop` from another process, sent to a real `desktune train` process: it finishes
the step, saves a checkpoint, exits 130 and prints the command that resumes it; that command, run as printed, ends
the run at its full length."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from desktune.runs import RunDir, TrainRecord, read_records, records_of
from tests.tiny import tiny_config

STEPS = 150


def _desktune(*args: str) -> list[str]:
    return [sys.executable, "-m", "desktune", *args]


def _wait_for_steps(metrics: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until the run has recorded a few optimizer steps (the process is inside the training loop)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if metrics.is_file() and sum(json.loads(line).get("type") == "train"
                                     for line in metrics.read_text().splitlines() if line.strip()) >= 3:
            return
        time.sleep(0.1)
    pytest.fail(f"the run recorded no steps in {timeout} s (exit code {proc.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, "desktune stop"])
def test_a_signal_then_the_printed_resume_command(tiny_model_dir, tmp_path, sig):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path, run_name="sig",
                                                 train={"max_steps": STEPS})))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(_desktune("train", str(config)), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run = RunDir(tmp_path / "runs" / "sig")
    _wait_for_steps(run.metrics, proc)
    if sig == "desktune stop":  # from another process: the run folder's STOP file
        asked = subprocess.run(_desktune("stop", str(run.path)), env=env, capture_output=True, text=True, timeout=120)
        assert asked.returncode == 0 and "asked the run to stop" in asked.stdout, asked.stderr
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped after step" in err
    resume = next(line for line in err.splitlines() if line.startswith("resume with: "))[len("resume with: "):]
    stopped = records_of(read_records(run.metrics), TrainRecord)[-1].step
    assert 3 <= stopped < STEPS and run.latest_checkpoint() == run.checkpoint(stopped)

    argv = shlex.split(resume)
    assert argv[:2] == ["desktune", "train"]
    done = subprocess.run(_desktune(*argv[1:]), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [r.step for r in records_of(read_records(run.metrics), TrainRecord)]
    assert steps == list(range(1, STEPS + 1))  # every step once: the record was cut back at the checkpoint
    assert json.loads((run.adapter / "desktune.json").read_text())["step"] == STEPS


def test_desktune_stop_on_a_folder_that_is_not_a_run(tmp_path):
    done = subprocess.run(_desktune("stop", str(tmp_path)), env={**os.environ, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "not a run folder" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "STOP").exists()
