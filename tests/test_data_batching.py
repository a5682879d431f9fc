"""Micro-batch order and padding."""

from __future__ import annotations

import pytest
import torch

from desktune.data import IGNORE_INDEX, Example, batches, collate


def _examples(n: int) -> list[Example]:
    return [Example(list(range(1, i + 2)), [IGNORE_INDEX, *range(2, i + 2)], f"row {i}") for i in range(n)]


def test_batches_cover_every_example_once() -> None:
    exs = _examples(10)
    got = batches(exs, 3, shuffle=True, seed=0, epoch=0)
    assert [len(b) for b in got] == [3, 3, 3, 1]
    assert sorted(e.source for b in got for e in b) == sorted(e.source for e in exs)


def test_batches_are_deterministic_per_seed_and_epoch() -> None:
    exs = _examples(20)

    def order(seed: int, epoch: int) -> list[str]:
        return [e.source for b in batches(exs, 4, shuffle=True, seed=seed, epoch=epoch) for e in b]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != [e.source for e in exs]


def test_batches_without_shuffle_keep_order() -> None:
    exs = _examples(5)
    got = batches(exs, 2, shuffle=False, seed=0, epoch=3)
    assert [[e.source for e in b] for b in got] == [["row 0", "row 1"], ["row 2", "row 3"], ["row 4"]]


def test_batches_reject_bad_size() -> None:
    with pytest.raises(ValueError):
        batches(_examples(2), 0, shuffle=False, seed=0, epoch=0)


def test_collate_right_pads() -> None:
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7], "a")
    b = Example([8], [8], "b")
    out = collate([a, b], pad_id=0)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_rejects_empty_batch() -> None:
    with pytest.raises(ValueError):
        collate([], pad_id=0)
