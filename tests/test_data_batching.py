"""Micro-batch order and padding."""

from __future__ import annotations

import pytest
import torch

from desktune.data import IGNORE_INDEX, Example, collate, example_stream


def _examples(n: int) -> list[Example]:
    return [Example(list(range(1, i + 2)), [IGNORE_INDEX, *range(2, i + 2)], f"row {i}") for i in range(n)]


def _take(n: int, count: int, **kw: object) -> list[int]:
    stream = example_stream(n, **kw)  # type: ignore[arg-type]
    return [next(stream) for _ in range(count)]


def test_each_epoch_covers_every_example_once() -> None:
    got = _take(10, 20, seed=0, shuffle=True)
    assert sorted(got[:10]) == list(range(10)) and sorted(got[10:]) == list(range(10))
    assert got[:10] != got[10:]  # each epoch has its own order


def test_order_is_deterministic_per_seed() -> None:
    assert _take(20, 40, seed=1, shuffle=True) == _take(20, 40, seed=1, shuffle=True)
    assert _take(20, 20, seed=1, shuffle=True) != _take(20, 20, seed=2, shuffle=True)
    assert _take(20, 20, seed=1, shuffle=True) != list(range(20))


def test_without_shuffle_keeps_order() -> None:
    assert _take(5, 7, seed=0, shuffle=False) == [0, 1, 2, 3, 4, 0, 1]


def test_start_continues_the_same_stream() -> None:
    """Resume: starting at sample k yields exactly what an uninterrupted stream yields from k on."""
    whole = _take(7, 30, seed=3, shuffle=True)
    for k in (0, 5, 7, 13):
        assert _take(7, 30 - k, seed=3, shuffle=True, start=k) == whole[k:]


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
