"""QLoRA on the Llama-3.1-8B architecture, one CUDA GPU: desktune against TRL + PEFT + bitsandbytes NF4.

Model: LlamaConfig of Llama 3.1 8B (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 kv heads, vocab
128,256, rope theta 500000 with llama3 scaling, untied head) with random bf16 weights (speed and memory do not
depend on the values), written once as safetensors (~16 GB) and loaded the same way by every system.
Data: rows of exactly --seq tokens (2048), every position a target: chat-templated chitchat conversations
concatenated as plain text. desktune reads the text rows (`text` format, truncated to data.max_seq_len = seq);
TRL gets the same token ids pre-tokenized (the first seq tokens of the row, as desktune encodes it).
Systems, each in its own process, micro-batch 2 x accumulation 4, lr 2e-4 linear, LoRA r16/alpha32/dropout 0.05
on q,k,v,o:
  recipe    TRL SFTTrainer + PEFT on a BitsAndBytesConfig base (4-bit NF4, double quantization, bf16 compute),
            TRL defaults (gradient checkpointing on, TRL's fused chunked log-prob loss);
  trl_best  the same with packing + padding-free, gradient checkpointing off (flash_attention_2 when the
            flash-attn package is installed, else sdpa);
  desktune  desktune.train with model.quant nf4 (bitsandbytes on CUDA) and its defaults otherwise: on CUDA its
            memory fitting (train.memory_budget unset = the free GPU memory) may lower the micro-batch (same
            effective batch) or turn on checkpointing so the run fits the card; what it chose is printed.
Reported: tokens/s (rows x seq / training-loop seconds: first step's begin to last step's end, first step
included), peak VRAM from the start of training to its end (torch.cuda.max_memory_allocated and
max_memory_reserved, model weights included), each system's last logged train loss, an all-token validation loss
on 2 held-out rows (the shared full-logits function of recipe_common, run on the trained model in its own process),
MFU % against the best measured bf16 8192^3 matmul with the FLOP formula of vs_standard_recipe.py
(4*P_frozen*l + 6*P_lora*l + 6*n_layers*l^2*(n_heads*head_dim) + 4*V*hidden*n_scored, n_scored = seq - 1 a row),
and the CPU cores other processes kept busy during each timed run.
Published reference: torchtune, Llama 3.1 8B QLoRA on one RTX 4090: 7.4 GiB peak, 2413 tokens/s.

    HF_HUB_OFFLINE=1 python benchmarks/gpu_qlora.py [--steps 6] [--seq 2048] [--model-dir DIR] [--keep]
    HF_HUB_OFFLINE=1 python benchmarks/gpu_qlora.py --tiny     # plumbing test on any device

Needs desktune (with bitsandbytes and its embedded SmolLM2, whose tokenizer is used), trl, peft, datasets and the
chitchat-dataset wheel; about 16 GB of disk for the random model (--model-dir puts it elsewhere and reuses it),
and the GPU memory to initialise it in 16 bits (else it is initialised in host memory, slower).

Without CUDA it prints that it needs a CUDA GPU and exits with status 2, unless --tiny: the same code path on a
tiny Llama (2 layers, hidden 256, Llama-3 vocabulary, seq 256) on whatever device exists. On the CPU, TRL runs
unquantized (bitsandbytes 4-bit is not trustworthy off CUDA) while desktune uses NF4 through torchao, so the CPU
figures are plumbing only, not a comparison.

Last line: RESULT speedup_vs_recipe=<x> speedup_vs_trl_best=<x> mem_ratio_vs_recipe=<x> val_loss_delta_pct=<x>
mfu_pct=<x> gpu="<name>" (desktune's; mem ratio: max_memory_allocated desktune / recipe).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recipe_common import (
    DTYPE_NAMES,
    SYSTEMS,
    arch_of,
    chitchat_conversations,
    matmul_peak,
    model_flops,
    render,
    run_worker,
    worker_main,
)

GiB = 2**30
REFERENCE = "torchtune (published): Llama 3.1 8B QLoRA, one RTX 4090: 7.4 GiB peak, 2413 tokens/s"
LLAMA31_8B = {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "max_positions": 131072}
TINY = {"hidden": 256, "intermediate": 896, "layers": 2, "heads": 4, "kv_heads": 1, "max_positions": 131072}
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def make_model(path: Path, shape: dict[str, int], tokenizer_dir: Path, device: Any, dtype: Any) -> None:
    """Write a random Llama-3.1-shaped model (weights initialised on `device`, in `dtype`) and the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(vocab_size=128_256, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], head_dim=shape["hidden"] // shape["heads"],
                      max_position_embeddings=shape["max_positions"], rope_parameters=dict(ROPE),
                      tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    n_params = (2 * 128_256 * shape["hidden"] + shape["layers"] * shape["hidden"] * (
        2 * shape["hidden"] + 2 * shape["kv_heads"] * shape["hidden"] // shape["heads"] + 3 * shape["intermediate"]))
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 1.2 * n_params * 2:
        device = torch.device("cpu")  # initialise in host memory when the GPU cannot hold the 16-bit model
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=path.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker: the device and dtype desktune picks, the model folder (written unless present) and the matmul peak."""
    import torch

    from desktune.hardware import detect
    from desktune.models.gguf import embedded_model_dir

    hw = detect("auto", "auto")
    n = 8192 if hw.device.type == "cuda" else 2048
    peak = matmul_peak(hw.dtype, hw.device, n=n, reps=10 if hw.device.type == "cuda" else 5)
    if hw.device.type == "cuda":
        torch.cuda.empty_cache()
    path = Path(spec["model_dir"])
    t0 = time.perf_counter()
    made = not (path / "config.json").exists()
    if made:
        make_model(path, spec["shape"], embedded_model_dir(), hw.device, hw.dtype)
    return {"device": hw.device.type, "dtype": DTYPE_NAMES[hw.dtype], "name": hw.name, "peak": peak,
            "matmul_n": n, "made_s": time.perf_counter() - t0 if made else None,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None}


def token_rows(tokenizer: Any, n_rows: int, seq: int, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """Rows of concatenated chat-templated conversations holding at least seq tokens, and each row's first seq
    token ids as desktune encodes text (tokenizer with special tokens, eos appended, truncated)."""
    convs = chitchat_conversations()
    random.Random(seed).shuffle(convs)
    it = iter(convs)
    texts, ids_rows = [], []
    while len(texts) < n_rows:
        text = ""
        ids: list[int] = []
        while len(ids) < seq:
            text += render(tokenizer, next(it))
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        texts.append(text)
        ids_rows.append([*ids, tokenizer.eos_token_id][:seq])
    return texts, ids_rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chosen_settings(adapter_dir: str) -> str:
    """What desktune's memory fitting chose for its run (on CUDA an unset train.memory_budget fits to the free
    GPU memory), read back from the run folder."""
    from desktune.config import load_config
    from desktune.runs import EventRecord, RunDir, read_records, records_of

    run = RunDir(Path(adapter_dir).parent)
    t = load_config(run.config).train
    notes = [e.message for e in records_of(read_records(run.metrics), EventRecord) if e.name == "memory_fit"]
    return (f"desktune chose micro-batch {t.micro_batch_size} x accumulation {t.grad_accum}, gradient "
            f"checkpointing {t.gradient_checkpointing or 'off'}" + (f" ({notes[0]})" if notes else
                                                                    " (no memory fitting on this device)"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="tiny Llama, seq 256, on whatever device exists")
    ap.add_argument("--steps", type=int, help="optimizer steps per system (default 6; --tiny 2)")
    ap.add_argument("--seq", type=int, help="tokens per row (default 2048; --tiny 256)")
    ap.add_argument("--model-dir", help="folder of the random model (written there on first use; default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (model, data, adapters)")
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text(encoding="utf-8"))
        if spec["kind"] != "prepare":
            return worker_main(args.worker)
        Path(spec["result"]).write_text(json.dumps(prepare(spec)), encoding="utf-8")
        return 0

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_qlora.py needs a CUDA GPU and none is visible (run with --tiny for the plumbing test on this "
              "machine)", flush=True)
        return 2
    from transformers import AutoConfig, AutoTokenizer

    from desktune.models.gguf import embedded_model_dir
    from desktune.models.loading import quiet_transformers
    from desktune.models.quantize import import_torchao_quietly

    quiet_transformers()
    import_torchao_quietly()
    t_start = time.perf_counter()
    steps = args.steps or (2 if args.tiny else 6)
    seq = args.seq or (256 if args.tiny else 2048)
    shape = TINY if args.tiny else LLAMA31_8B
    work = Path(tempfile.mkdtemp(prefix="gpu-qlora-"))
    mdir = Path(args.model_dir) if args.model_dir else work / ("tiny-llama31" if args.tiny else "llama31-8b-random")
    mdir.parent.mkdir(parents=True, exist_ok=True)
    hw = run_worker(__file__, {"kind": "prepare", "model_dir": str(mdir), "shape": shape})
    cuda = hw["device"] == "cuda"
    print(f"device {hw['name']}, dtype {hw['dtype']}; matmul peak {hw['peak'] / 1e12:.2f} TFLOP/s "
          f"(best {hw['matmul_n']}^3 in {hw['dtype']})"
          + (f"; random model written in {hw['made_s']:.0f}s" if hw["made_s"] else "") + f"\n{REFERENCE}", flush=True)

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    n_rows = steps * 8
    texts, ids_rows = token_rows(tok, n_rows + 2, seq)
    files = {"text": write_rows(work / "train_text.jsonl", [{"text": t} for t in texts[:n_rows]]),
             "ids": write_rows(work / "train_ids.jsonl", [{"input_ids": ids} for ids in ids_rows[:n_rows]]),
             "val": write_rows(work / "val_ids.jsonl", [{"input_ids": ids} for ids in ids_rows[n_rows:]])}
    attn_best = "flash_attention_2" if cuda and hw["flash_attn"] else "sdpa"
    quant = {s: "nf4" if cuda or s == "desktune" else "none" for s in SYSTEMS}
    base = {"kind": "train", "model_dir": str(mdir), "dtype": hw["dtype"], "device": hw["device"], "max_len": seq,
            "out_dir": str(work / "runs"), "val_ids_file": str(files["val"]), "train_on": "all", "track": True}
    res: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        t0 = time.perf_counter()
        spec = {**base, "system": system, "quant": quant[system],
                "train_file": str(files["text" if system == "desktune" else "ids"])}
        if system == "trl_best":
            spec["attn"] = attn_best
        res[system] = run_worker(__file__, spec)
        print(f"  {system}: {res[system]['steps']} steps, {res[system]['train_s']:.1f}s training "
              f"({time.perf_counter() - t0:.0f}s with loading)", flush=True)

    arch = arch_of(AutoConfig.from_pretrained(str(mdir)))
    tokens = n_rows * seq
    flops = model_flops(arch, [seq] * n_rows, n_rows * (seq - 1))
    for r in res.values():
        r["tokens_per_s"] = tokens / r["train_s"]
        r["mfu_pct"] = 100 * flops / r["train_s"] / hw["peak"]
    ref = res["recipe"]
    print(f"\n{'tiny Llama (2 layers, hidden 256)' if args.tiny else 'Llama-3.1-8B architecture'}, random weights; "
          f"{n_rows} rows x {seq} tokens, micro-batch 2 x accumulation 4; device: {hw['name']}")
    head = (f"{'system':<9} {'base':<11} {'steps':>5} {'train s':>8} {'tokens/s':>9} {'speedup':>8} "
            f"{'max alloc GiB':>13} {'max resv GiB':>12} {'RSS GiB':>8} {'train loss':>10} {'val loss':>9} "
            f"{'MFU %':>6} {'other':>6}")
    print(head)
    print("-" * len(head))
    for system in SYSTEMS:
        r = res[system]
        backend = ("bnb-nf4" if cuda else "torchao-nf4") if quant[system] == "nf4" else hw["dtype"]
        resv = "-" if r["reserved_bytes"] is None else f"{r['reserved_bytes'] / GiB:.2f}"
        print(f"{system:<9} {backend:<11} {r['steps']:>5} {r['train_s']:>8.1f} {r['tokens_per_s']:>9.1f} "
              f"{ref['train_s'] / r['train_s']:>7.2f}x {r['peak_bytes'] / GiB:>13.2f} {resv:>12} "
              f"{r['rss_bytes'] / GiB:>8.2f} {r['final_loss']:>10.4f} {r['val']['all']:>9.4f} {r['mfu_pct']:>6.2f} "
              f"{r['other_cores']:>6.2f}")
    print(f"tokens per system (expected {tokens}): " + ", ".join(f"{s} {res[s]['tokens']}" for s in SYSTEMS)
          + f"; trl_best attention: {attn_best}; gradient checkpointing: "
          + ", ".join(f"{s} {'on' if res[s].get('gradient_checkpointing') else 'off'}" for s in SYSTEMS)
          + "; other: CPU cores other processes kept busy during the timed run")
    if not cuda:
        print("CPU: max alloc = live tensors tracked by PeakTracker during the timed run (its dispatch mode slows "
              "the run); TRL unquantized, desktune NF4 (torchao): plumbing only, not a comparison")
    print(chosen_settings(res["desktune"]["adapter_dir"]))
    print(REFERENCE)
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    d = res["desktune"]
    delta = 100 * (d["val"]["all"] - ref["val"]["all"]) / ref["val"]["all"]
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    print(f"RESULT speedup_vs_recipe={ref['train_s'] / d['train_s']:.3f} "
          f"speedup_vs_trl_best={res['trl_best']['train_s'] / d['train_s']:.3f} "
          f"mem_ratio_vs_recipe={d['peak_bytes'] / ref['peak_bytes']:.3f} val_loss_delta_pct={delta:.2f} "
          f"mfu_pct={d['mfu_pct']:.2f} gpu=\"{hw['name']}\"", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
