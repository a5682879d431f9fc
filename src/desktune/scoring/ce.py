"""Cross-entropy from the last hidden state, on target tokens only, so full logits never exist."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from desktune.adapters import base_model
from desktune.constants import IGNORE_INDEX, LOSS_CHUNK_BYTES, chunk_rows

__all__ = ["LOSS_CHUNK_BYTES", "chunk_rows", "head_ce_sum", "target_ce_sum"]



def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of some rows (soft-capped if the model caps them) and the tanh needed for its derivative."""
    z = F.linear(h, weight, bias).float()
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden rows through a frozen output head, one chunk of rows at a time.

    Our own instead of autograd over checkpointed chunks: the gradient for the rows is formed in forward,
    chunk by chunk ((softmax - onehot) @ W), so one chunk's logits are the only vocab-sized tensor ever alive
    and backward recomputes nothing (liger-kernel's fused linear cross-entropy does the same on CUDA only).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, softcap: float | None, rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            sl = slice(start, start + rows)
            z, t = _chunk_logits(hidden[sl], weight, bias, softcap)
            tgt = targets[sl]
            target_logit = z.gather(1, tgt[:, None]).squeeze(1)
            top = z.amax(dim=-1)
            e = z.sub_(top[:, None]).exp_()  # in place: one chunk of logits is all the memory this takes
            norm = e.sum(dim=-1)
            total += (norm.log() + top - target_logit).sum()
            if grad is not None:  # d loss / d logits = softmax - onehot (times the soft-cap's derivative)
                e.div_(norm[:, None])
                e[torch.arange(e.shape[0], device=e.device), tgt] -= 1.0
                if t is not None:
                    e.mul_(t.mul_(t).neg_().add_(1.0))
                grad[sl] = e.to(weight.dtype) @ weight
            del z, e, t  # before the next chunk's logits exist
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype)), None, None, None, None, None


def head_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                softcap: float | None = None, rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden` rows (N x H) against `targets` (N) through the head `weight` (V x H)."""
    rows = rows or chunk_rows(weight.shape[0])
    if weight.requires_grad or (bias is not None and bias.requires_grad):  # a trained head: plain autograd
        z, _ = _chunk_logits(hidden, weight, bias, softcap)
        return F.cross_entropy(z, targets, reduction="sum")
    if not torch.is_grad_enabled() or not hidden.requires_grad:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            z, _ = _chunk_logits(hidden[start : start + rows], weight, bias, softcap)
            total = total + F.cross_entropy(z, targets[start : start + rows], reduction="sum")
        return total
    return _HeadCrossEntropy.apply(hidden, weight, bias, targets, softcap, rows)


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The transformer body, its output projection and the final logit soft-cap of a (peft-wrapped) causal LM."""
    base = base_model(model)
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), softcap


def full_logits_ce_sum(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The standard path: full batch x seq x vocab logits from the model, then cross-entropy (for comparison)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    targets = labels[:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, n


def target_ce_sum(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                  chunked: bool = True) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE_INDEX, and how many there are.

    A packed batch passes `position_ids` (restarting per sample) and no attention mask.
    """
    if not chunked:
        return full_logits_ce_sum(model, input_ids, labels, attention_mask, position_ids)
    decoder, head, softcap = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden[:, :-1][keep]
    return head_ce_sum(h, head.weight, getattr(head, "bias", None), targets[keep], softcap), n
