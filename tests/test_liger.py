"""liger-kernel (never run on a GPU here): off by default; through its per-architecture function; undone after.

A stand-in `liger_kernel.transformers.monkey_patch` patches the tiny Llama the way liger does: modeling-module
globals, instance forwards and attributes, and (here) a module's class.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from desktune.adapters import attach_lora
from desktune.config import LoraConfig, load_config
from desktune.training.speed import Switches, choose_switches, switched_on
from tests.tiny import tiny_config

CUDA = torch.device("cuda")  # choose_switches only reads the device type: nothing runs on a GPU
_LIGER = ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch")


class _FakeLigerRMSNorm(modeling_llama.LlamaRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight  # visibly not an RMSNorm, so the patch shows in the logits


def _fake_rope(q: torch.Tensor, k: torch.Tensor, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> tuple:
    return q, k


def _fake_swiglu_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(self.gate_proj(x) * self.up_proj(x))


def _fake_apply_to_llama(calls: list[dict[str, Any]]) -> Callable[..., None]:
    """Like liger's `apply_liger_kernel_to_llama` (same signature and defaults), with CPU stand-in kernels."""

    def apply(rope: bool = True, cross_entropy: bool = False, fused_linear_cross_entropy: bool = True,
              rms_norm: bool = True, swiglu: bool = True, model: Any = None) -> None:
        calls.append({"model": model, "cross_entropy": cross_entropy,
                      "fused_linear_cross_entropy": fused_linear_cross_entropy})
        modeling_llama.apply_rotary_pos_emb = _fake_rope
        modeling_llama.LlamaRMSNorm = _FakeLigerRMSNorm
        modeling_llama.LlamaMLP = type("LigerSwiGLUMLP", (torch.nn.Module,), {})
        inner = model.model
        inner.norm.__class__ = _FakeLigerRMSNorm
        for layer in inner.layers:
            layer.mlp.forward = types.MethodType(_fake_swiglu_forward, layer.mlp)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.casting_mode = "llama"
                norm.forward = types.MethodType(_FakeLigerRMSNorm.forward, norm)

    return apply


def _install_liger(monkeypatch: pytest.MonkeyPatch, mapping: dict[str, Callable[..., None]]) -> None:
    """Put the stand-in liger package in sys.modules (with specs, so `find_spec` finds it)."""
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # restored at teardown whatever happens
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    mods = [types.ModuleType(name) for name in _LIGER]
    for mod in mods:
        mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    mods[0].transformers, mods[1].monkey_patch = mods[1], mods[2]
    mods[2].MODEL_TYPE_TO_APPLY_LIGER_FN = mapping


def _block_liger(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any import of liger fail and record every `find_spec` asked."""
    asked: list[str] = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: asked.append(name) or real(name, *a))
    for name in _LIGER:
        monkeypatch.setitem(sys.modules, name, None)
    return asked


def _peft_model(model_dir) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    return attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")).eval()


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).unsqueeze(0)).logits


def test_default_leaves_liger_off_without_looking_for_it(tiny_model_dir, tmp_path, monkeypatch):
    asked = _block_liger(monkeypatch)
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path))
    assert cfg.train.fused_kernels == "off"
    switches = choose_switches(cfg, CUDA, torch.float32)
    assert switches.fused_kernels is None and not any("fused_kernels" in n for n in switches.notes)
    with switched_on(_peft_model(tiny_model_dir), switches) as on:  # an import of liger would raise here
        assert on.fused_kernels is None
    assert "liger_kernel" not in asked


def test_auto_means_off_with_a_note(tiny_model_dir, tmp_path, monkeypatch):
    calls: list[dict[str, Any]] = []
    _install_liger(monkeypatch, {"llama": _fake_apply_to_llama(calls)})
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"fused_kernels": "auto"}))
    switches = choose_switches(cfg, CUDA, torch.float32)
    assert switches.fused_kernels is None and "never run on a GPU" in switches.notes[-1]
    with switched_on(_peft_model(tiny_model_dir), switches):
        assert calls == []


def test_liger_is_chosen_on_cuda_only_when_installed(tiny_model_dir, tmp_path, monkeypatch):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={"fused_kernels": "liger"}))
    with monkeypatch.context() as m:
        _block_liger(m)
        missing = choose_switches(cfg, CUDA, torch.float32)
    assert missing.fused_kernels is None and "not installed" in missing.notes[-1]
    _install_liger(monkeypatch, {})
    assert choose_switches(cfg, CUDA, torch.float32).fused_kernels == "liger"


def test_liger_patches_through_its_llama_function_and_is_undone_after(tiny_model_dir, monkeypatch):
    calls: list[dict[str, Any]] = []
    _install_liger(monkeypatch, {"llama": _fake_apply_to_llama(calls)})
    real = {n: getattr(modeling_llama, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    model = _peft_model(tiny_model_dir)
    base = model.get_base_model()
    before = _logits(model)
    with switched_on(model, Switches(fused_kernels="liger")) as on:
        assert calls == [{"model": base, "cross_entropy": False, "fused_linear_cross_entropy": False}]
        assert calls[0]["model"] is base  # the transformers model, not the peft wrapper
        assert on.fused_kernels == "liger"
        assert "patched 7 modules" in on.notes[-1] and "3 modeling globals" in on.notes[-1]  # 1 + 3 per layer
        assert not torch.equal(_logits(model), before)  # the stand-in kernels really ran
    assert {n: getattr(modeling_llama, n) for n in real} == real
    assert type(base.model.norm) is modeling_llama.LlamaRMSNorm
    for layer in base.model.layers:
        for module in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
            assert "forward" not in vars(module) and "casting_mode" not in vars(module)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_a_liger_function_that_patches_nothing_leaves_it_off(tiny_model_dir, monkeypatch):
    calls: list[dict[str, Any]] = []
    _install_liger(monkeypatch, {"llama": lambda **kw: calls.append(kw)})
    with switched_on(_peft_model(tiny_model_dir), Switches(fused_kernels="liger")) as on:
        assert len(calls) == 1 and on.fused_kernels is None
        assert on.notes == ["train.fused_kernels: liger did not patch anything in this llama model; off"]


def test_a_model_type_liger_does_not_cover_is_left_off_naming_it(tiny_model_dir, monkeypatch):
    calls: list[dict[str, Any]] = []
    _install_liger(monkeypatch, {"mistral": _fake_apply_to_llama(calls)})
    model = _peft_model(tiny_model_dir)
    before = _logits(model)
    with switched_on(model, Switches(fused_kernels="liger")) as on:
        assert calls == [] and on.fused_kernels is None
        assert on.notes == ["train.fused_kernels: liger has no kernels for model_type 'llama'; off"]
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
