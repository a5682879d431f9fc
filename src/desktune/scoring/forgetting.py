"""Forgetting: the base's own answers to a general reference, scored by base and tuned, and a knowledge probe.

`reference_set` turns a reference into examples (prompt + the base's greedy answer, the answer as target);
`divergence` (scoring/divergence.py) then says how much less likely the tuned model finds them and how far its
next-token distributions moved. `probe` asks the knowledge questions and counts which right answers survive.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desktune.data import Example, Sample, encode_samples
from desktune.scoring.generate import replies
from desktune.scoring.reference import (
    ANSWER_TOKENS,
    PROBE_TOKENS,
    Question,
    Reference,
    cached_answers,
    model_fingerprint,
)

GENERATION_BATCH = 16  # prompts answered together: left-padded batches are much faster on a CPU


@dataclass(frozen=True)
class ReferenceSet:
    """A reference as examples to score, and whether the base's answers came from the cache."""

    name: str
    examples: list[Example]
    cached: bool


@dataclass(frozen=True)
class ProbeResult:
    """Knowledge-probe counts: right answers of base and tuned, and the base's right answers the tuned kept."""

    questions: int
    base_correct: int
    tuned_correct: int
    kept: int


@contextmanager
def base_only(model: Any) -> Iterator[None]:
    """The base model: a peft model with its adapter off, in eval mode (no dropout); anything else as it is."""
    was_training = model.training
    model.eval()
    disable = getattr(model, "disable_adapter", None)
    try:
        with disable() if disable is not None else nullcontext():
            yield
    finally:
        model.train(was_training)


def answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to single-turn prompts, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                       max_new_tokens=max_new_tokens, batch_size=GENERATION_BATCH)
    finally:
        model.train(was_training)


def load_variant(quant: str, dtype: Any) -> str:
    """How a base was loaded ('nf4:bfloat16'): its answers differ by quantization and precision."""
    return f"{quant}:{str(dtype).removeprefix('torch.')}"


def base_key(kind: str, base_path: str, variant: str, tokenizer: Any, prompts: list[str], tokens: int) -> list[Any]:
    """What the base's answers depend on: the model's files, how it was loaded, the template, prompts, length."""
    return [kind, model_fingerprint(base_path), variant, tokenizer.chat_template, prompts, tokens]


def reference_set(model: Any, tokenizer: Any, reference: Reference, *, base_path: str, variant: str,
                  max_seq_len: int, cache: Path) -> ReferenceSet:
    """The reference's examples: each prompt with the base's own greedy answer (or the given one) as target."""
    texts, cached = reference.texts, True
    if texts is None:
        key = base_key("general", base_path, variant, tokenizer, reference.prompts, ANSWER_TOKENS)

        def answer() -> list[str]:
            with base_only(model):
                return answers(model, tokenizer, reference.prompts, ANSWER_TOKENS)

        texts, cached = cached_answers(cache, key, answer)
    samples = [Sample(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": t}], text=None,
                      source=f"reference:{i}") for i, (p, t) in enumerate(zip(reference.prompts, texts, strict=True), 1)
               if t.strip()]
    encoded = encode_samples(tokenizer, samples, max_seq_len=max_seq_len)
    return ReferenceSet(name=reference.name, examples=encoded.examples, cached=cached)


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces (a decimal point or comma inside a number kept), single spaces."""
    text = re.sub(r"(?<=\d)[.,](?=\d)", "\0", text.lower())
    text = re.sub(r"[^\w\0]+", " ", text).replace("\0", ".")
    return " ".join(text.split())


def is_right(reply: str, accepted: tuple[str, ...]) -> bool:
    """Whether one of the accepted answers appears in the reply as whole words (or a whole number)."""
    said = f" {normalise(reply)} "
    return any(f" {normalise(a)} " in said for a in accepted if normalise(a))


def probe(model: Any, tokenizer: Any, questions: list[Question], *, base_path: str, variant: str,
          cache: Path) -> ProbeResult:
    """Ask the probe's questions of the base (cached) and the tuned model; count what each gets right."""
    asked = [q.question for q in questions]
    key = base_key("probe", base_path, variant, tokenizer, asked, PROBE_TOKENS)

    def answer() -> list[str]:
        with base_only(model):
            return answers(model, tokenizer, asked, PROBE_TOKENS)

    base, _ = cached_answers(cache, key, answer)
    tuned = answers(model, tokenizer, asked, PROBE_TOKENS)
    base_ok = [is_right(a, q.answers) for a, q in zip(base, questions, strict=True)]
    tuned_ok = [is_right(a, q.answers) for a, q in zip(tuned, questions, strict=True)]
    return ProbeResult(questions=len(questions), base_correct=sum(base_ok), tuned_correct=sum(tuned_ok),
                       kept=sum(b and t for b, t in zip(base_ok, tuned_ok, strict=True)))
