"""desktune's CPU bf16 attention for one packed sample against PyTorch's CPU flash kernel in fp32.

For each length, one layer's forward and backward (query heads, key/value heads and head size of the embedded
SmolLM2 by default) through the path desktune takes for a sample of that length on a bf16 CPU (kept probabilities
up to constants.cpu_eager_attention_len, blocks of query rows beyond) and through
`scaled_dot_product_attention` in fp32 (what desktune ran before; its bf16 backward is slower still). Each is timed
--repeats times, the best kept. Last line: RESULT max_time_ratio=<x> mean_time_ratio=<x> (desktune / fp32 SDPA,
lower is faster).

  python benchmarks/cpu_attention.py [--lengths 300,700,994,2048,4096] [--heads 9 --kv-heads 3 --head-dim 64]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from desktune.constants import cpu_eager_attention_len, cpu_eager_attention_rows
from desktune.models.packed_attention import blockwise_causal, grouped_causal

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's causal SDPA in fp32 (its CPU flash kernel), back in bf16, laid out as desktune's (1 x n x h x d)."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).to(q.dtype)


def desktune_path(heads: int, n: int) -> tuple[str, Attention]:
    """The path desktune's packed attention takes for one bf16 sample of n tokens on the CPU."""
    if n <= cpu_eager_attention_len(heads):
        return "kept", lambda q, k, v: grouped_causal(q, k, v, None)
    rows = cpu_eager_attention_rows(heads, n)
    return f"blocks of {rows}", lambda q, k, v: blockwise_causal(q, k, v, None, rows)


def best_seconds(fn: Attention, leaves: list[torch.Tensor], grad: torch.Tensor, repeats: int) -> float:
    """The fastest of `repeats` forward + backward passes."""
    times = []
    for _ in range(repeats):
        q, k, v = (t.clone().requires_grad_() for t in leaves)
        t0 = time.perf_counter()
        fn(q, k, v).backward(grad)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="300,700,994,2048,4096")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; heads {args.heads}, key/value heads {args.kv_heads}, head size {args.head_dim}; bf16")
    ratios = []
    for n in (int(x) for x in args.lengths.split(",")):
        shapes = [(1, h, n, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
        leaves = [torch.randn(s).bfloat16() for s in shapes]
        grad = torch.randn(1, n, args.heads, args.head_dim).bfloat16()
        name, ours = desktune_path(args.heads, n)
        t_ours = best_seconds(ours, leaves, grad, args.repeats)
        t_sdpa = best_seconds(sdpa_fp32, leaves, grad, args.repeats)
        ratios.append(t_ours / t_sdpa)
        print(f"{n:>6} tokens: desktune ({name}) {t_ours * 1e3:8.1f} ms   fp32 SDPA {t_sdpa * 1e3:8.1f} ms   "
              f"ratio {ratios[-1]:.2f}", flush=True)
    print(f"RESULT max_time_ratio={max(ratios):.3f} mean_time_ratio={sum(ratios) / len(ratios):.3f}")


if __name__ == "__main__":
    main()
