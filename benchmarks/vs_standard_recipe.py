"""desktune against the standard TRL + PEFT LoRA recipe: same model, data, hyper-parameters and sample order.

Systems, each in its own process:
  recipe    TRL SFTTrainer + PEFT LoRA, TRL defaults (no packing, gradient checkpointing on, TRL's fused chunked
            log-prob loss on every token: TRL refuses assistant-only loss with SmolLM2's chat template);
  trl_best  the same with TRL's speed options: packing (best-fit decreasing into max-length rows, which reorders
            the samples), padding-free, gradient checkpointing off;
  desktune  desktune.train with its defaults (loss on assistant tokens, chunked loss, no checkpointing).
Shared: LoRA r16/alpha32/dropout 0.05 on q,k,v,o; micro-batch 2 x accumulation 4; lr 2e-4 linear, no warmup;
weight decay 0; clipping 1.0; 1 epoch; seed 42; samples in file order (TRL: sequential sampler); the dtype
desktune's `dtype: auto` picks here (fp32 on CPUs without native bf16) for every system.

Models: the embedded SmolLM2-135M-Instruct, and a tiny random Llama with Llama-3's 128,256-token vocabulary and
untied head (hidden 512, 4 layers; SmolLM2's tokenizer, so ids < 49152 but logits 128,256 wide).
Data: real chitchat conversations (chitchat-dataset wheel), turns alternating user/assistant, drawn with a fixed
seed (a trailing user turn dropped; degenerate ones skipped); conversations longer than --max-len tokens
(default 1024, both trainers' default maximum length) are skipped so that no system truncates anything.

Measured per system and model:
  tokens/s      templated tokens of the training samples (counted once here) / training-loop seconds (desktune:
                RunResult.train_s; TRL: first step's begin to last step's end);
  tracked peak  desktune.memory.measure.PeakTracker (live tensor storages on the CPU, allocator peak on CUDA) in a
                separate short run of --mem-steps optimizer steps (default 2: the 8 shortest training samples,
                then the timed run's largest micro-batch and the next 6 shortest, so the run's peak is reached
                with optimizer state allocated), from the start of training to its end, model weights included;
  RSS           the timed run's process peak RSS (ru_maxrss, loading included);
  other         CPU cores other processes kept busy during the timed run (from /proc/stat); a timed run above
                0.2 is run again (--retries, default once) and the less disturbed one is kept;
  train loss    each system's own last logged loss;
  val loss      one shared function: fresh base + saved adapter, full fp32 logits, held-out conversations; scored
                on assistant tokens (each assistant turn's content tokens plus its end-of-turn token, found by
                templating the prefix with the generation prompt) and on all tokens;
  MFU %         model FLOPs/s over the best 2048^3 matmul in the same dtype, FLOPs per sample of length l:
                4*P_frozen*l + 6*P_lora*l + 6*n_layers*l^2*(n_heads*head_dim) + 4*V*hidden*n_scored
                (n_scored: every labelled position for TRL, desktune's assistant targets).

    HF_HUB_OFFLINE=1 python benchmarks/vs_standard_recipe.py [--quick] [--train-samples N] [--val-samples M]
        [--models smollm2,tiny-llama3]

Last line: RESULT speedup_vs_recipe=<x> speedup_vs_trl_best=<x> mem_ratio_vs_recipe=<x> val_loss_delta_pct=<x>
mfu_pct=<x> (desktune on SmolLM2, except mem_ratio_vs_recipe: tracked peaks on the 128k-vocab tiny Llama).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipe_common import (
    DTYPE_NAMES,
    FLOP_FORMULA,
    SYSTEMS,
    arch_of,
    length_summary,
    make_tiny_llama,
    matmul_peak,
    model_flops,
    run_worker,
    select_conversations,
    worker_main,
    write_jsonl,
)

MODELS = ("smollm2", "tiny-llama3")
BUSY = 0.2  # CPU cores used by other processes above which a timed run counts as disturbed
MiB = 2**20


def model_dir(name: str, work: Path, dtype: Any) -> str:
    """The HF folder of a benchmark model (the tiny Llama is written once per run)."""
    from desktune.models.gguf import embedded_model_dir

    smol = embedded_model_dir()
    if name == "smollm2":
        return str(smol)
    return str(make_tiny_llama(work / "tiny-llama3", smol, dtype))


def desktune_source() -> str:
    """The git commit of the desktune checkout in use, '+dirty' when src/desktune has uncommitted changes."""
    import desktune

    src = Path(desktune.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"desktune {desktune.__version__} (not a git checkout)"
    return f"desktune {desktune.__version__} at {head}{'+dirty' if dirty else ''} ({src})"


def memory_samples(lengths: list[int], steps: int, per_step: int = 8) -> list[int]:
    """Indices of the memory-tracking runs' samples: the timed run's largest micro-batch (the pair holding its
    longest sample) in every step but the first, the shortest other samples everywhere else, so that the
    run's peak (largest micro-batch, optimizer state allocated) is reached cheaply."""
    steps = max(1, min(steps, len(lengths) // per_step))
    p = max(range(len(lengths) // 2), key=lambda i: max(lengths[2 * i], lengths[2 * i + 1]))
    big = [2 * p, 2 * p + 1]
    short = iter(sorted((i for i in range(len(lengths)) if i not in big), key=lambda i: lengths[i]))
    out: list[int] = []
    for step in range(steps):
        if step > 0 or steps == 1:
            out += big
        out += [next(short) for _ in range(per_step - (len(out) - step * per_step))]
    return out


def bench_model(name: str, args: argparse.Namespace, work: Path, corpus: Any, files: dict[str, Any], dtype: Any,
                device: str, peak: float) -> dict[str, dict[str, Any]]:
    """Timed run, memory run and validation of every system on one model; prints its table."""
    from transformers import AutoConfig

    t_model = time.perf_counter()
    mdir = model_dir(name, work, dtype)
    arch = arch_of(AutoConfig.from_pretrained(mdir))
    base = {"model_dir": mdir, "dtype": DTYPE_NAMES[dtype], "device": device, "max_len": args.max_len,
            "kind": "train"}
    res: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        t0 = time.perf_counter()
        for attempt in range(1 + args.retries):
            r = run_worker(__file__, {**base, "system": system, "train_file": str(files["train"]),
                                      "out_dir": str(work / name / f"timed{attempt}")})
            r["attempts"] = attempt + 1
            if system not in res or r["other_cores"] < res[system]["other_cores"]:
                res[system] = r
            if r["other_cores"] <= BUSY:
                break
            print(f"  {name} {system}: other processes kept {r['other_cores']:.2f} CPU cores busy during the timed "
                  f"run ({r['train_s']:.1f}s)" + (": running it again" if attempt < args.retries else ""), flush=True)
        mem = run_worker(__file__, {**base, "system": system, "train_file": str(files["mem"]),
                                    "out_dir": str(work / name / "mem"), "track": True})
        res[system]["tracked_peak"] = mem["peak_bytes"]
        print(f"  {name} {system}: {res[system]['steps']} steps, {res[system]['train_s']:.1f}s training "
              f"({time.perf_counter() - t0:.0f}s with loading and the memory run)", flush=True)
    val = run_worker(__file__, {"kind": "eval", "model_dir": mdir, "dtype": DTYPE_NAMES[dtype], "device": device,
                                "val_file": str(files["val"]),
                                "adapters": {s: res[s]["adapter_dir"] for s in SYSTEMS}})
    tokens = corpus.train_tokens
    lengths = corpus.train_lengths
    for system in SYSTEMS:
        r = res[system]
        r["tokens_per_s"] = tokens / r["train_s"]
        r["n_scored_flops"] = r["n_scored"] if system == "desktune" else sum(n - 1 for n in lengths)
        r["mfu_pct"] = 100 * model_flops(arch, lengths, r["n_scored_flops"]) / r["train_s"] / peak
        r["val"] = val[system]
    ref = res["recipe"]
    print(f"\n{name}: {arch.layers} layers, hidden {arch.hidden}, vocab {arch.vocab}; "
          f"train {length_summary(lengths)}; val {len(corpus.val)} conversations "
          f"({val['base']['n_assistant']} assistant / {val['base']['n_all']} scored tokens); "
          f"{time.perf_counter() - t_model:.0f}s in all")
    head = (f"{'system':<9} {'steps':>5} {'train s':>8} {'tokens/s':>9} {'speedup':>8} {'tracked MiB':>12} "
            f"{'RSS MiB':>8} {'train loss':>10} {'val asst':>9} {'val all':>8} {'MFU %':>6} {'other':>6}")
    print(head)
    print("-" * len(head))
    b = val["base"]
    print(f"{'base':<9} {'':>5} {'':>8} {'':>9} {'':>8} {'':>12} {'':>8} {'':>10} {b['assistant']:>9.4f} "
          f"{b['all']:>8.4f}")
    for system in SYSTEMS:
        r = res[system]
        print(f"{system:<9} {r['steps']:>5} {r['train_s']:>8.1f} {r['tokens_per_s']:>9.1f} "
              f"{ref['train_s'] / r['train_s']:>7.2f}x {r['tracked_peak'] / MiB:>12.1f} {r['rss_bytes'] / MiB:>8.0f} "
              f"{r['final_loss']:>10.4f} {r['val']['assistant']:>9.4f} {r['val']['all']:>8.4f} {r['mfu_pct']:>6.2f} "
              f"{r['other_cores']:>6.2f}")
    print(f"templated tokens per system (shared count {tokens}): "
          + ", ".join(f"{s} {res[s]['tokens']}" for s in SYSTEMS)
          + f"; trl_best packed the {len(lengths)} samples into {res['trl_best']['rows']} rows of <= {args.max_len}")
    print("positions the head scores (FLOP count): " + ", ".join(f"{s} {res[s]['n_scored_flops']}" for s in SYSTEMS)
          + "; gradient checkpointing: " + ", ".join(
              f"{s} {'on' if res[s].get('gradient_checkpointing') else 'off'}" for s in SYSTEMS))
    print(f"memory runs: {files['mem_steps']} step(s) over {len(files['mem_lengths'])} samples of lengths "
          f"{files['mem_lengths']}; other: CPU cores other processes kept busy during the timed run\n", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small smoke run (~3-4 minutes)")
    ap.add_argument("--train-samples", type=int, help="training conversations, >= 8 (default 24; --quick 8)")
    ap.add_argument("--val-samples", type=int, help="held-out conversations (default 12; --quick 4)")
    ap.add_argument("--max-len", type=int, help="longest conversation in tokens (default 1024; --quick 256)")
    ap.add_argument("--mem-steps", type=int, default=2, help="optimizer steps of the memory-tracking runs")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the conversation draw")
    ap.add_argument("--retries", type=int, default=1,
                    help=f"reruns of a timed run during which other processes kept > {BUSY} CPU cores busy "
                    "(the least disturbed run is kept)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (data, adapters, runs)")
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    args.train_samples = args.train_samples or (8 if args.quick else 24)
    args.val_samples = args.val_samples or (4 if args.quick else 12)
    args.max_len = args.max_len or (256 if args.quick else 1024)
    if args.train_samples < 8:
        ap.error("--train-samples must be at least 8 (one optimizer step)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in models if m not in MODELS]:
        ap.error(f"unknown model(s) {unknown}; choose from {MODELS}")

    from transformers import AutoTokenizer

    from desktune.hardware import detect
    from desktune.models.gguf import embedded_model_dir
    from desktune.models.loading import quiet_transformers
    from desktune.models.quantize import import_torchao_quietly

    quiet_transformers()
    import_torchao_quietly()
    t_start = time.perf_counter()
    hw = detect("auto", "auto")
    device = hw.device.type
    work = Path(tempfile.mkdtemp(prefix="vs-recipe-"))
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    corpus = select_conversations(tok, args.train_samples, args.val_samples, args.max_len, args.seed)
    mem_idx = memory_samples(corpus.train_lengths, args.mem_steps)
    files = {"train": write_jsonl(work / "train.jsonl", corpus.train),
             "val": write_jsonl(work / "val.jsonl", corpus.val),
             "mem": write_jsonl(work / "mem.jsonl", [corpus.train[i] for i in mem_idx]),
             "mem_lengths": [corpus.train_lengths[i] for i in mem_idx], "mem_steps": len(mem_idx) // 8}
    peak = matmul_peak(hw.dtype, hw.device)
    print(f"device {hw.name}, dtype {DTYPE_NAMES[hw.dtype]} (desktune's auto pick), torch threads "
          f"{__import__('torch').get_num_threads()}; matmul peak {peak / 1e9:.1f} GFLOP/s (best 2048^3)")
    print(f"chitchat: {corpus.n_usable} usable conversations; drew {len(corpus.train)} train + {len(corpus.val)} "
          f"val with seed {args.seed}, skipping {corpus.n_too_long} longer than {args.max_len} tokens")
    print(f"FLOPs: {FLOP_FORMULA}", flush=True)
    source = desktune_source()
    print(f"{source}\n", flush=True)

    results = {m: bench_model(m, args, work, corpus, files, hw.dtype, device, peak) for m in models}

    nan = float("nan")
    smol, tiny = results.get("smollm2"), results.get("tiny-llama3")
    speed_recipe = smol["recipe"]["train_s"] / smol["desktune"]["train_s"] if smol else nan
    speed_best = smol["trl_best"]["train_s"] / smol["desktune"]["train_s"] if smol else nan
    mem_ratio = tiny["desktune"]["tracked_peak"] / tiny["recipe"]["tracked_peak"] if tiny else nan
    delta = (100 * (smol["desktune"]["val"]["assistant"] - smol["recipe"]["val"]["assistant"])
             / smol["recipe"]["val"]["assistant"]) if smol else nan
    mfu = smol["desktune"]["mfu_pct"] if smol else nan
    if desktune_source() != source:
        print(f"WARNING: the desktune checkout changed during the run (now {desktune_source()})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work}")
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    print(f"RESULT speedup_vs_recipe={speed_recipe:.3f} speedup_vs_trl_best={speed_best:.3f} "
          f"mem_ratio_vs_recipe={mem_ratio:.3f} val_loss_delta_pct={delta:.2f} mfu_pct={mfu:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
