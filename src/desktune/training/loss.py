"""Cross-entropy from the last hidden state, on target tokens only, so full logits never exist."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_TOKENS = 1024  # rows of logits computed at once; bounds the loss's memory to CHUNK_TOKENS x vocab


def _head_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The transformer body, its output projection and the final logit soft-cap of a (peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), softcap


def full_logits_ce_sum(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The standard path: full batch x seq x vocab logits from the model, then cross-entropy (for comparison)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    targets = labels[:, 1:]
    n = int((targets != IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, n


def target_ce_sum(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                  chunked: bool = True) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE, and how many there are.

    A packed batch passes `position_ids` (restarting per sample) and no attention mask.
    """
    if not chunked:
        return full_logits_ce_sum(model, input_ids, labels, attention_mask, position_ids)
    decoder, head, softcap = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][keep]
    t = targets[keep]
    bias = getattr(head, "bias", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, CHUNK_TOKENS):
        sl = slice(start, start + CHUNK_TOKENS)
        if torch.is_grad_enabled() and n > CHUNK_TOKENS:
            # recompute each chunk's logits in backward instead of keeping them all
            total = total + checkpoint(_head_ce_sum, h[sl], head.weight, bias, t[sl], softcap, use_reentrant=False)
        else:
            total = total + _head_ce_sum(h[sl], head.weight, bias, t[sl], softcap)
    return total, n
