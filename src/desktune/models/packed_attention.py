"""Attention for padding-free packed rows: each sample attends only to itself, at the cost of its own length.

Several samples share one row; `position_ids` restart at 0 where a sample starts. transformers alone gets this
right by building a block-diagonal row x row mask, but SDPA then computes every masked block too (quadratic in
the row, not in the samples). Our own attention function runs SDPA causally on each sample's slice instead,
the CPU/SDPA equivalent of varlen flash-attention: same result, sum(len_i^2) work instead of (sum len_i)^2.
Anything it cannot handle exactly (a padding mask, a KV cache, sliding windows longer than a sample, soft-capped
logits) goes to transformers' own SDPA path with its mask unchanged. Packed bf16 rows on a CPU with AVX512-BF16
go to desktune's own kernel (models/cpu_attention.py), one call for all the row's samples.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from desktune.models import cpu_attention

ATTENTION = "desktune_packed"


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sample in a packed row: a new sample starts where the position does not follow on."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten().add(1).tolist()
    edges = [0, *starts, pos.numel()]
    return list(itertools.pairwise(edges))


_last: tuple[torch.Tensor | None, list[tuple[int, int]]] = (None, [])


def _cached_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """Segment bounds, computed once per forward: every layer receives the same position_ids tensor."""
    global _last
    if _last[0] is not position_ids:
        _last = (position_ids, segment_bounds(position_ids))
    return _last[1]


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: per-sample causal SDPA on a packed row, else the library's SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    if position_ids is None or query.shape[0] != 1 or key.shape[2] != q_len or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = _cached_bounds(position_ids)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if (len(bounds) == 1 and attention_mask is not None) or (window and max(e - s for s, e in bounds) > window):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if cpu_attention.usable(query, key, value) and not kwargs.get("dropout"):
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return cpu_attention.packed_causal_attention(query, key, value, bounds, scale), None
    if len(bounds) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "is_causal"}
    dtype = query.dtype
    with _fp32_on_cpu(query) as up:
        outs = [sdpa_attention_forward(module, up(query[:, :, s:e]), up(key[:, :, s:e]), up(value[:, :, s:e]), None,
                                       is_causal=True, **kwargs)[0] for s, e in bounds]
    return torch.cat(outs, dim=1).to(dtype), None


@contextlib.contextmanager
def _fp32_on_cpu(query: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Every sample's bf16 attention computed in fp32 on a CPU where desktune's kernel does not run (autocast
    off): PyTorch's CPU flash-attention backward in bf16 took 4.7 ms a layer for 4 samples of ~52 tokens, against
    1.3 ms through fp32 (same result up to the inputs' bf16 rounding); over the race's samples (35-994 tokens) bf16
    took 1.05-1.10x the fp32 time on a 419 GFLOP/s EPYC (0.71x at 994 tokens on a 789 GFLOP/s one). Elsewhere the
    tensors pass unchanged."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16:
        yield lambda t: t
        return
    with torch.autocast("cpu", enabled=False):
        yield lambda t: t.float()


def register() -> None:
    """Make ATTENTION a valid attn_implementation (its masks are SDPA's: used only where it falls back)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_packed_attention(model: Any) -> str | None:
    """Switch an SDPA model (and its sub-configs) to packed attention; returns the implementation it replaced.

    Other implementations are left alone: flash-attention handles packed rows natively, and eager (chosen for
    soft-capped or otherwise special attention) gets transformers' exact block-diagonal mask.
    """
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa":
        return None
    register()
    _set_implementation(model, ATTENTION)
    return current


def restore_attention(model: Any, previous: str | None) -> None:
    """Undo `use_packed_attention`."""
    if previous is not None:
        _set_implementation(model, previous)


def _set_implementation(model: Any, name: str) -> None:
    """transformers' public setter, on the model under a peft wrapper (it reaches every sub-config)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)
