"""benchmarks/gpu_qlora.py --tiny: the GPU benchmark's own code path, on a tiny Llama on this machine's device."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_qlora.py"
pytest.importorskip("trl")  # the benchmark's extra (pip install -e ".[bench]")


@pytest.mark.slow
def test_gpu_qlora_tiny_runs_every_system_and_reports_what_desktune_chose():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--steps", "1", "--seq", "64"], capture_output=True,
                          text=True, env=env, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"RESULT speedup_vs_recipe=\S+ speedup_vs_trl_best=\S+ mem_ratio_vs_recipe=\S+ "
                        r"val_loss_delta_pct=\S+ mfu_pct=\S+ gpu=\".*\"", lines[-1]), lines[-1]
    chose = [line for line in lines if line.startswith("desktune chose micro-batch")]
    assert chose and "no memory fitting on this device" in chose[0]  # the CPU: fitting is off unless asked
