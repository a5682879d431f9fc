"""desktune's CPU attention kernel against the PyTorch paths it replaces, on the race's own samples.

The 24 training conversations of vs_standard_recipe.py (SmolLM2's template, seed 0), two to a packed row as the
race's micro-batches hold them, SmolLM2-135M's attention shape (9 query heads, 3 key/value heads, head_dim 64),
bf16 inputs: one layer's forward and backward over all 12 rows, timed (best of --reps) for
  kernel      models/cpu_attention.py: one call per row
  sdpa_fp32   what desktune ran before on a bf16 CPU: each sample's causal SDPA in fp32 (copies in, cast out)
  sdpa_bf16   each sample's causal SDPA in bf16 (PyTorch's CPU flash attention with fp32 accumulation)
and the kernel's error against fp32 SDPA (relative Frobenius norm, output and gradients). GFLOP/s counts causal
attention as the race's MFU does (6 * l^2 * heads * head_dim per sample, forward and backward).

    HF_HUB_OFFLINE=1 python benchmarks/cpu_attention.py [--reps 5]

Last line: RESULT speedup_vs_sdpa_fp32=<x> speedup_vs_sdpa_bf16=<x> kernel_gflops=<x> out_rel_err=<x>
grad_rel_err=<x>
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

HEADS, GROUPS, HEAD_DIM = 9, 3, 64


def race_lengths() -> list[int]:
    """The race's training conversations' token counts, in file order."""
    from recipe_common import select_conversations
    from transformers import AutoTokenizer

    from desktune.models.gguf import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    return select_conversations(tok, 24, 12, 1024).train_lengths


def per_sample_sdpa(q, k, v, bounds, fp32: bool) -> torch.Tensor:
    up = (lambda t: t.float()) if fp32 else (lambda t: t)
    outs = [F.scaled_dot_product_attention(up(q[:, :, s:e]), up(k[:, :, s:e]), up(v[:, :, s:e]), is_causal=True,
                                           enable_gqa=True).transpose(1, 2) for s, e in bounds]
    return torch.cat(outs, 1).to(q.dtype)


def make_rows(lengths: list[int]) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for a, b in zip(lengths[::2], lengths[1::2], strict=True):
        t = a + b
        q, k, v = (torch.randn(1, t, h, HEAD_DIM, generator=g).bfloat16().transpose(1, 2).requires_grad_()
                   for h in (HEADS, GROUPS, GROUPS))
        rows.append((q, k, v, [(0, a), (a, t)], torch.randn(1, t, HEADS, HEAD_DIM, generator=g).bfloat16()))
    return rows


def timed(fn, rows, reps: int) -> float:
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        for q, k, v, bounds, grad in rows:
            fn(q, k, v, bounds).backward(grad)
            q.grad = k.grad = v.grad = None
        best = min(best, time.perf_counter() - t0)
    return best


def errors(rows, fn) -> tuple[float, float]:
    """Worst relative error of fn's output and of its q/k/v gradients against fp32 SDPA, over the rows."""
    worst_out = worst_grad = 0.0
    for q, k, v, bounds, grad in rows:
        res = []
        for f in (fn, lambda *a: per_sample_sdpa(*a, fp32=True)):
            out = f(q, k, v, bounds)
            out.backward(grad)
            res.append([t.detach().float() for t in (out, q.grad, k.grad, v.grad)])
            q.grad = k.grad = v.grad = None
        rel = [float((a - b).norm() / b.norm()) for a, b in zip(*res, strict=True)]
        worst_out, worst_grad = max(worst_out, rel[0]), max(worst_grad, *rel[1:])
    return worst_out, worst_grad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from desktune.hardware import cpu_flags
    from desktune.models.cpu_attention import library, packed_causal_attention

    if library() is None:
        raise SystemExit("the kernel cannot run here (it needs avx512_bf16 and a C compiler)")
    lengths = race_lengths()
    rows = make_rows(lengths)
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx512_vnni"))))
    print(f"{len(lengths)} samples, {sum(lengths)} tokens in {len(rows)} rows; torch threads "
          f"{torch.get_num_threads()}; CPU flags: {flags or 'none of avx512_bf16/amx'}")
    flops = 6 * sum(n * n for n in lengths) * HEADS * HEAD_DIM
    systems = {"kernel": lambda q, k, v, b: packed_causal_attention(q, k, v, b, HEAD_DIM ** -0.5),
               "sdpa_fp32": lambda q, k, v, b: per_sample_sdpa(q, k, v, b, True),
               "sdpa_bf16": lambda q, k, v, b: per_sample_sdpa(q, k, v, b, False)}
    times = {name: timed(fn, rows, args.reps) for name, fn in systems.items()}
    for name, t in times.items():
        print(f"{name:10s} {t * 1e3:8.1f} ms  {flops / t / 1e9:6.1f} GFLOP/s")
    for name in ("kernel", "sdpa_bf16"):
        print(f"{name} vs fp32 SDPA: output %.2e, gradients %.2e (worst row, relative)" % errors(rows, systems[name]))
    out_err, grad_err = errors(rows, systems["kernel"])
    print(f"RESULT speedup_vs_sdpa_fp32={times['sdpa_fp32'] / times['kernel']:.2f} "
          f"speedup_vs_sdpa_bf16={times['sdpa_bf16'] / times['kernel']:.2f} "
          f"kernel_gflops={flops / times['kernel'] / 1e9:.1f} out_rel_err={out_err:.2e} grad_rel_err={grad_err:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
