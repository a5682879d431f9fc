"""SIGKILL real `desktune train` processes at several points, resume them, and compare with an uninterrupted run.

Usage: python benchmarks/kill_resume.py [--kills 6] [--steps 14] [--seed 0]
Last line: RESULT resume_runs=<n> resume_identical=<n> max_abs_weight_diff=<x>
Runs on a tiny random Llama (CPU, fp32, deterministic), LoRA dropout on so the RNG state matters.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny import make_model_dir, tiny_config  # noqa: E402

from desktune.runs import EventRecord, RunDir, TrainRecord, read_records, records_of  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}


def desktune(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "desktune.cli", *args], env=env or ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def trace(run_dir: Path) -> list[tuple]:
    recs = read_records(RunDir(run_dir).metrics)
    return [(r.kind, r.step, getattr(r, "loss", None), getattr(r, "lr", None), getattr(r, "grad_norm", None),
             getattr(r, "val_loss", None)) for r in recs if r.kind in ("train", "eval")]


def last_step(run_dir: Path) -> int:
    path = RunDir(run_dir).metrics
    if not path.exists():
        return 0
    return max((r.step for r in records_of(read_records(path), TrainRecord)), default=0)


def kill_at(cfg: Path, name: str, step: int, during_checkpoint: bool, timeout: float = 300) -> str:
    """Start a run and SIGKILL it once it has finished `step` (or while it writes a checkpoint)."""
    env = {**ENV, "DESKTUNE_FAULT_CHECKPOINT_SLEEP": "1.5"} if during_checkpoint else ENV
    proc = desktune("train", str(cfg), "-o", f"run_name={name}", "--quiet", env=env)
    run_dir = cfg.parent / "runs" / name
    start = time.time()
    while proc.poll() is None and time.time() - start < timeout:
        if during_checkpoint:
            folder = RunDir(run_dir).checkpoints
            tmp = list(folder.glob(".step-*")) if folder.exists() else []
            if tmp and last_step(run_dir) >= step:
                time.sleep(0.3)  # mid-write: files written, not yet renamed
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return f"during checkpoint write after step {last_step(run_dir)} ({tmp[0].name})"
        elif last_step(run_dir) >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"after step {last_step(run_dir)}"
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"run {name} ended before the kill point ({proc.returncode}): {proc.stderr.read()[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    model = make_model_dir(work / "tiny", init_std=0.1)
    raw = tiny_config(model, work, lora={"dropout": 0.1, "target_modules": "all-linear"},
                      train={"max_steps": args.steps, "eval_every": 3, "micro_batch_size": 2, "grad_accum": 2},
                      checkpoint={"every": 2, "keep_last": 2})
    raw["output_dir"] = str(work / "runs")
    cfg = work / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))

    ref = desktune("train", str(cfg), "-o", "run_name=reference", "--quiet")
    if ref.wait() != 0:
        raise SystemExit(f"reference run failed: {ref.stderr.read()[-2000:]}")
    ref_dir = work / "runs" / "reference"
    ref_w = load_file(str(ref_dir / "adapter" / "adapter_model.safetensors"))
    ref_trace = trace(ref_dir)

    rng = random.Random(args.seed)
    points = sorted(rng.sample(range(3, args.steps), args.kills - 1))
    plan = [(s, False) for s in points] + [(rng.randrange(3, args.steps - 2), True)]
    identical, worst = 0, 0.0
    print(f"{'run':<8} {'killed':<62} {'resumed from':<14} {'max |dw|':>10} {'metrics':>8}", flush=True)
    for i, (step, during) in enumerate(plan):
        name = f"kill{i}"
        where = kill_at(cfg, name, step, during)
        res = desktune("train", str(cfg), "-o", f"run_name={name}", "--resume", "--quiet")
        if res.wait() != 0:
            raise SystemExit(f"resume of {name} failed: {res.stderr.read()[-2000:]}")
        run_dir = work / "runs" / name
        resumed = next(e for e in records_of(read_records(RunDir(run_dir).metrics), EventRecord)
                       if e.name == "resumed")
        w = load_file(str(RunDir(run_dir).adapter / "adapter_model.safetensors"))
        diff = max(float((w[k].double() - ref_w[k].double()).abs().max()) for k in ref_w)
        same_metrics = trace(run_dir) == ref_trace
        worst = max(worst, diff)
        identical += int(diff == 0.0 and same_metrics and w.keys() == ref_w.keys())
        print(f"{name:<8} {where:<62} {'step ' + str(resumed.step):<14} {diff:>10.3g} "
              f"{'same' if same_metrics else 'DIFF':>8}", flush=True)
    print(f"RESULT resume_runs={len(plan)} resume_identical={identical} max_abs_weight_diff={worst:g}")


if __name__ == "__main__":
    main()
