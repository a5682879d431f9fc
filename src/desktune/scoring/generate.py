"""Greedy answers of a model to many conversations: the demo's, evaluation's and replay's base vs tuned answers,
and the progress lines long generation prints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# greedy decoding of a small model loops without it; the same for base and tuned answers (demo, eval)
ANSWER_REPETITION_PENALTY = 1.15
# prompts answered together at most: a decoding step of 64 rows used the CPU's matrix units better than 32 (the
# reference's first 64 prompts, 64 tokens, one thread: 17.8 s CPU against 22.4 s at 32 and 27.9 s at 16)
GENERATION_BATCH = 64

Say = Callable[[str], None]  # where a progress line goes (a console's print); None: nowhere
OnBatch = Callable[[list[int], list[str]], None]  # (indices into the conversations, their answers) per batch


@dataclass
class Progress:
    """Counts as work gets done, one line whenever another ~10% is done (readable when piped, never a flood)."""

    say: Say | None
    label: str
    total: int
    done: int = 0
    shown: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def advance(self, n: int) -> None:
        """`n` more done; say so when it completes another tenth or the whole."""
        self.done += n
        if self.say is not None and (self.done >= self.total or self.done - self.shown >= max(1, self.total // 10)):
            self.shown = self.done
            self.say(f"  {self.label}: {self.done}/{self.total} ({time.perf_counter() - self.t0:.0f} s)")


@torch.no_grad()
def replies(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 96,
            batch_size: int = GENERATION_BATCH, repetition_penalty: float = 1.0,
            on_batch: OnBatch | None = None) -> list[str]:
    """Greedy answers to several conversations, in the given order.

    Generated in left-padded batches of prompts of similar length (sorted, so little padding) with the KV cache,
    at most `batch_size` a batch and the batches of equal size (224 prompts: 4 of 56, not 3 of 64 and one of 32);
    a batch stops as soon as all its rows have ended. Rows that end early are not dropped: on a CPU a decoding
    step of a small model costs about the same for 4 rows as for 46 (reading the weights dominates: 170 and 150 ms a
    step, SmolLM2-135M, one thread). `on_batch` receives each batch's answers as they are made.
    """
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers = [""] * len(ids)
    size = math.ceil(len(ids) / math.ceil(len(ids) / batch_size)) if ids else 1
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in range(0, len(order), size):
            rows = order[s : s + size]
            enc = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt").to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                 repetition_penalty=repetition_penalty)
            width = enc["input_ids"].shape[1]
            got = [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
            for i, a in zip(rows, got, strict=True):
                answers[i] = a
            if on_batch is not None:
                on_batch(rows, got)
    finally:
        tokenizer.padding_side = side
    return answers
