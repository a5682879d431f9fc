"""Forgetting on text written by people: the mean assistant-token loss, base vs tuned, on a fixed excerpt of human
conversations shipped with desktune (scoring/reference/human_heldout.jsonl, MIT, see HUMAN_HELDOUT_LICENSE beside
it; scripts/make_human_heldout.py regenerates it). Replay trains on the base's own answers, never on this kind of
text, so a tuned model cannot look better here by having rehearsed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from desktune.data import Example, convert_rows, encode_samples, read_rows
from desktune.scoring.divergence import Divergence, divergence
from desktune.scoring.reference import REFERENCE_DIR

HUMAN_HELDOUT = "human_heldout.jsonl"
HUMAN_LICENSE = "HUMAN_HELDOUT_LICENSE"  # the dataset's MIT notice, shipped beside the excerpt


@dataclass(frozen=True)
class HumanSet:
    """The human conversations as examples (loss on the assistant turns), and what to call them."""

    name: str
    examples: list[Example]


@dataclass(frozen=True)
class HumanHeldout:
    """Base vs tuned on the human conversations: the set's name, how many were scored, losses and KL."""

    name: str
    conversations: int
    divergence: Divergence


def human_set(tokenizer: Any, max_seq_len: int) -> HumanSet:
    """The shipped conversations encoded with the model's chat template (the assistant turns are the targets)."""
    _, samples = convert_rows(read_rows(REFERENCE_DIR / HUMAN_HELDOUT), "messages")
    encoded = encode_samples(tokenizer, samples, max_seq_len=max_seq_len, train_on="assistant")
    return HumanSet(name=f"human-written conversations ({len(samples)}, chitchat-dataset, MIT)",
                    examples=encoded.examples)


def human_heldout(model: Any, tokenizer: Any, *, micro_batch_size: int, device: torch.device, max_seq_len: int,
                  packing: bool = False, human: HumanSet | None = None,
                  base_cache: list[Any] | None = None) -> HumanHeldout:
    """Base (adapter off) vs tuned (adapter on) on the human conversations, in one pass (scoring/divergence.py).

    Pass the same `human` and `base_cache` to repeated calls (the live watch) to encode once and run the base once.
    """
    human = human or human_set(tokenizer, max_seq_len)
    d = divergence(model, human.examples, micro_batch_size, tokenizer.pad_token_id, device, packing,
                   base_cache=base_cache)
    return HumanHeldout(name=human.name, conversations=len(human.examples), divergence=d)
