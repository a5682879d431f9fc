"""Does a long CPU run's memory plateau, and does the planner's figure match the plateau?

Trains N optimizer steps (default 2000) through desktune's own `train` in a fresh process (so the RSS is the run's
alone, and the CPU kernel caches start empty), then reads the process RSS that every step's record carries
(metrics.jsonl, hardware.memory_telemetry) and prints the curve, the growth over the last half and the plan that
`desktune plan` makes for the same settings.

The model, by default: a random Llama with SmolLM2-135M-Instruct's exact shapes (hidden 576, MLP 1536, 9 query and
3 key/value heads, its 49152-token vocabulary and tokenizer, from the embedded model's converted folder) but 2
decoder layers instead of 30, trained at the demo's settings (examples/demo.yaml: the demo's chats, bf16 where the
CPU has it, LoRA r16 on all linear layers, packed rows of 4 samples) except one micro-batch a step instead of 2.
Why: memory growth through a run comes from what changes from step to step, the packed row length and so the
matmul shapes, and those are the demo's exactly (each step a row of 4 shuffled chats, a length seldom seen
before); the layer count and the accumulation only scale each step's time (the demo's 30 layers x 2 micro-batches
take ~2 s a step on a quiet 2-core CPU, 2000 steps over an hour; on a shared one several hours) and its
activations, which the plan counts. `--model embedded` runs the embedded model itself. Validation every 50 steps,
a checkpoint every 500, no replay (the replayed answers of a random model would be noise and cost generation time).

    HF_HUB_OFFLINE=1 python benchmarks/memory_curve.py [--steps 2000] [--model shaped|embedded] [--layers 2]
                                                       [--dtype auto|bf16|fp32] [--unbounded] [--demo]

`--unbounded` gives oneDNN's and ideep's kernel caches their default 1024 entries (as before
hardware.bound_kernel_caches), to show the curve without the bound. `--demo` runs the demo exactly as shipped
(the embedded model, its ~30 steps, validation every 7, checkpoints, replay).

Plan: the largest plan over the micro-batches the run really formed (rows, mean packed length, target share; as
benchmarks/plan_accuracy.py does), which is what the run had to hold; `desktune plan`'s own figure for the config
(every packed row assumed 4 x max_seq_len tokens) is printed beside it.

Last line: RESULT rss_first_mib=<x> rss_plateau_mib=<x> growth_last_half_pct=<x> plan_mib=<x> plan_error_pct=<x>
(rss_plateau_mib: the highest per-step RSS over the last 10% of steps; growth over the last half: the median RSS
of the last 10 steps against that of the 10 steps ending at the half-way step.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]
CURVE_STEPS = (1, 10, 50, 100, 200, 500, 1000, 2000)
UNBOUNDED = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}  # the libraries' defaults


def shaped_model(folder: Path, layers: int) -> Path:
    """A random bf16 Llama with the embedded model's config (but `layers` decoder layers) and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from desktune.models.gguf import embedded_model_dir

    source = embedded_model_dir()
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def overrides(model: str | None, steps: int, out: Path, dtype: str = "auto") -> list[str]:
    """The demo's config, changed only where a long run needs it (`model` None: the demo as shipped)."""
    where = [f"output_dir={out}", "run_name=memory-curve", f"model.dtype={dtype}"]
    if model is None:
        return where
    return [f"model.name={model}", f"train.max_steps={steps}", "train.grad_accum=1", "train.eval_every=50",
            "checkpoint.every=500", "data.replay=0", *where]


def child(args: list[str]) -> None:
    """In this fresh process: the run, then one JSON line with the plans for its settings."""
    import torch

    from desktune.config import load_config
    from desktune.data import batching
    from desktune.memory.budget import plan_run
    from desktune.memory.estimate import estimate
    from desktune.training import loop, step

    cfg = load_config(ROOT / "examples" / "demo.yaml", args)
    shapes: set[tuple[int, int, float]] = set()  # (rows, mean packed length, target share) of each micro-batch

    def spy(examples, micro, **kw):  # the same call as step.micro_batches
        out = batching.micro_batches(examples, micro, **kw)
        for chunk, _ in out:
            mean = math.ceil(sum(len(e.input_ids) for e in chunk) / len(chunk))
            shapes.add((len(chunk), mean, round(sum(e.n_target for e in chunk) / (len(chunk) * (mean - 1)), 3)))
        return out

    step.micro_batches = spy
    run = loop.setup(cfg, quiet=True)
    result = loop.fit(run)
    hw = run.loaded.hardware
    inputs, config_plan = plan_run(run.cfg, "cpu", hw.dtype.itemsize, cpu_attention_kernel=hw.cpu_attention_kernel)
    worst = max((estimate(inputs.with_(micro_batch=b, seq_len=n, target_fraction=f, padded=False))
                 for b, n, f in shapes), key=lambda p: p.total)
    print(json.dumps({"run_dir": str(result.run_dir), "plan": worst.total, "plan_tensors": worst.tensor_bytes,
                      "config_plan": config_plan.total, "dtype": str(hw.dtype)[6:],
                      "tokens_per_s": result.tokens_per_s, "threads": torch.get_num_threads()}))


def records(metrics: Path) -> list[dict]:
    """The train records written so far (a line being written is skipped)."""
    out = []
    for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "train" and rec.get("rss_bytes"):
            out.append(rec)
    return out


def run_child(args: list[str], metrics: Path, steps: int | None, unbounded: bool) -> dict:
    """The child process, with a progress line a minute; its JSON answer."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(UNBOUNDED if unbounded else {})}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(args)], env=env, stdout=out,
                                stderr=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        while proc.poll() is None:
            time.sleep(2)
            if time.perf_counter() - t0 >= 60:
                t0, recs = time.perf_counter(), records(metrics)
                if recs:
                    print(f"  step {recs[-1]['step']}{f'/{steps}' if steps else ''}: RSS "
                          f"{recs[-1]['rss_bytes'] / MiB:.0f} MiB", flush=True)
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            raise SystemExit(f"the run failed:\n{err[-3000:]}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1])


def curve(recs: list[dict], answer: dict) -> dict[str, float]:
    """Print the curve and return the RESULT values."""
    rss = [r["rss_bytes"] / MiB for r in recs]
    n = len(rss)
    print(f"{'step':>6} {'RSS MiB':>9} {'peak RSS MiB':>13}")
    for s in [s for s in CURVE_STEPS if s < n] + [n]:
        print(f"{s:>6} {rss[s - 1]:>9.0f} {recs[s - 1]['peak_rss_bytes'] / MiB:>13.0f}")
    half = max(10, n // 2)
    mid, last = statistics.median(rss[half - 10:half]), statistics.median(rss[-10:])
    plateau = max(rss[-max(1, n // 10):])
    plan = answer["plan"] / MiB
    print(f"tokens/s over the run: {answer['tokens_per_s']:.0f} ({answer['dtype']}, {answer['threads']} threads)")
    print(f"plan for the micro-batches this run formed: {plan:.0f} MiB (tensors {answer['plan_tensors'] / MiB:.0f} "
          f"MiB); desktune plan for the config (every row {4} x max_seq_len): {answer['config_plan'] / MiB:.0f} MiB")
    return {"rss_first_mib": rss[0], "rss_plateau_mib": plateau, "growth_last_half_pct": 100 * (last - mid) / mid,
            "plan_mib": plan, "plan_error_pct": 100 * (plan - plateau) / plateau}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--model", choices=("shaped", "embedded"), default="shaped")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the shaped model")
    ap.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="the run's model.dtype (auto: bf16 where the CPU has it natively)")
    ap.add_argument("--unbounded", action="store_true", help="the kernel caches at their default 1024 entries")
    ap.add_argument("--demo", action="store_true", help="the demo exactly as shipped (its steps, validation, "
                    "checkpoints and replay; --steps and --model are ignored)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.demo:
            model, what = None, "the demo (examples/demo.yaml as shipped)"
        elif args.model == "embedded":
            model, what = "smollm2-135m-instruct", f"{args.steps} steps of the embedded SmolLM2-135M"
        else:
            model = str(shaped_model(work / "model", args.layers))
            what = f"{args.steps} steps of a random {args.layers}-layer Llama of SmolLM2-135M's shapes"
        print(f"{what} at the demo's settings{' (kernel caches unbounded)' if args.unbounded else ''}", flush=True)
        metrics = work / "runs" / "memory-curve" / "metrics.jsonl"
        t0 = time.perf_counter()
        answer = run_child(overrides(model, args.steps, work / "runs", args.dtype), metrics,
                           None if args.demo else args.steps, args.unbounded)
        print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
        values = curve(records(Path(answer["run_dir"]) / "metrics.jsonl"), answer)
    print("RESULT " + " ".join(f"{k}={v:.1f}" for k, v in values.items()), flush=True)


if __name__ == "__main__":
    main()
