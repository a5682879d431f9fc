"""Attention for padding-free packed rows: each sample attends only to itself, at the cost of its own length.

Several samples share one row; `position_ids` restart at 0 where a sample starts. transformers alone gets this
right by building a block-diagonal row x row mask, but SDPA then computes every masked block too (quadratic in
the row, not in the samples). Our own attention function runs SDPA causally on each sample's slice instead,
the CPU/SDPA equivalent of varlen flash-attention: same result, sum(len_i^2) work instead of (sum len_i)^2.
On the CPU in bf16 a sample runs `grouped_causal` (transformers' eager attention, heads grouped per key/value
head) when its attention probabilities are small enough to keep, else `blockwise_causal` (the same in blocks of
query rows, recomputed in backward).
Anything it cannot handle exactly (a padding mask, a KV cache, sliding windows longer than a sample, soft-capped
logits) goes to transformers' own SDPA path with its mask unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from desktune.constants import cpu_eager_attention_len, cpu_eager_attention_rows

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
    eager_len = _eager_len(query, key, kwargs)
    if (len(bounds) == 1 and not eager_len) or (window and max(e - s for s, e in bounds) > window):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "is_causal"}
    outs = [_sample(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], eager_len, kwargs) for s, e in bounds]
    return torch.cat(outs, dim=1), None


def _sample(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, eager_len: int,
            kwargs: dict[str, Any]) -> torch.Tensor:
    """One sample's causal attention, 1 x n x heads x d: grouped eager up to `eager_len` tokens, blockwise above
    it; SDPA (in fp32 on the CPU) where neither applies (`eager_len` 0)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = query.shape[2]
    if eager_len and n <= eager_len:
        return grouped_causal(query, key, value, kwargs.get("scaling"))
    if eager_len:
        return blockwise_causal(query, key, value, kwargs.get("scaling"), cpu_eager_attention_rows(query.shape[1], n))
    with _fp32_on_cpu(query) as up:
        out = sdpa_attention_forward(module, up(query), up(key), up(value), None, is_causal=True, **kwargs)[0]
    return out.to(query.dtype)


# what grouped_causal handles, or may ignore (a sliding window is no shorter than the sample: checked above)
_EAGER_KWARGS = frozenset({"dropout", "scaling", "position_ids", "sliding_window", "use_cache", "cache_position",
                           "is_causal"})


def _eager_len(query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> int:
    """The longest sample `grouped_causal` takes (longer ones take `blockwise_causal`): on the CPU in bf16, without
    attention dropout or anything else they do not implement (0 elsewhere)."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16 or query.shape[1] % key.shape[1]:
        return 0
    if kwargs.get("dropout") or set(kwargs) - _EAGER_KWARGS:
        return 0
    return cpu_eager_attention_len(query.shape[1])


@functools.lru_cache(maxsize=4)
def _causal_bias(n: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """-inf above the diagonal of an n x n block, stacked `groups` times; kept for the sample's other layers (and
    for a blockwise sample's two block sizes)."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1).repeat(groups, 1)


def grouped_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
                   ) -> torch.Tensor:
    """One sample's causal attention (query 1 x heads x n x d, key/value 1 x kv_heads x n x d) as transformers'
    eager attention computes it in bf16 (scores and probabilities in bf16, the softmax accumulated in fp32), the
    query heads of each key/value head stacked into one matrix product (no repeat_kv copy). Returns 1 x n x heads
    x d, as SDPA's path does.

    Ours for the CPU: its bf16 matrix products run near the matmul peak, where PyTorch's CPU flash-attention
    kernel ran at ~40 GFLOP/s; measured on a 2-core bf16 EPYC, forward and backward of 128-1000 tokens took
    0.2-0.4x the time of that kernel in fp32. It keeps the probabilities for backward (2 bytes x heads x n^2 a
    layer), so only samples within constants.CPU_EAGER_ATTENTION_BYTES take it (the planner charges them)."""
    _, heads, n, d = query.shape
    kv = key.shape[1]
    groups = heads // kv
    q = (query[0] * (scaling if scaling is not None else d**-0.5)).reshape(kv, groups * n, d)
    scores = torch.baddbmm(_causal_bias(n, groups, query.dtype, query.device), q, key[0].transpose(1, 2))
    out = torch.bmm(torch.softmax(scores, dim=-1), value[0])  # kv x groups*n x d
    return out.view(heads, n, d).transpose(0, 1).unsqueeze(0)


def blockwise_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                     rows: int) -> torch.Tensor:
    """`grouped_causal` in blocks of `rows` query rows (the first block takes the remainder), each against only
    the keys up to its last row, its probabilities recomputed in backward (non-reentrant checkpoint): per layer it
    keeps views of q, k and v and its output, like SDPA, and the probabilities exist one block at a time.

    Ours for the CPU, for samples whose probabilities are too large to keep: bf16 matrix products near the
    matmul peak where PyTorch's CPU flash-attention kernel in fp32 ran at ~40 GFLOP/s, and causal blocks skip
    the masked half of the scores. Same values as `grouped_causal` (row-wise softmax; recomputed identically)."""
    from torch.utils.checkpoint import checkpoint

    n = query.shape[2]
    ends = range(n, 0, -rows)[::-1]
    outs = [checkpoint(_causal_block, query, key, value, max(0, end - rows), end, scaling, use_reentrant=False)
            for end in ends]
    return torch.cat(outs, dim=2).transpose(1, 2)


def _causal_block(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: int, end: int,
                  scaling: float | None) -> torch.Tensor:
    """Query rows start..end of one sample against keys 0..end, causal: 1 x heads x (end - start) x d."""
    _, heads, _, d = query.shape
    kv, rows = key.shape[1], end - start
    groups = heads // kv
    q = (query[0, :, start:end] * (scaling if scaling is not None else d**-0.5)).reshape(kv, groups * rows, d)
    scores = torch.bmm(q, key[0, :, :end].transpose(1, 2))
    scores[:, :, start:].add_(_causal_bias(rows, groups, query.dtype, query.device))
    out = torch.bmm(torch.softmax(scores, dim=-1), value[0, :, :end])  # kv x groups*rows x d
    return out.view(1, heads, rows, d)


@contextlib.contextmanager
def _fp32_on_cpu(query: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """bf16 samples the grouped and blockwise paths do not take (attention dropout, say) computed by SDPA in fp32
    on the CPU (autocast off): PyTorch's CPU flash-attention backward in bf16 took 4.7 ms a layer for 4 samples of
    ~52 tokens, against 1.3 ms through fp32 (same result up to the inputs' bf16 rounding). Elsewhere the tensors
    pass unchanged."""
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
    _swap_implementation(model, "sdpa", ATTENTION)
    return current


def restore_attention(model: Any, previous: str | None) -> None:
    """Undo `use_packed_attention`."""
    if previous is not None:
        _swap_implementation(model, ATTENTION, previous)


def _swap_implementation(model: Any, old: str, new: str) -> None:
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if getattr(cfg, "_attn_implementation", None) == old:
            cfg._attn_implementation = new
