"""One process against two (DDP, then FSDP2) on the same config and global batch, and a checkpoint of two
processes resumed on one; every run is a real `desktune train` (the two-process ones through `--nproc 2`).

Usage: python benchmarks/ddp_equivalence.py [--model embedded|tiny] [--steps 6] [--grad-accum 4] [--backend gloo|nccl]
Last line: RESULT ddp_max_abs_weight_diff=<x> fsdp_max_abs_weight_diff=<x> resume_across_sizes=<ok|fail>
Targets: both differences <= 1e-5; each 2-process run's checkpoint, resumed on one process, ends at the
one-process adapter (within 1e-5).
gloo runs the processes on the CPU; nccl on one CUDA card per process (not run here).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.tiny import make_model_dir, write_chat_data  # noqa: E402

from desktune.constants import EMBEDDED_MODEL  # noqa: E402
from desktune.runs import RunDir  # noqa: E402

TOLERANCE = 1e-5
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def config(root: Path, model: str, data: Path, steps: int, device: str, name: str, mode: str, accum: int) -> Path:
    """The run's config: all-linear LoRA, `accum` micro-batches of 2 samples per step, a checkpoint every 2 steps."""
    raw = {"model": {"name": model, "dtype": "fp32"}, "run_name": name, "output_dir": str(root / "runs"),
           "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
           "data": {"train": str(data), "val_fraction": 0.0, "max_seq_len": 128, "replay": 0},
           "train": {"max_steps": steps, "micro_batch_size": 2, "grad_accum": accum, "lr": 1e-3, "device": device,
                     "distributed": mode, "diagnostics": False},
           "checkpoint": {"every": 2, "keep_last": 10}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def desktune(*args: str) -> float:
    """Run `desktune ARGS`; returns its wall time (a failure stops the benchmark with its message)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "desktune", *args], env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"desktune {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def max_diff(a: Path, b: Path) -> float:
    x, y = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    assert x.keys() == y.keys(), "the adapters hold different tensors"
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["embedded", "tiny"], default="embedded")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches of 2 per step (4: two per process)")
    args = ap.parse_args()
    device = "cuda" if args.backend == "nccl" else "cpu"
    root = Path(tempfile.mkdtemp(prefix="ddp-equivalence-"))
    model = EMBEDDED_MODEL if args.model == "embedded" else str(make_model_dir(root / "tiny"))
    data = ROOT / "examples" / "demo" / "train.jsonl" if args.model == "embedded" else write_chat_data(
        root / "chats.jsonl", n=64)
    print(f"{cpu_name()}, {os.cpu_count()} cores; backend {args.backend}; model {model}; {args.steps} steps of "
          f"{2 * args.grad_accum} samples; folder {root}", flush=True)
    runs, wall = {}, {}
    for name, mode, nproc in [("one", "ddp", 1), ("ddp", "ddp", 2), ("fsdp2", "fsdp2", 2)]:
        cfg = config(root, model, data, args.steps, device, name, mode, args.grad_accum)
        wall[name] = desktune("train", str(cfg), "-q", "--nproc", str(nproc))
        runs[name] = root / "runs" / name
        print(f"  {name}: {nproc} process(es), {wall[name]:.1f} s", flush=True)
    ddp, fsdp = max_diff(runs["ddp"], runs["one"]), max_diff(runs["fsdp2"], runs["one"])
    across = {}
    for name in ("ddp", "fsdp2"):  # each 2-process run's step-2 checkpoint, resumed on one process
        resumed = config(root, model, data, args.steps, device, name, name, args.grad_accum)
        desktune("train", str(resumed), "-q", "--resume", str(RunDir(runs[name]).checkpoint(2)))
        across[name] = max_diff(runs[name], runs["one"])
    print(f"  largest weight difference against one process: ddp {ddp:.2e}, fsdp2 {fsdp:.2e}; step-2 checkpoints "
          f"resumed on one process: ddp's {across['ddp']:.2e}, fsdp2's {across['fsdp2']:.2e}")
    ok = "ok" if max(across.values()) <= TOLERANCE else "fail"
    print(f"RESULT ddp_max_abs_weight_diff={ddp:.3g} fsdp_max_abs_weight_diff={fsdp:.3g} resume_across_sizes={ok}")


if __name__ == "__main__":
    main()
