"""Checks a new run makes before its first step: the learning rate for the method and model size, and what the
encoded data will teach (end-of-turn in the labels, truncation). Findings go out like the live diagnostics."""

from __future__ import annotations

from typing import Any

from desktune.config import RunConfig
from desktune.data import Example
from desktune.defaults import method_name, typical_lora_lr
from desktune.runs.diagnostics import Finding

LR_BELOW, LR_ABOVE = 20.0, 10.0  # outside [typical / 20, typical x 10] a run barely moves or diverges
TRUNCATED_SHARE = 0.10  # a tenth of the samples cut short: answers lose their ends, often their end-of-turn


def lr_finding(cfg: RunConfig, n_params: int) -> Finding | None:
    """A learning rate far outside the usual range for the method on a base of this size."""
    lr, typical = cfg.train.lr, typical_lora_lr(n_params, cfg.lora.r, cfg.lora.use_rslora)
    low, high = typical / LR_BELOW, typical * LR_ABOVE
    if low <= lr <= high:
        return None
    side = "low" if lr < low else "high"
    effect = "the adapter will barely learn" if side == "low" else "the loss is likely to diverge"
    method = method_name(cfg)
    return Finding("lr_out_of_range", 0, f"train.lr={lr:.1e} is unusually {side} for {method} on a "
                   f"{n_params / 1e6:.0f}M-parameter base (usual {low:.0e} to {high:.0e}, typical {typical:.0e}): "
                   f"{effect} - set train.lr near {typical:.0e}.",
                   {"lr": lr, "typical": typical, "low": low, "high": high})


def end_of_turn_finding(train: list[Example], tokenizer: Any) -> Finding | None:
    """No training label is the end-of-turn token: the tuned model would never learn to stop."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or any(eos in ex.labels[1:] for ex in train):
        return None
    return Finding("end_of_turn_untrained", 0, f"no training sample has its end-of-turn token "
                   f"({tokenizer.eos_token!r}) among its labels, so the tuned model will not learn to stop - raise "
                   "data.max_seq_len so answers end inside it, or check the chat template.", {"eos_id": eos})


def truncation_finding(n_truncated: int, n_samples: int, max_seq_len: int) -> Finding | None:
    """Many samples cut at max_seq_len."""
    share = n_truncated / n_samples if n_samples else 0.0
    if share <= TRUNCATED_SHARE:
        return None
    return Finding("truncated_many", 0, f"{n_truncated} of {n_samples} training samples ({100 * share:.0f}%) are "
                   f"longer than data.max_seq_len={max_seq_len} and lose their ends - raise data.max_seq_len or "
                   "split long samples.", {"truncated": n_truncated, "samples": n_samples, "share": share})


def before_training(cfg: RunConfig, train: list[Example], tokenizer: Any, n_params: int,
                    n_truncated: int) -> list[Finding]:
    """Every finding of the checks above."""
    found = [lr_finding(cfg, n_params), end_of_turn_finding(train, tokenizer),
             truncation_finding(n_truncated, len(train), cfg.data.max_seq_len)]
    return [f for f in found if f is not None]
