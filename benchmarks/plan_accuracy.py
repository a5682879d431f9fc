"""How close is the memory planner to reality? Real training steps on small random Llamas, measured, compared.

Each setting builds a small Llama (random weights; fp32 on the CPU, bf16 on CUDA), attaches LoRA the way
desktune does (NF4 base for QLoRA: torchao on the CPU, bitsandbytes on CUDA), runs 2 optimizer steps (so AdamW
state exists) on random token ids with every position a target, and measures the peak with `PeakTracker`
(live tensors on the CPU, the allocator's peak on CUDA). The prediction compared is the plan's tensor bytes
(the CUDA context is outside the allocator and not measured).

The in-sample settings are the ones the estimator's terms were checked against while it was written; the
held-out settings were added afterwards and never used to change it: other shapes, bf16 (where the CPU has it
natively), all-linear at rank 64, QLoRA, padded rows with selective checkpointing, and the embedded SmolLM2
trained through desktune's own `setup`/`fit` on the demo's real chats with validation. That last one runs in a
fresh process and is also compared as a whole process: the plan's total (tensors + the measured non-tensor
overhead) against the process's peak RSS. Its prediction takes each micro-batch the run really formed (rows,
padded length or, packed, mean length, target share) and keeps the largest plan.

    HF_HUB_OFFLINE=1 python benchmarks/plan_accuracy.py [--quick] [--device cpu|cuda]

Last line: RESULT plan_max_abs_error_pct=<worst |error| %> plan_mean_abs_error_pct=<mean |error| %>
heldout_max_abs_error_pct=<x> heldout_mean_abs_error_pct=<x> rss_error_pct=<x>
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from desktune.adapters import attach_lora
from desktune.config import LoraConfig, TrainConfig
from desktune.data import pack
from desktune.data.encode import Example
from desktune.memory.catalog import ArchSpec
from desktune.memory.estimate import PlanInputs, estimate
from desktune.memory.measure import PeakTracker, model_tensors
from desktune.models.packed_attention import use_packed_attention
from desktune.scoring.ce import target_ce_sum
from desktune.training.optim import make_optimizer

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Setting:
    """One measured configuration."""

    hidden: int
    layers: int
    vocab: int
    seq: int
    batch: int
    quant: str = "none"
    ckpt: bool | str = False  # False, True (full) or "selective"
    chunked: bool = True
    targets: tuple[str, ...] | str = QKVO
    dropout: float = 0.05
    accum: int = 1
    attn: str = "sdpa"
    padded: bool = False  # the first row's last quarter is padding (masked, no targets)
    packed: bool = False  # the batch's samples in one padding-free row, desktune's packed attention
    rank: int = 16
    bf16: bool = False  # compute in bf16 (held-out; on the CPU only where it is native)

    @property
    def label(self) -> str:
        kind = "qlora" if self.quant == "nf4" else "lora"
        tg = "all" if self.targets == "all-linear" else "".join(t[0] for t in self.targets)
        return (f"{kind} h{self.hidden} L{self.layers} V{self.vocab // 1000}k s{self.seq} b{self.batch}x{self.accum} "
                f"{self.ckpt_name} {'chunk' if self.chunked else 'full'} {tg} r{self.rank}"
                f"{' bf16' if self.bf16 else ''} "
                f"p{self.dropout:g} {self.attn}{' padded' if self.padded else ''}{' packed' if self.packed else ''}")

    @property
    def ckpt_name(self) -> str:
        return {False: "no-ckpt", True: "ckpt", "selective": "sel-ckpt"}[self.ckpt]

    def arch(self) -> ArchSpec:
        heads = self.hidden // 64
        return ArchSpec(name="bench", family="llama", hidden=self.hidden, intermediate=self.hidden * 11 // 4,
                        layers=self.layers, heads=heads, kv_heads=max(1, heads // 2), head_dim=64,
                        vocab=self.vocab, tied_embeddings=self.vocab < 100_000)


V49, V128 = 49_152, 128_256
FULL = [
    Setting(256, 2, V49, 128, 1),
    Setting(256, 2, V49, 512, 2, chunked=False),
    Setting(256, 2, V49, 1024, 1),
    Setting(256, 4, V49, 1024, 2, ckpt=True),
    Setting(256, 4, V49, 1024, 2, ckpt=True, chunked=False),
    Setting(256, 2, V49, 512, 2, quant="nf4"),
    Setting(512, 2, V49, 1024, 1, quant="nf4", chunked=False),
    Setting(256, 4, V49, 512, 2, quant="nf4", ckpt=True),
    Setting(512, 2, V128, 128, 2, chunked=False),
    Setting(512, 2, V128, 256, 1),
    Setting(256, 2, V128, 256, 2, accum=2),
    Setting(256, 2, V128, 256, 4, quant="nf4", ckpt=True, chunked=False),
    Setting(256, 4, V49, 512, 4, targets="all-linear", dropout=0.0),
    Setting(512, 2, V49, 1024, 1, ckpt=True, chunked=False, targets="all-linear", dropout=0.0),
    Setting(256, 2, V128, 512, 2, quant="nf4", ckpt=True, targets="all-linear"),
    Setting(256, 2, V49, 512, 2, attn="eager"),
    Setting(256, 2, V49, 512, 4, padded=True),
    Setting(512, 4, V49, 1024, 2, targets="all-linear"),  # activations dominate
    Setting(512, 4, V49, 1024, 4, ckpt=True, targets="all-linear"),
    Setting(512, 4, V49, 512, 4, quant="nf4", targets="all-linear", dropout=0.0),
    Setting(512, 4, V128, 1024, 2),
    Setting(256, 4, V49, 1024, 4, ckpt=True, attn="eager"),
    Setting(512, 4, V49, 1024, 2, ckpt="selective", targets="all-linear"),
    Setting(256, 4, V49, 512, 4, packed=True),
    Setting(256, 4, V128, 512, 2, packed=True, ckpt=True),
]
QUICK = [FULL[0], FULL[4], FULL[5], FULL[16]]
HELD_OUT = [
    Setting(384, 3, V49, 768, 2, bf16=True),
    Setting(384, 3, V49, 512, 2, targets="all-linear", rank=64, dropout=0.0),
    Setting(384, 3, V128, 512, 2, quant="nf4", targets="all-linear", dropout=0.0),
    Setting(384, 3, V49, 512, 2, quant="nf4", bf16=True, ckpt=True),
    Setting(384, 4, V49, 768, 4, padded=True, ckpt="selective", targets="all-linear", dropout=0.0),
    Setting(768, 2, V49, 384, 2, targets="all-linear", rank=32, bf16=True, ckpt="selective"),
]


def build(s: Setting, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random Llama of the setting's shape with LoRA attached (and an NF4 base for QLoRA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from desktune.models.quantize import load_time_config, quantize_in_place

    arch = s.arch()
    cfg = LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                      num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                      num_key_value_heads=arch.kv_heads, head_dim=arch.head_dim, max_position_embeddings=4096,
                      tie_word_embeddings=arch.tied_embeddings, attn_implementation=s.attn)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    bnb = load_time_config(s.quant, True, dtype, device.type) if s.quant != "none" else None
    if bnb is not None:  # CUDA: bitsandbytes quantizes at load time, as desktune loads models
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            model = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=bnb,
                                                     device_map={"": device.index or 0},
                                                     attn_implementation=s.attn)
    else:
        model = model.to(device)
        if s.quant != "none":
            quantize_in_place(model, s.quant, True, dtype, device.type)
    model.requires_grad_(False)
    if s.packed:
        use_packed_attention(model)
    lora = LoraConfig(r=s.rank, alpha=2 * s.rank, dropout=s.dropout, target_modules=list(s.targets)
                      if isinstance(s.targets, tuple) else s.targets)
    return attach_lora(model, lora, gradient_checkpointing=s.ckpt)


def batch(s: Setting, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One micro-batch of random tokens, every real position a target: padded rows, or one packed row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=g)
    if s.packed:
        return {k: v.to(device) for k, v in pack([Example(input_ids=row, labels=row, source="r")
                                                  for row in ids.tolist()]).items()}
    mask = torch.ones(s.batch, s.seq, dtype=torch.long)
    if s.padded:
        mask[0, -s.seq // 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def predict(s: Setting, device: torch.device, dtype: torch.dtype) -> int:
    """The plan's tensor bytes for the setting."""
    labels = batch(s, 0, torch.device("cpu"))["labels"]
    fraction = int((labels[:, 1:] != -100).sum()) / (s.batch * (s.seq - 1))
    inputs = PlanInputs(arch=s.arch(), seq_len=s.seq, micro_batch=s.batch, grad_accum=s.accum,
                        dtype_bytes=torch.finfo(dtype).bits // 8, device_type=device.type, quant=s.quant,
                        attn_implementation=s.attn, lora_r=s.rank, lora_targets=s.targets, lora_dropout=s.dropout,
                        optimizer="adamw", gradient_checkpointing=s.ckpt, chunked_loss=s.chunked, padded=s.padded,
                        packed=s.packed, target_fraction=fraction)
    return estimate(inputs).tensor_bytes


def measure(s: Setting, device: torch.device, dtype: torch.dtype) -> int:
    """Peak bytes over 2 optimizer steps of the setting, as desktune's loop runs them (with the switches its step
    uses here: a 16-bit model's adapters computing in its dtype, the CPU's word-drawn dropout masks)."""
    from desktune.training.speed import Switches, switched_on

    model = build(s, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainConfig(optimizer="adamw", lr=2e-4), device)
    batches = [batch(s, i, device) for i in range(2 * s.accum)]
    switches = Switches(adapters_autocast=None if dtype == torch.float32 else dtype,
                        word_dropout=device.type == "cpu" and s.dropout > 0)
    with switched_on(model, switches), PeakTracker(device, model_tensors(model)) as tracker:
        for step in range(2):
            for m in range(s.accum):
                b = batches[step * s.accum + m]
                with switches.forward_context(device, model):
                    loss, n = target_ce_sum(model, b["input_ids"], b["labels"], b.get("attention_mask"),
                                            position_ids=b.get("position_ids"), chunked=s.chunked)
                (loss / (n * s.accum)).backward()
                del loss
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak = tracker.peak_bytes
    del model, optimizer, params, batches, tracker
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak


def product_child(overrides: list[str]) -> dict[str, float]:
    """In this (fresh) process: the demo config through desktune's setup/fit; plan vs tensor peak and RSS peak."""
    from desktune.config import load_config
    from desktune.data import batching
    from desktune.hardware import memory_telemetry
    from desktune.memory.budget import plan_run
    from desktune.training import loop, step

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "demo.yaml", overrides)
    run = loop.setup(cfg, quiet=True)
    shapes: list[tuple[int, int, float, bool]] = []  # (rows, padded length, target share, padded)

    def spy(examples, micro, **kw):  # every micro-batch the run forms, as it forms it
        out = batching.micro_batches(examples, micro, **kw)
        for chunk, _ in out:
            lengths, targets = [len(e.input_ids) for e in chunk], sum(e.n_target for e in chunk)
            if kw.get("packing"):  # one padding-free row: the planner's packed layout of b samples of mean length
                mean = math.ceil(sum(lengths) / len(chunk))
                shapes.append((len(chunk), mean, targets / (len(chunk) * (mean - 1)), False))
            else:
                longest = max(lengths)
                shapes.append((len(chunk), longest, targets / (len(chunk) * (longest - 1)),
                               any(n < longest for n in lengths)))
        return out

    step.micro_batches = spy
    with PeakTracker(torch.device("cpu"), model_tensors(run.model)) as tracker:
        loop.fit(run)
    hw = run.loaded.hardware
    inputs, _ = plan_run(run.cfg, "cpu", hw.dtype.itemsize, cpu_attention_kernel=hw.cpu_attention_kernel)
    plans = [estimate(inputs.with_(micro_batch=b, seq_len=n, target_fraction=f, padded=pad))
             for b, n, f, pad in set(shapes)]
    worst = max(plans, key=lambda p: p.total)
    return {"predicted": worst.tensor_bytes, "measured": tracker.peak_bytes, "plan_total": worst.total,
            "rss_peak": memory_telemetry(torch.device("cpu")).peak_rss_bytes,
            "dtype": str(run.loaded.hardware.dtype)[6:]}


def product(overrides: list[str]) -> dict[str, float]:
    """`product_child` in a fresh process (so its peak RSS is this run's alone)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--product-child", json.dumps(overrides)], env=env,
                          capture_output=True, text=True, check=False, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


PRODUCT = [
    ["train.max_steps=4", "train.eval_every=2"],
    ["train.max_steps=4", "train.eval_every=2", "train.gradient_checkpointing=selective", "lora.r=64"],
    ["train.max_steps=4", "train.eval_every=2", "model.dtype=fp32", "train.micro_batch_size=8",
     "train.grad_accum=1"],
]


def run_settings(title: str, settings: list[Setting], device: torch.device, dtype: torch.dtype) -> list[float]:
    """Predict and measure each setting, print a row each; the absolute errors in %."""
    from desktune.hardware import cpu_supports_bf16

    print(f"{title}: {len(settings)} settings", flush=True)
    print(f"{'setting':<80} {'predicted':>11} {'measured':>11} {'error':>8}", flush=True)
    errors = []
    for s in settings:
        if s.bf16 and device.type == "cpu" and not cpu_supports_bf16():
            print(f"{s.label:<80} skipped: this CPU has no native bf16", flush=True)
            continue
        t1 = time.perf_counter()
        use = torch.bfloat16 if s.bf16 else dtype
        pred, meas = predict(s, device, use), measure(s, device, use)
        err = 100.0 * (pred - meas) / meas
        errors.append(abs(err))
        print(f"{s.label:<80} {pred / 2**20:>9.1f}Mi {meas / 2**20:>9.1f}Mi {err:>+7.1f}%  "
              f"({time.perf_counter() - t1:.0f}s)", flush=True)
    return errors


def run_product(device: torch.device, quick: bool) -> tuple[list[float], list[float]]:
    """The embedded model through desktune's own path: tensor errors and whole-process (RSS) errors in %."""
    if device.type != "cpu":
        return [], []
    print("held-out, the product's own path (SmolLM2-135M, demo chats, validation):", flush=True)
    errors, rss = [], []
    for overrides in PRODUCT[:1] if quick else PRODUCT:
        r = product(overrides)
        err = 100.0 * (r["predicted"] - r["measured"]) / r["measured"]
        rss_err = 100.0 * (r["plan_total"] - r["rss_peak"]) / r["rss_peak"]
        errors.append(abs(err))
        rss.append(rss_err)
        print(f"{' '.join(o for o in overrides if 'steps' not in o and 'eval' not in o) or 'demo defaults'} "
              f"({r['dtype']}): tensors {r['predicted'] / 2**20:.1f}Mi planned vs {r['measured'] / 2**20:.1f}Mi "
              f"({err:+.1f}%); process {r['plan_total'] / 2**20:.1f}Mi planned vs peak RSS "
              f"{r['rss_peak'] / 2**20:.1f}Mi ({rss_err:+.1f}%)", flush=True)
    return errors, rss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few settings of each kind (smoke run)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--product-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from desktune.models.loading import quiet_transformers
    from desktune.models.quantize import import_torchao_quietly

    quiet_transformers()
    import_torchao_quietly()
    if args.product_child is not None:
        print(json.dumps(product_child(json.loads(args.product_child))), flush=True)
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device}, dtype {dtype}", flush=True)
    t0 = time.perf_counter()
    inside = run_settings("in-sample", QUICK if args.quick else FULL, device, dtype)
    held = run_settings("held-out", HELD_OUT[:2] if args.quick else HELD_OUT, device, dtype)
    prod, rss = run_product(device, args.quick)
    held += prod
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)
    worst_rss = max(rss, key=abs) if rss else float("nan")
    print(f"RESULT plan_max_abs_error_pct={max(inside):.2f} plan_mean_abs_error_pct={sum(inside) / len(inside):.2f} "
          f"heldout_max_abs_error_pct={max(held):.2f} heldout_mean_abs_error_pct={sum(held) / len(held):.2f} "
          f"rss_error_pct={worst_rss:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
