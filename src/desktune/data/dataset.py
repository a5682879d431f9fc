"""DataConfig -> tokenized train and validation examples, with statistics for the log."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from desktune.config import DataConfig
from desktune.data.encode import Encoded, Example, encode_samples
from desktune.data.formats import Sample, convert_rows
from desktune.data.sources import BadRows, read_rows, rows_text
from desktune.data.templates import FALLBACK_NOTICE, own_template, resolve_chat_template
from desktune.defaults import auto_val_fraction
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
    n_skipped: int = 0  # bad rows left out (data.bad_rows=skip), both files
    n_ends_on_user: int = 0  # conversations whose last turn is the user's, both files
    val_fraction: float | None = None  # the share held out of data.train (None with a data.val file)
    notes: list[str] = field(default_factory=list)

    def resolved(self, cfg: DataConfig) -> DataConfig:
        """`cfg` with data.val_fraction: auto replaced by the share held out, for the run's config."""
        if cfg.val_fraction != "auto" or self.val_fraction is None:
            return cfg
        return cfg.model_copy(update={"val_fraction": self.val_fraction})

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
        if self.n_skipped:
            parts.append(f"{self.n_skipped} bad rows skipped")
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


def _all_dropped(enc: Encoded, what: str, cfg: DataConfig, where: str) -> DesktuneError:
    """Every label masked: nothing to train on (the 'all labels are -100' runs that learn nothing)."""
    return DesktuneError(
        f"every label of all {enc.n_dropped} {what} samples is masked: none has a trainable token"
        f" within max_seq_len={cfg.max_seq_len} (rows {rows_text(enc.dropped)})",
        where=where,
        fix="raise data.max_seq_len, shorten the prompts so the assistant replies fit, or check that the rows "
        "have assistant turns (data.train_on=all trains on every token)",
    )


def _samples(path: str, cfg: DataConfig, bad: BadRows) -> tuple[str, list[Sample]]:
    """The converted samples of one data file; the bad rows go to `bad`."""
    fmt, samples = convert_rows(read_rows(path, bad), cfg.format, bad)
    if not samples:
        raise bad.none_left(path)
    return fmt, samples


def _split(cfg: DataConfig, samples: list[Sample], seed: int, notes: list[str]) -> tuple[list[Sample],
                                                                                        list[Sample], float]:
    """data.val_fraction (auto: the rule in defaults.py) held out of the training samples."""
    fraction = cfg.val_fraction
    if fraction == "auto":
        choice = auto_val_fraction(len(samples))
        fraction = choice.value
        notes.append(choice.reason)
    train, val = split_samples(samples, fraction, seed)
    if fraction > 0 and not val:
        notes.append("val_fraction ignored: fewer than 2 samples")
    return train, val, fraction


def ends_on_user(samples: list[Sample]) -> list[str]:
    """Where each conversation whose last turn is the user's came from."""
    return [s.source for s in samples if s.messages and s.messages[-1]["role"] == "user"]


def _user_last_note(rows: list[str], train_on: str) -> str | None:
    """A note on conversations whose last turn is the user's: no reply follows it to train."""
    if not rows:
        return None
    what = ("it is trained as text though no reply follows" if train_on == "all"
            else "nothing is trained on it (no assistant reply follows)")
    return (f"{len(rows)} conversation(s) end on a user turn: {what}; rows {rows_text(rows)}. End each "
            "conversation with the assistant's reply, or remove the last user turn")


def _encoded(cfg: DataConfig, tokenizer: Any, samples: list[Sample], bad: BadRows, what: str,
             where: str) -> Encoded:
    """The samples tokenized; none left (every label masked, or every row bad) is an error naming the rows."""
    enc = encode_samples(tokenizer, samples, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on,
                         system_prompt=cfg.system_prompt, bad=bad)
    if samples and not enc.examples:
        raise _all_dropped(enc, what, cfg, where) if enc.dropped else bad.none_left(where)
    return enc


def build_datasets(
    cfg: DataConfig, tokenizer: Any, seed: int
) -> tuple[list[Example], list[Example], DataStats]:
    """Read, convert, split and tokenize the data in `cfg`; raise DesktuneError on any bad input (a bad row is
    left out, counted and named in a note, under data.bad_rows=skip)."""
    bad_train, bad_val = BadRows(cfg.bad_rows == "skip"), BadRows(cfg.bad_rows == "skip")
    fmt, samples = _samples(cfg.train, cfg, bad_train)
    notes: list[str] = []
    fraction: float | None = None
    if cfg.val:
        _, val_samples = _samples(cfg.val, cfg, bad_val)
        train_samples = samples
    else:
        train_samples, val_samples, fraction = _split(cfg, samples, seed, notes)
    chats = any(s.messages is not None for s in [*train_samples, *val_samples])
    if chats and own_template(tokenizer) is None:
        resolve_chat_template(tokenizer, None)
        notes.append(FALLBACK_NOTICE)
    train = _encoded(cfg, tokenizer, train_samples, bad_train, "training", cfg.train)
    val = _encoded(cfg, tokenizer, val_samples, bad_val if cfg.val else bad_train, "validation",
                   cfg.val or cfg.train)
    if train.dropped:
        notes.append(f"{train.n_dropped} training sample(s) had every label masked and were dropped: rows "
                     f"{rows_text(train.dropped)}")
    user_last = ends_on_user([*train_samples, *val_samples])
    notes += [n for n in (bad_train.note(), bad_val.note(), _user_last_note(user_last, cfg.train_on)) if n]
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
        n_skipped=len(bad_train.errors) + len(bad_val.errors),
        n_ends_on_user=len(user_last),
        val_fraction=fraction,
        notes=notes,
    )
    return train.examples, val.examples, stats
