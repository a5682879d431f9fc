"""Checks before training: the learning-rate rule for the method and the base's size."""

from __future__ import annotations

import pytest

from desktune.config import load_config
from desktune.defaults import typical_lora_lr
from desktune.training.checks import lr_finding


def _cfg(lr: float, **lora) -> object:
    overrides = [f"train.lr={lr}"] + [f"lora.{k}={v}" for k, v in lora.items()]
    return load_config({"data": {"train": "x.jsonl"}}, overrides)


def test_typical_rate_lands_where_practice_settled():
    assert 1e-4 <= typical_lora_lr(8_030_000_000) <= 2e-4  # Llama-3-8B LoRA/QLoRA: 1e-4 to 2e-4
    assert typical_lora_lr(135_000_000) > 5e-4  # a 135M model takes far higher rates
    assert typical_lora_lr(70e9) < typical_lora_lr(8e9) < typical_lora_lr(1e9)
    assert typical_lora_lr(8e9, r=16, rslora=True) == pytest.approx(typical_lora_lr(8e9) / 4)


@pytest.mark.parametrize(("lr", "params", "said"), [
    (2e-4, 8e9, None), (1e-3, 135e6, None), (5e-3, 135e6, None),  # the demo's 1e-3 on SmolLM2-135M is usual
    (5e-2, 8e9, "high"), (1e-7, 8e9, "low"), (1.0, 135e6, "high"),
])
def test_lr_outside_the_usual_range(lr, params, said):
    found = lr_finding(_cfg(lr), int(params))
    assert (found is None) == (said is None)
    if found is not None:
        assert f"unusually {said}" in found.message and "train.lr" in found.message and "LoRA" in found.message


def test_the_method_is_named():
    assert "rsLoRA" in lr_finding(_cfg(1.0, use_rslora=True), int(8e9)).message
    assert "DoRA" in lr_finding(_cfg(1.0, use_dora=True), int(8e9)).message
