"""desktune against TRL + PEFT LoRA: the standard recipe, TRL's fast variants and equal-objective pairs.

Systems, each in its own fresh process, on the same model, data, sample order and hyper-parameters:
  recipe        TRL SFTTrainer + PEFT LoRA with TRL's defaults (padded, gradient checkpointing on, loss on every
                token): what tutorials run, kept as it was;
  trl_fast      TRL, checkpointing off, padded, every token;
  trl_pf        TRL, checkpointing off, padding_free (the micro-batch's samples in one row, positions restarting
                per sample; max_length None, which TRL requires without packing: no sample is longer anyway);
  trl_packed    TRL, checkpointing off, BFD packing into rows of max_len (padding-free): regroups the samples, so
                samples per optimizer step and the schedule differ; kept as TRL's documented speed option;
  desktune      desktune.train with its defaults (loss on assistant tokens, padding-free rows, chunked loss, no
                checkpointing), data.replay 0 so that it trains on the same samples and train.memory_budget none
                so that micro-batch, accumulation and checkpointing stay as given (it fits them on CUDA);
  desktune_all  the same with data.train_on all: every token, the objective of the TRL rows above;
  trl_asst      TRL with assistant_only_loss (SmolLM2's chat template with {% generation %} markers, checked to
                render every row identically and to mask exactly the assistant positions desktune trains on), on
                the faster of trl_fast's and trl_pf's layouts: desktune's objective.
trl_best: the fastest valid one of trl_fast, trl_pf, trl_packed, trl_asst. Padding-free rows (trl_pf, trl_packed)
are valid only where the attention keeps their samples apart: TRL documents padding_free for FlashAttention 2/3;
on the CPU there is only sdpa, for which transformers builds a per-sample mask from the position ids. A check
worker compares a sample inside a TRL padding-free batch with it alone (and with a plain concatenation, what
leaking gives) in the run's dtype and fp32; where it fails, both are left out, the reason printed.
Shared: LoRA r16/alpha32/dropout 0.05 on q,k,v,o; micro-batch 2 x accumulation 4; lr 2e-4 linear, no warmup;
weight decay 0; clipping 1.0; 1 epoch; seed 42; samples in file order (TRL: sequential sampler); torch threads;
the dtype desktune's `dtype: auto` picks here (desktune.hardware.detect: bf16 on CPUs with native bf16, else
fp32) for every system (TRL: the model loaded in it, bf16=True when bf16).

Models: the embedded SmolLM2-135M-Instruct, and a tiny random Llama with Llama-3's 128,256-token vocabulary and
untied head (hidden 512, 4 layers; SmolLM2's tokenizer, so ids < 49152 but logits 128,256 wide).
Data: real chitchat conversations (chitchat-dataset wheel), turns alternating user/assistant, drawn with a fixed
seed (a trailing user turn dropped; degenerate ones skipped); conversations longer than --max-len tokens
(default 1024, both trainers' default maximum length) are skipped so that no system truncates anything.

Measured per system and model:
  train s       the summed seconds of every optimizer step (desktune: its step times; TRL: each step's begin to
                end, a TrainerCallback), the first step included for all; no loading, saving or logging;
  tokens/s      templated tokens of the training samples (counted once here) / train s; steady: the tokens of
                steps 2..N / their seconds;
  trainRSS      peak resident set size from the start of training to its end (Linux VmHWM, reset at the start),
                weights included: the memory figure of the RESULT line; peakRSS: the process's peak, loading
                included (ru_maxrss);
  tracked       desktune.memory.measure.PeakTracker (live tensor storages) in a separate short run of
                --mem-steps optimizer steps (the timed run's largest micro-batch with optimizer state allocated);
                off with --quick or --no-tracked;
  other         CPU cores other processes kept busy during the timed run (from /proc/stat); a timed run above
                0.2 is run again (--retries, default once) and the less disturbed one is kept;
  scored        the positions each system's loss scored, counted in the run (TRL: labels of every micro-batch);
  train loss    each system's own last logged loss;
  val loss      one shared function on the same held-out conversations for every adapter and the base model:
                fresh base + saved adapter, full fp32 logits; assistant tokens (each assistant turn's content
                tokens plus its end-of-turn token) and all tokens;
  MFU %         model FLOPs/s over the best 2048^3 matmul in the same dtype and threads, measured in the run;
                FLOPs per sample of length l: 4*P_frozen*l + 6*P_lora*l + 6*n_layers*l^2*(n_heads*head_dim) +
                4*V*hidden*n_scored (frozen base: forward 2N plus input gradients 2N, no weight gradients; LoRA
                6N; causal attention; head forward and input gradient on the objective's scored positions;
                recomputation not counted).

    HF_HUB_OFFLINE=1 python benchmarks/vs_standard_recipe.py [--quick] [--train-samples N] [--val-samples M]
        [--models smollm2,tiny-llama3] [--retries K] [--no-tracked] [--keep]

Last line: RESULT speedup_vs_recipe=<x> speedup_vs_trl_best=<x> speedup_equal_objective=<x>
mem_ratio_vs_recipe=<x> mem_ratio_smol=<x> val_loss_delta_pct=<x> mfu_pct=<x> dtype=<bf16|fp32>: SmolLM2's
recipe / desktune, trl_best / desktune and the fastest all-token TRL variant / desktune_all training times;
trainRSS desktune / recipe on the 128k-vocabulary tiny Llama and on SmolLM2; desktune's assistant-token validation
loss against trl_asst's, in percent; desktune's MFU on SmolLM2.
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
# Every system's worker spec; trl_asst's layout is picked in the run (the fastest valid one of trl_fast, trl_pf).
SYSTEM_SPECS: dict[str, dict[str, Any]] = {
    "recipe": {"trainer": "trl"},  # TRL's defaults: padded, checkpointing on, loss on every token
    "trl_fast": {"trainer": "trl", "layout": "padded", "gc": False, "loss": "all"},
    "trl_pf": {"trainer": "trl", "layout": "padding_free", "gc": False, "loss": "all"},
    "trl_packed": {"trainer": "trl", "layout": "packed", "gc": False, "loss": "all"},
    "desktune": {"trainer": "desktune", "train_on": "assistant", "memory_budget": "none"},
    "desktune_all": {"trainer": "desktune", "train_on": "all", "memory_budget": "none"},
    "trl_asst": {"trainer": "trl", "gc": False, "loss": "assistant"},
}
ORDER = tuple(SYSTEM_SPECS)
OBJECTIVE = {"recipe": "all", "trl_fast": "all", "trl_pf": "all", "trl_packed": "all", "desktune": "assistant",
             "desktune_all": "all", "trl_asst": "assistant"}
TRL_BEST_CANDIDATES = ("trl_fast", "trl_pf", "trl_packed", "trl_asst")  # checkpointing off
TARGETS = {"speedup_vs_recipe": (">=", 2.0), "speedup_vs_trl_best": (">=", 1.5),
           "speedup_equal_objective": (">=", 1.5), "mem_ratio_vs_recipe": ("<=", 0.5),
           "val_loss_delta_pct": ("abs<=", 2.0)}


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


def run_system(name: str, system: str, spec: dict[str, Any], args: argparse.Namespace, files: dict[str, Any],
               work: Path) -> dict[str, Any]:
    """One system's timed run (run again while other processes disturbed it; the least disturbed is kept) and its
    memory-tracking run, each in a fresh process."""
    res: dict[str, Any] | None = None
    for attempt in range(1 + args.retries):
        r = run_worker(__file__, {**spec, "system": system, "train_file": str(files["train"]),
                                  "out_dir": str(work / name / f"timed{attempt}")})
        r["attempts"] = attempt + 1
        if res is None or r["other_cores"] < res["other_cores"]:
            res = r
        if r["other_cores"] <= BUSY:
            break
        print(f"  {name} {system}: other processes kept {r['other_cores']:.2f} CPU cores busy during the timed "
              f"run ({sum(r['step_s']):.1f}s)" + (": running it again" if attempt < args.retries else ""), flush=True)
    assert res is not None
    res["tracked_peak"] = None
    if args.tracked:
        mem = run_worker(__file__, {**spec, "system": system, "train_file": str(files["mem"]),
                                    "out_dir": str(work / name / "mem"), "track": True})
        res["tracked_peak"] = mem["peak_bytes"]
    res["time_s"] = sum(res["step_s"])
    return res


def check_diffs(check: dict[str, Any]) -> str:
    """'dtype: pf vs leak' for each dtype of a padding-free check."""
    return "; ".join(f"{d}: {v['pf']:.3g} vs {v['leak']:.3g}" for d, v in check.items() if isinstance(v, dict))


def excluded_variants(check: dict[str, Any]) -> dict[str, str]:
    """TRL variants left out (not run, not in trl_best), with the reason: the padding-free ones when the
    attention does not keep the samples of a flattened row apart."""
    if check["valid"]:
        return {}
    why = (f"under {check['attn']} the samples of a padding-free row attend to each other (max |logit diff| against "
           f"each sample alone vs a plain concatenation: {check_diffs(check)}); TRL documents padding_free for "
           "FlashAttention")
    return {"trl_pf": why, "trl_packed": why}


def fastest(res: dict[str, dict[str, Any]], names: Any) -> str | None:
    """The system among `names` with the shortest training time, None when none ran."""
    ran = [n for n in names if n in res]
    return min(ran, key=lambda n: res[n]["time_s"]) if ran else None


def derive(res: dict[str, dict[str, Any]], corpus: Any, arch: Any, peak: float, val: dict[str, Any]) -> None:
    """tokens/s (shared token count over the summed step times), steady tokens/s (steps 2..N), MFU, val losses."""
    lengths = corpus.train_lengths
    for system, r in res.items():
        r["tokens_per_s"] = corpus.train_tokens / r["time_s"]
        r["steady_tps"] = (sum(r["step_tokens"][1:]) / sum(r["step_s"][1:])) if len(r["step_s"]) > 1 else float("nan")
        r["n_scored_flops"] = corpus.n_assistant if OBJECTIVE[system] == "assistant" else sum(n - 1 for n in lengths)
        r["mfu_pct"] = 100 * model_flops(arch, lengths, r["n_scored_flops"]) / r["time_s"] / peak
        r["val"] = val[system]


def bench_model(name: str, args: argparse.Namespace, work: Path, corpus: Any, files: dict[str, Any], dtype: Any,
                device: str, peak: float) -> dict[str, Any]:
    """Padding-free check, timed and memory runs of every system, validation; prints the model's table."""
    from transformers import AutoConfig

    t_model = time.perf_counter()
    mdir = model_dir(name, work, dtype)
    arch = arch_of(AutoConfig.from_pretrained(mdir))
    base = {"model_dir": mdir, "dtype": DTYPE_NAMES[dtype], "device": device, "max_len": args.max_len}
    check = run_worker(__file__, {**base, "kind": "pf_check", "train_file": str(files["train"])})
    excluded = excluded_variants(check)
    res: dict[str, dict[str, Any]] = {}
    for system in ORDER:
        spec = {**base, "kind": "train", **SYSTEM_SPECS[system]}
        if system in excluded:
            continue
        if system == "trl_asst":  # the fastest layout that keeps samples per step: trl_fast or trl_pf
            spec["layout"] = res[fastest(res, ("trl_fast", "trl_pf")) or "trl_fast"]["layout"]
        t0 = time.perf_counter()
        res[system] = run_system(name, system, spec, args, files, work)
        print(f"  {name} {system}: {res[system]['steps']} steps, {res[system]['time_s']:.1f}s training "
              f"({time.perf_counter() - t0:.0f}s with loading and the memory run)", flush=True)
    val = run_worker(__file__, {"kind": "eval", "model_dir": mdir, "dtype": DTYPE_NAMES[dtype], "device": device,
                                "val_file": str(files["val"]),
                                "adapters": {s: r["adapter_dir"] for s, r in res.items()}})
    derive(res, corpus, arch, peak, val)
    out = {"res": res, "base_val": val["base"], "check": check, "excluded": excluded,
           "trl_best": fastest(res, TRL_BEST_CANDIDATES),
           "trl_best_all": fastest(res, [c for c in TRL_BEST_CANDIDATES if OBJECTIVE[c] == "all"])}
    print(f"\n{name}: {arch.layers} layers, hidden {arch.hidden}, vocab {arch.vocab}; "
          f"train {length_summary(corpus.train_lengths)}; val {len(corpus.val)} conversations "
          f"({val['base']['n_assistant']} assistant / {val['base']['n_all']} scored tokens); "
          f"{time.perf_counter() - t_model:.0f}s in all")
    print_table(out)
    print_notes(out, corpus, args, files)
    return out


def print_table(out: dict[str, Any]) -> None:
    """One row per system (and the base model's validation loss), the recipe as the speedup's reference."""
    res, ref = out["res"], out["res"]["recipe"]
    head = (f"{'system':<13} {'loss on':<7} {'layout':<12} {'GC':<3} {'steps':>5} {'train s':>8} {'tok/s':>7} "
            f"{'steady':>7} {'speedup':>8} {'scored':>6} {'trainRSS':>8} {'peakRSS':>8} {'tracked':>8} "
            f"{'trn loss':>8} {'val asst':>8} {'val all':>8} {'MFU %':>6} {'other':>5}")
    print(head)
    print("-" * len(head))
    b = out["base_val"]
    print(f"{'base model':<13} {'':<7} {'':<12} {'':<3} {'':>5} {'':>8} {'':>7} {'':>7} {'':>8} {'':>6} {'':>8} "
          f"{'':>8} {'':>8} {'':>8} {b['assistant']:>8.4f} {b['all']:>8.4f}")
    for system, r in res.items():
        tag = "*" if system == out["trl_best"] else "+" if system == out["trl_best_all"] else ""
        tracked = r["tracked_peak"] / MiB if r["tracked_peak"] else float("nan")
        print(f"{system + tag:<13} {'asst' if OBJECTIVE[system] == 'assistant' else 'all':<7} "
              f"{r.get('layout') or 'padding_free':<12} {'on' if r.get('gradient_checkpointing') else 'off':<3} "
              f"{r['steps']:>5} {r['time_s']:>8.1f} {r['tokens_per_s']:>7.1f} {r['steady_tps']:>7.1f} "
              f"{ref['time_s'] / r['time_s']:>7.2f}x {r['n_scored']:>6} {r['train_rss_bytes'] / MiB:>8.0f} "
              f"{r['rss_bytes'] / MiB:>8.0f} {tracked:>8.0f} {r['final_loss']:>8.4f} {r['val']['assistant']:>8.4f} "
              f"{r['val']['all']:>8.4f} {r['mfu_pct']:>6.2f} {r['other_cores']:>5.2f}")
    print(f"* trl_best: {out['trl_best']} (the fastest TRL variant with checkpointing off that is valid here); "
          f"+ the fastest all-token one: {out['trl_best_all']}")


def print_notes(out: dict[str, Any], corpus: Any, args: argparse.Namespace, files: dict[str, Any]) -> None:
    """What each row did differently, what was checked, what was left out and why."""
    res, check = out["res"], out["check"]
    diffs = check_diffs(check)
    print(f"padding-free under {check['attn']}: {'valid' if check['valid'] else 'NOT valid'} (max |logit diff| of a "
          f"sample in a TRL padding-free row against it alone vs a plain concatenation, {diffs}); TRL documents "
          "padding_free for FlashAttention 2/3; transformers masks per sample from the position ids for sdpa")
    for system, why in out["excluded"].items():
        print(f"excluded: {system}: {why}")
    if "trl_packed" in res:
        p, n = res["trl_packed"], len(corpus.train_lengths)
        print(f"trl_packed: BFD packing regrouped the {n} samples into {p['rows']} rows of <= {args.max_len} tokens, "
              f"{p['steps']} optimizer steps against {res['recipe']['steps']}: samples per step and the lr schedule "
              "differ from the others (kept for speed, as TRL's documented speed option)")
    if "trl_asst" in res:
        a = res["trl_asst"]
        m = a.get("mask_check") or {}
        print(f"trl_asst: layout {a['layout']} (the faster of trl_fast/trl_pf), assistant_only_loss with "
              f"{a['template']}; TRL's labels equal the shared assistant positions on {m.get('identical')}/"
              f"{m.get('rows')} rows")
    print(f"templated tokens (shared count {corpus.train_tokens}): "
          + ", ".join(f"{s} {r.get('fed_tokens', r['tokens'])}" for s, r in res.items()))
    print(f"scored positions (from each run; shared count: assistant {corpus.n_assistant}, all "
          f"{sum(n - 1 for n in corpus.train_lengths)}): " + ", ".join(f"{s} {r['n_scored']}" for s, r in res.items()))
    print("dtype / torch threads / micro-batch x accumulation: " + ", ".join(
        f"{s} {r['dtype']}/{r['threads']}/{r['micro_batch']}x{r['grad_accum']}" for s, r in res.items()))
    if len({(r["dtype"], r["threads"], r["micro_batch"] * r["grad_accum"]) for r in res.values()}) > 1:
        print("WARNING: the systems differ in dtype, threads or samples per optimizer step")
    print(f"time: summed optimizer-step seconds (step begin to end, step 1 included for all; steady: steps 2..N); "
          f"trainRSS: peak RSS from train begin to end (VmHWM reset there, weights included; "
          f"{'exact' if all(r['rss_exact'] for r in res.values()) else 'ru_maxrss fallback'}); peakRSS: the "
          f"process's peak with loading; tracked: " + (
              f"live tensors (PeakTracker) in a separate {files['mem_steps']}-step run on "
              f"{len(files['mem_lengths'])} samples of lengths {files['mem_lengths']}" if args.tracked else
              "not measured (--no-tracked)") + "; other: CPU cores other processes kept busy during the timed run\n",
          flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with --quick's defaults filled in."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 8 samples of <= 128 tokens, 2 held out, no tracked runs")
    ap.add_argument("--train-samples", type=int, help="training conversations, >= 8 (default 24; --quick 8)")
    ap.add_argument("--val-samples", type=int, help="held-out conversations (default 12; --quick 2)")
    ap.add_argument("--max-len", type=int, help="longest conversation in tokens (default 1024; --quick 128)")
    ap.add_argument("--mem-steps", type=int, default=2, help="optimizer steps of the memory-tracking runs")
    ap.add_argument("--tracked", action=argparse.BooleanOptionalAction, default=None,
                    help="separate memory-tracking runs, live tensors (default on; --quick off)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the conversation draw")
    ap.add_argument("--retries", type=int, default=1,
                    help=f"reruns of a timed run during which other processes kept > {BUSY} CPU cores busy "
                    "(the least disturbed run is kept)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (data, adapters, runs)")
    args = ap.parse_args(argv)
    if args.worker:
        return args
    args.train_samples = args.train_samples or (8 if args.quick else 24)
    args.val_samples = args.val_samples or (2 if args.quick else 12)
    args.max_len = args.max_len or (128 if args.quick else 1024)
    args.tracked = not args.quick if args.tracked is None else args.tracked
    if args.train_samples < 8:
        ap.error("--train-samples must be at least 8 (one optimizer step)")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in args.models if m not in MODELS]:
        ap.error(f"unknown model(s) {unknown}; choose from {MODELS}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Every system on every model: tables, the summary and the RESULT line."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    models = args.models

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
    figures = headline(results)
    print_summary(results, figures)
    if desktune_source() != source:
        print(f"WARNING: the desktune checkout changed during the run (now {desktune_source()})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work}")
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    print("RESULT " + " ".join(f"{k}={v:.2f}" if k.endswith("pct") else f"{k}={v:.3f}" for k, v in figures.items())
          + f" dtype={DTYPE_NAMES[hw.dtype]}", flush=True)
    return 0


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b else float("nan")


def rss_growth(r: dict[str, Any]) -> int | None:
    """How far the resident set grew while training: trainRSS minus the RSS at the start of training."""
    return r["train_rss_bytes"] - r["rss_start_bytes"] if r.get("rss_start_bytes") else None


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The RESULT figures: speeds, validation delta and MFU on SmolLM2; memory ratios (training-phase peak RSS,
    desktune / recipe) on both models."""
    nan = float("nan")
    smol, tiny = results.get("smollm2"), results.get("tiny-llama3")
    out = dict.fromkeys(("speedup_vs_recipe", "speedup_vs_trl_best", "speedup_equal_objective",
                         "mem_ratio_vs_recipe", "mem_ratio_smol", "val_loss_delta_pct", "mfu_pct"), nan)
    if smol:
        r = smol["res"]
        out["speedup_vs_recipe"] = ratio(r["recipe"]["time_s"], r["desktune"]["time_s"])
        out["speedup_vs_trl_best"] = ratio(r[smol["trl_best"]]["time_s"], r["desktune"]["time_s"])
        out["speedup_equal_objective"] = ratio(r[smol["trl_best_all"]]["time_s"], r["desktune_all"]["time_s"])
        out["mem_ratio_smol"] = ratio(r["desktune"]["train_rss_bytes"], r["recipe"]["train_rss_bytes"])
        ref = "trl_asst" if "trl_asst" in r else "recipe"
        out["val_loss_delta_pct"] = 100 * (ratio(r["desktune"]["val"]["assistant"], r[ref]["val"]["assistant"]) - 1)
        out["mfu_pct"] = r["desktune"]["mfu_pct"]
    if tiny:
        r = tiny["res"]
        out["mem_ratio_vs_recipe"] = ratio(r["desktune"]["train_rss_bytes"], r["recipe"]["train_rss_bytes"])
    return out


def print_summary(results: dict[str, Any], figures: dict[str, float]) -> None:
    """The pairs behind the RESULT line, memory ratios in every measure on every model, and the targets."""
    for name, m in results.items():
        r = m["res"]
        pairs = [("desktune", "recipe"), ("desktune", m["trl_best"]), ("desktune_all", m["trl_best_all"])]
        print(f"{name}: " + "; ".join(
            f"{a}/{b}: time {ratio(r[a]['time_s'], r[b]['time_s']):.3f}, trainRSS "
            f"{ratio(r[a]['train_rss_bytes'], r[b]['train_rss_bytes']):.3f}, peakRSS "
            f"{ratio(r[a]['rss_bytes'], r[b]['rss_bytes']):.3f}, growth while training "
            f"{ratio(rss_growth(r[a]), rss_growth(r[b])):.3f}, tracked "
            f"{ratio(r[a]['tracked_peak'], r[b]['tracked_peak']):.3f}" for a, b in pairs))
        vals = [("desktune", "trl_asst", "assistant"), ("desktune", "recipe", "assistant"),
                ("desktune_all", m["trl_best_all"], "all"), ("desktune_all", "recipe", "all")]
        print(f"{name} validation loss deltas: " + "; ".join(
            f"{a} vs {b} ({k} tokens) {100 * (ratio(r[a]['val'][k], r[b]['val'][k]) - 1):+.2f}%"
            for a, b, k in vals if b in r) + f"; base model {m['base_val']['assistant']:.4f} assistant / "
            f"{m['base_val']['all']:.4f} all")
    print("speedup_vs_recipe: recipe / desktune; speedup_vs_trl_best: trl_best / desktune; speedup_equal_objective: "
          "the fastest all-token TRL variant / desktune_all (every token scored by both); mem ratios: trainRSS "
          "desktune / recipe (mem_ratio_vs_recipe on the 128k-vocabulary tiny Llama, mem_ratio_smol on SmolLM2); "
          "val_loss_delta_pct: desktune vs trl_asst on assistant tokens, SmolLM2; mfu_pct: desktune on SmolLM2")
    for key, (op, target) in TARGETS.items():
        v = figures[key]
        ok = abs(v) <= target if op == "abs<=" else v >= target if op == ">=" else v <= target
        miss = "" if ok else f" (missed by {abs(abs(v) - target) if op == 'abs<=' else abs(v - target):.3f})"
        print(f"target {key} {op.replace('abs', '|x| ')} {target}: {v:.3f} {'met' if ok else 'MISSED'}{miss}")


if __name__ == "__main__":
    sys.exit(main())
