"""Forgetting: the base's own answers to a general reference, scored by base and tuned, and a knowledge probe.

`reference_set` turns a reference into examples (prompt + the base's greedy answer, the answer as target);
`divergence` (scoring/divergence.py) then says how much less likely the tuned model finds them and how far its
next-token distributions moved. `probe` asks the knowledge questions and counts which right answers survive.
`base_answers` is the one way the base answers prompts (replay, reference, probe, eval's answers): per prompt,
from the cache or generated and cached batch by batch; `BaseStates` keeps the base's hidden states on a
reference between evals.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desktune.data import Example, Sample, encode_samples
from desktune.runs.atomic import write_file_atomically
from desktune.scoring.generate import GENERATION_BATCH, Progress, Say, replies
from desktune.scoring.reference import (
    ANSWER_TOKENS,
    PROBE_TOKENS,
    AnswerKey,
    AnswerStore,
    Question,
    Reference,
    model_fingerprint,
)

_STATES_VERSION = 1  # bump when what BaseStates stores changes meaning


@dataclass(frozen=True)
class ReferenceSet:
    """A reference as examples to score; whether all the base's answers came from the cache, and how many
    prompts the base answered now."""

    name: str
    examples: list[Example]
    cached: bool
    generated: int = 0


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


def answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, *,
            repetition_penalty: float = 1.0, progress: Progress | None = None,
            keep: Callable[[list[str], list[str]], None] | None = None) -> list[str]:
    """Greedy answers to single-turn prompts, in eval mode; `progress` counts them, `keep(prompts, answers)`
    receives each batch as it is made."""
    was_training = model.training
    model.eval()

    def done(rows: list[int], got: list[str]) -> None:
        if keep is not None:
            keep([prompts[i] for i in rows], got)
        if progress is not None:
            progress.advance(len(rows))

    try:
        return replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                       max_new_tokens=max_new_tokens, batch_size=GENERATION_BATCH,
                       repetition_penalty=repetition_penalty, on_batch=done)
    finally:
        model.train(was_training)


def load_variant(quant: str, dtype: Any) -> str:
    """How a base was loaded ('nf4:bfloat16'): its answers differ by quantization and precision."""
    return f"{quant}:{str(dtype).removeprefix('torch.')}"


def answer_key(base_path: str, variant: str, tokenizer: Any, tokens: int, repetition_penalty: float = 1.0
               ) -> AnswerKey:
    """What the base's answers depend on besides the prompt: the model's files, how it was loaded, the template,
    the answer length, the repetition penalty."""
    return AnswerKey(model_fingerprint(base_path), variant, tokenizer.chat_template, tokens, repetition_penalty)


def base_answers(model: Any, tokenizer: Any, prompts: list[str], key: AnswerKey, cache: Path, *,
                 label: str, say: Say | None = None) -> tuple[list[str], int]:
    """The base's greedy answers to `prompts` (adapter off): those cached under `key`, the others generated and
    cached batch by batch as they are made; and how many were generated."""
    store = AnswerStore(cache, key)
    known = store.read()
    missing = list(dict.fromkeys(p for p in prompts if p not in known))
    if missing:
        if say is not None:
            say(f"{label}: the base answers {len(missing)} of {len(prompts)} prompts "
                f"({len(prompts) - len(missing)} cached)")

        def keep(asked: list[str], got: list[str]) -> None:
            known.update(zip(asked, got, strict=True))
            store.add(list(zip(asked, got, strict=True)))

        with base_only(model):
            answers(model, tokenizer, missing, key.tokens, repetition_penalty=key.repetition_penalty,
                    progress=Progress(say, label, len(missing)), keep=keep)
    elif say is not None:
        say(f"{label}: the base's {len(prompts)} answers from the cache")
    return [known[p] for p in prompts], len(missing)


def reference_set(model: Any, tokenizer: Any, reference: Reference, *, base_path: str, variant: str,
                  max_seq_len: int, cache: Path, say: Say | None = None) -> ReferenceSet:
    """The reference's examples: each prompt with the base's own greedy answer (or the given one) as target;
    `say` receives progress lines while the base answers."""
    texts, generated = reference.texts, 0
    if texts is None:
        key = answer_key(base_path, variant, tokenizer, ANSWER_TOKENS)
        texts, generated = base_answers(model, tokenizer, reference.prompts, key, cache,
                                        label=reference.name.split(" (")[0], say=say)
    samples = [Sample(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": t}], text=None,
                      source=f"reference:{i}") for i, (p, t) in enumerate(zip(reference.prompts, texts, strict=True), 1)
               if t.strip()]
    encoded = encode_samples(tokenizer, samples, max_seq_len=max_seq_len)
    return ReferenceSet(name=reference.name, examples=encoded.examples, cached=generated == 0, generated=generated)


def content_digest(key: list[Any], examples: list[Example]) -> str:
    """A short hash of `key` (JSON) and the examples' exact tokens and targets, in order (micro-batches are formed
    from them): the name of what is cached about scoring those examples."""
    h = hashlib.sha256(json.dumps(key, ensure_ascii=False).encode())
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:24]


class BaseStates:
    """The frozen base's hidden states at a reference's target positions, one (states, targets) pair per
    micro-batch as `divergence(base_cache=...)` fills them, kept in a safetensors file (never a pickle): a later
    eval on the same base and reference skips the base's forward pass, half of the divergence's cost."""

    def __init__(self, folder: Path, key: list[Any], examples: list[Example]) -> None:
        self.path = folder / f"{content_digest([_STATES_VERSION, *key], examples)}.safetensors"

    def read(self, device: Any, batches: int) -> list[tuple[Any, Any]] | None:
        """The stored pairs on `device`, or None when absent, damaged or not one per micro-batch."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(self.path, device=str(device))
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        pairs = [(tensors.get(f"{k}.states"), tensors.get(f"{k}.targets")) for k in range(batches)]
        if len(tensors) != 2 * batches or any(h is None or t is None or h.shape[0] != t.shape[0] for h, t in pairs):
            return None
        return pairs

    def write(self, pairs: list[tuple[Any, Any]]) -> None:
        """Store the pairs in one rename; a read-only or full cache only costs time later."""
        from safetensors.torch import save_file

        tensors = {}
        for k, (h, t) in enumerate(pairs):
            tensors[f"{k}.states"], tensors[f"{k}.targets"] = h.detach().cpu().contiguous(), t.cpu().contiguous()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(self.path, lambda tmp: save_file(tensors, str(tmp)))
        except OSError:
            pass


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
          cache: Path, say: Say | None = None) -> ProbeResult:
    """Ask the probe's questions of the base (cached per question) and the tuned model; count what each gets
    right. `say` receives progress lines."""
    asked = [q.question for q in questions]
    key = answer_key(base_path, variant, tokenizer, PROBE_TOKENS)
    base, _ = base_answers(model, tokenizer, asked, key, cache, label="knowledge probe, base", say=say)
    tuned = answers(model, tokenizer, asked, PROBE_TOKENS, progress=Progress(say, "knowledge probe, tuned",
                                                                             len(asked)))
    base_ok = [is_right(a, q.answers) for a, q in zip(base, questions, strict=True)]
    tuned_ok = [is_right(a, q.answers) for a, q in zip(tuned, questions, strict=True)]
    return ProbeResult(questions=len(questions), base_correct=sum(base_ok), tuned_correct=sum(tuned_ok),
                       kept=sum(b and t for b, t in zip(base_ok, tuned_ok, strict=True)))
