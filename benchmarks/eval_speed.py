"""How long `desktune eval` of the demo run takes: the first time (the base's reference answers not cached yet)
and again with them cached.

Usage: python benchmarks/eval_speed.py [--run RUN_DIR] [--work DIR]
Last line: RESULT eval_first_s=<x> eval_cached_s=<x> forgetting_prompts=<n>

Without --run it uses the newest demo run under WORK/runs, or makes one with `desktune demo` (a few CPU minutes).
Each eval runs as its own `desktune eval` process (start-up and imports included, as a user waits for them) with a
fresh DESKTUNE_CACHE for the reference answers only: the converted model is linked in from the usual cache, never
deleted or converted again. Measure on a quiet machine; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from desktune.models.gguf import cache_dir
from desktune.runs import RunDir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}


def cpu_line() -> str:
    """The CPU's model name, whether it has native bf16, the threads torch will use and the load average."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                "unknown")
    bf16 = "avx512_bf16" in lscpu or "amx_bf16" in lscpu
    return (f"cpu: {name}, {os.cpu_count()} cores, avx512_bf16: {'yes' if bf16 else 'no'}; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def demo_run(work: Path) -> Path:
    """The newest finished demo run under work/runs, else a new one."""
    done = [p for p in sorted((work / "runs").glob("*"))
            if RunDir(p).adapter.is_dir() and RunDir(p).demo_answers.is_file()]
    if done:
        return done[-1]
    print(f"making the demo run under {work / 'runs'} (desktune demo) ...", flush=True)
    subprocess.run([sys.executable, "-m", "desktune", "demo", "--output-dir", str(work / "runs")], env=ENV,
                   check=True)
    return demo_run(work)


def fresh_cache(root: Path) -> Path:
    """An empty desktune cache whose models/ is the usual cache's (the converted embedded model stays there)."""
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(models, target_is_directory=True)
    return root


def timed_eval(run: Path, cache: Path, out: Path) -> tuple[float, dict]:
    """Wall seconds of one `desktune eval` process, and the eval.json it wrote."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "desktune", "eval", str(run), "--output", str(out)],
                   env={**ENV, "DESKTUNE_CACHE": str(cache)}, check=True)
    return time.perf_counter() - t0, json.loads(out.read_text(encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a demo run folder (default: made or found under --work)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "desktune-eval-speed")
    args = ap.parse_args()
    print(cpu_line(), flush=True)
    run = args.run or demo_run(args.work)
    print(f"run: {run}", flush=True)
    with tempfile.TemporaryDirectory(prefix="desktune-eval-cache-") as tmp:
        cache = fresh_cache(Path(tmp))
        first, r1 = timed_eval(run, cache, Path(tmp) / "eval-first.json")
        print(f"eval, reference answers not cached: {first:.1f} s (phases: {r1['timings']})", flush=True)
        cached, r2 = timed_eval(run, cache, Path(tmp) / "eval-cached.json")
        print(f"eval, reference answers cached: {cached:.1f} s (phases: {r2['timings']})", flush=True)
    same = r1["forgetting"] == r2["forgetting"]
    print(f"forgetting identical both times: {same}; {cpu_line()}", flush=True)
    print(f"RESULT eval_first_s={first:.1f} eval_cached_s={cached:.1f} "
          f"forgetting_prompts={r2['forgetting']['prompts']}")


if __name__ == "__main__":
    main()
