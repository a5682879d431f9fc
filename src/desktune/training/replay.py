"""data.replay: mix the base's own answers to general prompts into training, so that a run which teaches narrow
data keeps how the base answers everything else (self-distillation replay).

The base answers the replay prompts once, greedily, with the adapter off (cached per model, like eval's
reference); each replayed answer is a training sample with the answer as target. The built-in replay prompts
never overlap the general reference forgetting is measured on (scoring/reference/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desktune.config import RunConfig
from desktune.data import Example
from desktune.defaults import replay_count
from desktune.scoring.forgetting import load_variant, reference_set
from desktune.scoring.generate import Say
from desktune.scoring.reference import Reference, builtin_replay, read_reference


@dataclass(frozen=True)
class Replay:
    """The replay samples mixed into a run, and one line saying what they are."""

    examples: list[Example]
    note: str


def used(reference: Reference, n: int) -> Reference:
    """The first `n` prompts of `reference` (all when it has fewer): the base answers only what is replayed."""
    if n >= len(reference.prompts):
        return reference
    texts = reference.texts[:n] if reference.texts is not None else None
    return Reference(name=f"{reference.name.split(' (')[0]} ({n} of {len(reference.prompts)} prompts)",
                     prompts=reference.prompts[:n], texts=texts)


def replay_set(cfg: RunConfig, model: Any, tokenizer: Any, base_path: str, dtype: Any, n_train: int,
               cache: Path, say: Say | None = None) -> Replay:
    """`cfg.data.replay` (resolved, not auto) of `n_train` as replay samples; none when the share is 0.

    The base's answers are cached per prompt (scoring.forgetting.base_answers): another dataset on the same model
    reuses them, a larger share generates only the prompts not answered yet. `say` receives progress lines."""
    share = float(cfg.data.replay)
    n = replay_count(n_train, share)
    if n == 0:
        return Replay([], "")
    t0 = time.perf_counter()
    reference = used(read_reference(cfg.data.replay_prompts) if cfg.data.replay_prompts else builtin_replay(), n)
    ref = reference_set(model, tokenizer, reference, base_path=base_path, variant=load_variant(cfg.model.quant, dtype),
                        max_seq_len=cfg.data.max_seq_len, cache=cache, say=say)
    pool = ref.examples
    examples = [pool[i % len(pool)] for i in range(n)]  # a small pool repeats; the mix keeps its share
    whose = "given answers" if reference.texts is not None else "the base's own answers"
    how = ("from the cache" if ref.cached else
           f"{ref.generated} of {len(reference.prompts)} generated in {time.perf_counter() - t0:.0f} s, cached")
    return Replay(examples, f"replay: {n} samples ({share:.0%} of training) with {whose} to {reference.name}, "
                            f"{how}; data.replay: 0 turns it off")
