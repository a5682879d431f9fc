"""How close is the memory planner to reality? Real training steps on small random Llamas, measured, compared.

Each setting builds a small Llama (random weights; fp32 on the CPU, bf16 on CUDA), attaches LoRA the way
desktune does (NF4 base for QLoRA: torchao on the CPU, bitsandbytes on CUDA), runs 2 optimizer steps (so AdamW
state exists) on random token ids with every position a target, and measures the peak with `PeakTracker`
(live tensors on the CPU, the allocator's peak on CUDA). The prediction compared is the plan's tensor bytes
(the CUDA context is outside the allocator and not measured).

    HF_HUB_OFFLINE=1 python benchmarks/plan_accuracy.py [--quick] [--device cpu|cuda]

Last line: RESULT plan_max_abs_error_pct=<worst |error| %> plan_mean_abs_error_pct=<mean |error| %>
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass

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

    @property
    def label(self) -> str:
        kind = "qlora" if self.quant == "nf4" else "lora"
        tg = "all" if self.targets == "all-linear" else "".join(t[0] for t in self.targets)
        return (f"{kind} h{self.hidden} L{self.layers} V{self.vocab // 1000}k s{self.seq} b{self.batch}x{self.accum} "
                f"{self.ckpt_name} {'chunk' if self.chunked else 'full'} {tg} "
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
    lora = LoraConfig(r=16, alpha=32, dropout=s.dropout, target_modules=list(s.targets)
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
                        attn_implementation=s.attn, lora_r=16, lora_targets=s.targets, lora_dropout=s.dropout,
                        optimizer="adamw", gradient_checkpointing=s.ckpt, chunked_loss=s.chunked, padded=s.padded,
                        packed=s.packed, target_fraction=fraction)
    return estimate(inputs).tensor_bytes


def measure(s: Setting, device: torch.device, dtype: torch.dtype) -> int:
    """Peak bytes over 2 optimizer steps of the setting, as desktune's loop runs them."""
    model = build(s, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainConfig(optimizer="adamw", lr=2e-4), device)
    batches = [batch(s, i, device) for i in range(2 * s.accum)]
    with PeakTracker(device, model_tensors(model)) as tracker:
        for step in range(2):
            for m in range(s.accum):
                b = batches[step * s.accum + m]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 settings (smoke run)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from desktune.models.loading import quiet_transformers
    from desktune.models.quantize import import_torchao_quietly

    quiet_transformers()
    import_torchao_quietly()
    settings = QUICK if args.quick else FULL
    print(f"device {device}, dtype {dtype}, {len(settings)} settings", flush=True)
    print(f"{'setting':<72} {'predicted':>11} {'measured':>11} {'error':>8}", flush=True)
    errors = []
    t0 = time.perf_counter()
    for s in settings:
        t1 = time.perf_counter()
        pred = predict(s, device, dtype)
        meas = measure(s, device, dtype)
        err = 100.0 * (pred - meas) / meas
        errors.append(abs(err))
        print(f"{s.label:<72} {pred / 2**20:>9.1f}Mi {meas / 2**20:>9.1f}Mi {err:>+7.1f}%  "
              f"({time.perf_counter() - t1:.0f}s)", flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"RESULT plan_max_abs_error_pct={max(errors):.2f} plan_mean_abs_error_pct={sum(errors) / len(errors):.2f}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
