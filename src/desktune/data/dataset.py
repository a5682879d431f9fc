"""DataConfig -> tokenized train and validation examples, with statistics for the log."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from desktune.config import DataConfig
from desktune.data.encode import Encoded, Example, encode_samples
from desktune.data.formats import Sample, convert_rows
from desktune.data.sources import read_rows
from desktune.data.templates import FALLBACK_NOTICE, own_template, resolve_chat_template
from desktune.errors import DesktuneError


@dataclass
class DataStats:
    """What the data became: counts for the run log (truncated/dropped count training samples)."""

    format: str
    n_train: int
    n_val: int
    n_truncated: int
    n_dropped: int
    n_target_tokens: int
    n_tokens: int
    n_val_truncated: int = 0
    n_val_dropped: int = 0
    max_len: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        parts = [
            f"format {self.format}",
            f"{self.n_train} train / {self.n_val} val samples",
            f"{self.n_tokens} tokens ({self.n_target_tokens} trained)",
            f"longest {self.max_len}",
        ]
        if self.n_truncated:
            parts.append(f"{self.n_truncated} truncated to max_seq_len")
        if self.n_dropped:
            parts.append(f"{self.n_dropped} dropped (no trainable token)")
        return ", ".join(parts)


def split_samples(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `fraction` of the samples, deterministically: at least 1 when fraction > 0 and n >= 2."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    n_val = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    held = set(random.Random(seed).sample(range(len(samples)), n_val))
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


SHOWN_ROWS = 5  # rows named in a message; the count says how many more


def rows_text(sources: list[str]) -> str:
    """'a.jsonl:1, a.jsonl:2 and 3 more'."""
    shown = ", ".join(sources[:SHOWN_ROWS])
    return shown + (f" and {len(sources) - SHOWN_ROWS} more" if len(sources) > SHOWN_ROWS else "")


def _all_dropped(enc: Encoded, what: str, cfg: DataConfig, where: str) -> DesktuneError:
    """Every label masked: nothing to train on (the 'all labels are -100' runs that learn nothing)."""
    return DesktuneError(
        f"every label of all {enc.n_dropped} {what} samples is masked: none has a trainable token"
        f" within max_seq_len={cfg.max_seq_len} (rows {rows_text(enc.dropped)})",
        where=where,
        fix="raise data.max_seq_len, shorten the prompts so the assistant replies fit, or check that the rows "
        "have assistant turns (data.train_on=all trains on every token)",
    )


def _encode(cfg: DataConfig, tokenizer: Any, samples: list[Sample]) -> Encoded:
    return encode_samples(
        tokenizer,
        samples,
        max_seq_len=cfg.max_seq_len,
        train_on=cfg.train_on,
        system_prompt=cfg.system_prompt,
    )


def build_datasets(
    cfg: DataConfig, tokenizer: Any, seed: int
) -> tuple[list[Example], list[Example], DataStats]:
    """Read, convert, split and tokenize the data in `cfg`; raise DesktuneError on any bad input."""
    fmt, samples = convert_rows(read_rows(cfg.train), cfg.format)
    notes: list[str] = []
    if cfg.val:
        _, val_samples = convert_rows(read_rows(cfg.val), cfg.format)
        train_samples = samples
    else:
        train_samples, val_samples = split_samples(samples, cfg.val_fraction, seed)
        if cfg.val_fraction > 0 and not val_samples:
            notes.append("val_fraction ignored: fewer than 2 samples")
    chats = any(s.messages is not None for s in [*train_samples, *val_samples])
    if chats and own_template(tokenizer) is None:
        resolve_chat_template(tokenizer, None)
        notes.append(FALLBACK_NOTICE)
    train = _encode(cfg, tokenizer, train_samples)
    if not train.examples:
        raise _all_dropped(train, "training", cfg, cfg.train)
    val = _encode(cfg, tokenizer, val_samples)
    if val_samples and not val.examples:
        raise _all_dropped(val, "validation", cfg, cfg.val or cfg.train)
    if train.dropped:
        notes.append(f"{train.n_dropped} training sample(s) had every label masked and were dropped: rows "
                     f"{rows_text(train.dropped)}")
    stats = DataStats(
        format=fmt,
        n_train=len(train.examples),
        n_val=len(val.examples),
        n_truncated=train.n_truncated,
        n_dropped=train.n_dropped,
        n_target_tokens=sum(e.n_target for e in train.examples),
        n_tokens=sum(len(e.input_ids) for e in train.examples),
        n_val_truncated=val.n_truncated,
        n_val_dropped=val.n_dropped,
        max_len=max(len(e.input_ids) for e in train.examples),
        notes=notes,
    )
    return train.examples, val.examples, stats
