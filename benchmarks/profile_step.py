"""Where a training step's time goes: desktune's own step on the embedded model, under torch.profiler.

Trains the fictional-facts task of teaches.py (the same samples, desktune's defaults, data.replay 0 so no base
answers are generated first) for --warmup steps, then times --steps optimizer steps, runs the same samples again
under the profiler and prints the operators by their own CPU time, the timed steps' tokens/s and MFU (FLOPs as
vs_standard_recipe.py counts them, with the run's own trainable parameters) against a 2048^3 matmul measured here
in the run's dtype.

    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py [--steps 6] [--warmup 3] [--dtype auto|bf16|fp32]
        [-o key=value ...] [--top 25]

Last line: RESULT tokens_per_s=<x> mfu_pct=<x> dtype=<bf16|fp32> top=<the operator with the most self time>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipe_common import arch_of, matmul_peak, model_flops
from teaches import facts_task


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps profiled")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps run before profiling")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--top", type=int, default=25, help="operators listed")
    p.add_argument("-o", dest="overrides", action="append", default=[], help="config override key=value")
    return p.parse_args(argv)


def prepared_run(args: argparse.Namespace, work: Path):
    """A desktune run of the facts task, set up (model, adapters, data) but not trained."""
    from desktune.config import load_config
    from desktune.training.loop import setup

    chats, _ = facts_task()
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(c) + "\n" for c in chats))
    raw = {"data": {"train": str(train), "replay": 0, "val_fraction": 0}, "output_dir": str(work / "runs"),
           "model": {"dtype": args.dtype}, "train": {"threads": os.cpu_count()}}
    return setup(load_config(raw, args.overrides), quiet=True)


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from desktune.training.loop import make_trainer, step_samples, total_steps
    from desktune.training.monitor import Monitor
    from desktune.training.speed import choose_switches, switched_on
    from desktune.training.step import train_step

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = prepared_run(args, Path(tmp))
        hw = run.loaded.hardware
        with switched_on(run.model, choose_switches(run.cfg, hw.device, hw.dtype)) as switches:
            run.switches = switches
            tr = make_trainer(run, total_steps(run.cfg, len(run.train_set)))
            samples = step_samples(run, 0)
            with Monitor(run.dir, tr.total_steps, run.console, quiet=True, records=False) as mon:
                for tr.step in range(1, args.warmup + 1):
                    train_step(tr, next(samples), mon)
                steps = [next(samples) for _ in range(args.steps)]
                seconds = 0.0
                for tr.step, examples in enumerate(steps, args.warmup + 1):  # timed, not profiled
                    seconds += train_step(tr, examples, mon).seconds
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for tr.step, examples in enumerate(steps, args.warmup + 1):
                        train_step(tr, examples, mon)
    lengths = [len(ex.input_ids) for s in steps for ex in s]
    scored = sum(ex.n_target for s in steps for ex in s)
    dtype = str(hw.dtype)[6:]
    peak = matmul_peak(hw.dtype, hw.device)
    arch = replace(arch_of(run.model.config), p_lora=run.trainable.trainable)  # the run's own targets and rank
    flops = model_flops(arch, lengths, scored)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(table)
    top = prof.key_averages()
    top = sorted(top, key=lambda e: e.self_cpu_time_total, reverse=True)[0].key
    tps = sum(lengths) / seconds
    mfu = 100 * flops / seconds / peak
    print(f"{dtype}: {len(lengths)} samples, {sum(lengths)} tokens in {args.steps} steps, {seconds:.2f} s "
          "(timed without the profiler, which then ran the same samples again); "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s; {torch.get_num_threads()} threads")
    print(f"RESULT tokens_per_s={tps:.1f} mfu_pct={mfu:.1f} dtype={dtype} top={top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
