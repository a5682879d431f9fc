"""desktune's CPU attention kernel (models/cpu_attention.c): exactness against fp32 SDPA, its use by packed
attention, the planner's account of it, and the fallbacks where it cannot run."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F

from desktune import hardware
from desktune.memory.catalog import ArchSpec
from desktune.memory.estimate import PlanInputs, cpu_fp32_attention, cpu_kernel_attention, estimate
from desktune.models import cpu_attention
from tests.tiny import packed_bf16_step_peak


@pytest.fixture
def kernel() -> None:
    """Skip where the kernel cannot run; built on first use inside a test, never while tests are collected."""
    if cpu_attention.library() is None:
        pytest.skip("no avx512_bf16 or no C compiler: the kernel cannot run here")


needs_kernel = pytest.mark.usefixtures("kernel")


def _bounds(lengths: list[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(itertools.accumulate(lengths, initial=0)))


def _inputs(lengths: list[int], heads: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v in transformers' layout ([1, heads, T, 64] views of [1, T, heads, 64]) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)

    def make(h: int, scale: float) -> torch.Tensor:
        x = torch.randn(1, t, h, 64, generator=g) * scale
        return x.bfloat16().transpose(1, 2).requires_grad_()

    return make(heads, 2.0), make(groups, 2.0), make(groups, 1.0), torch.randn(1, t, heads, 64, generator=g).bfloat16()


def _reference(q, k, v, grad, bounds):
    """Per-sample causal SDPA in fp32 from the same bf16 inputs: output and the gradients of q, k, v."""
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    outs = [F.scaled_dot_product_attention(qf[:, :, s:e], kf[:, :, s:e], vf[:, :, s:e], is_causal=True,
                                           enable_gqa=True).transpose(1, 2) for s, e in bounds]
    out = torch.cat(outs, 1)
    out.backward(grad.float())
    return [out, qf.grad, kf.grad, vf.grad]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach()).norm() / b.detach().norm())


@needs_kernel
@pytest.mark.parametrize(("lengths", "heads", "groups"), [
    ([5], 4, 4), ([64], 9, 3), ([65, 130], 9, 3), ([1, 2, 3, 70], 4, 1), ([35, 300], 6, 2)])
def test_kernel_matches_fp32_sdpa_per_sample(lengths, heads, groups):
    """Output and gradients within bf16 rounding of fp32 SDPA run sample by sample (measured: output 1.4-1.7e-3,
    gradients 1.9-5.6e-3 relative); lengths off the 64-token tile, one-token samples, grouped heads."""
    q, k, v, grad = _inputs(lengths, heads, groups)
    bounds = _bounds(lengths)
    out = cpu_attention.packed_causal_attention(q, k, v, bounds, 64 ** -0.5)
    out.backward(grad)
    ref = _reference(q, k, v, grad, bounds)
    errors = [_rel(a, b) for a, b in zip([out, q.grad, k.grad, v.grad], ref, strict=True)]
    assert errors[0] < 4e-3 and max(errors[1:]) < 1.2e-2, errors


@needs_kernel
def test_samples_do_not_attend_to_each_other():
    """Changing the first sample's keys and values leaves the second sample's output exactly as it was."""
    q, k, v, _ = _inputs([70, 90], 4, 2)
    bounds = _bounds([70, 90])
    before = cpu_attention.packed_causal_attention(q, k, v, bounds, 0.125).detach()
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, :70] += 1.0
    v2[:, :, :70] -= 1.0
    after = cpu_attention.packed_causal_attention(q.detach(), k2, v2, bounds, 0.125)
    assert torch.equal(before[:, 70:], after[:, 70:])
    assert not torch.equal(before[:, :70], after[:, :70])


def _tiny_llama(head_dim: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=4 * head_dim, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, attn_implementation="sdpa")).to(torch.bfloat16)


def _packed_step(model, monkeypatch, kernel: str) -> tuple[float, torch.Tensor, int]:
    """Loss, q_proj's weight gradient of layer 0 and the kernel's calls for one packed row of three samples."""
    from desktune.models.packed_attention import restore_attention, use_packed_attention

    monkeypatch.setenv("DESKTUNE_CPU_ATTENTION", kernel)
    calls = []
    real = cpu_attention.PackedCausalAttention.apply
    monkeypatch.setattr(cpu_attention.PackedCausalAttention, "apply", lambda *a: calls.append(1) or real(*a))
    previous = use_packed_attention(model)
    ids = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in (60, 100, 40)]).unsqueeze(0)
    model.zero_grad()
    loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    loss.backward()
    restore_attention(model, previous)
    return float(loss.detach()), model.model.layers[0].self_attn.q_proj.weight.grad.float().clone(), len(calls)


@needs_kernel
def test_packed_rows_run_the_kernel_and_match_sdpa(monkeypatch):
    """A packed bf16 row of a head_dim-64 Llama goes through the kernel (one call a layer) and gives the loss and
    gradients of the fp32 SDPA path it replaces, within bf16 rounding."""
    model = _tiny_llama(64)
    loss_k, grad_k, calls_k = _packed_step(model, monkeypatch, "1")
    loss_s, grad_s, calls_s = _packed_step(model, monkeypatch, "0")
    assert (calls_k, calls_s) == (2, 0)
    assert abs(loss_k - loss_s) < 2e-3 * abs(loss_s)
    assert _rel(grad_k, grad_s) < 2e-2


def test_other_head_sizes_keep_sdpa(monkeypatch):
    """head_dim 32 is not the kernel's tile: packed rows stay on PyTorch's SDPA."""
    _, _, calls = _packed_step(_tiny_llama(32), monkeypatch, "1")
    assert calls == 0


def test_a_failed_build_falls_back_with_a_log_line(monkeypatch, tmp_path, caplog):
    """A compiler that fails leaves library() None (SDPA is used) and says why in one log line."""
    monkeypatch.setattr(cpu_attention, "cpu_attention_kernel_possible", lambda: True)
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    cpu_attention.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="desktune.models.cpu_attention"):
            assert cpu_attention.library() is None
        assert "did not compile" in caplog.text
        assert cpu_attention.cache_dir() == tmp_path / "kernels"  # desktune's cache, as every cached artefact
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        cpu_attention.library.cache_clear()


def test_kernel_possible_needs_the_flag_a_compiler_and_no_off_switch(monkeypatch):
    monkeypatch.delenv("DESKTUNE_CPU_ATTENTION", raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not hardware.cpu_attention_kernel_possible()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/cc")
    monkeypatch.delenv("CC", raising=False)
    assert hardware.cpu_attention_kernel_possible()
    monkeypatch.setenv("DESKTUNE_CPU_ATTENTION", "0")
    assert not hardware.cpu_attention_kernel_possible()
    monkeypatch.delenv("DESKTUNE_CPU_ATTENTION")
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    assert not hardware.cpu_attention_kernel_possible()


ARCH64 = ArchSpec(name="h64", family="llama", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2,
                  head_dim=64, vocab=1024, tied_embeddings=True)


def test_the_plan_takes_the_kernel_where_it_runs_and_not_elsewhere():
    base = PlanInputs(arch=ARCH64, seq_len=256, dtype_bytes=2, device_type="cpu", packed=True, padded=False)
    assert cpu_kernel_attention(base.with_(cpu_attention_kernel=True))
    assert not cpu_kernel_attention(base) and cpu_fp32_attention(base)
    assert not cpu_kernel_attention(base.with_(cpu_attention_kernel=True, dtype_bytes=4))
    assert not cpu_kernel_attention(base.with_(cpu_attention_kernel=True, device_type="cuda"))
    assert estimate(base.with_(cpu_attention_kernel=True)).tensor_bytes < estimate(base).tensor_bytes


@needs_kernel
def test_the_plan_matches_a_measured_kernel_step(monkeypatch):
    """A real bf16 packed step through the kernel, its peak of live tensors measured: the plan that counts the
    kernel is within 5%, the plan of the fp32 path it replaced is not."""
    monkeypatch.setenv("DESKTUNE_CPU_ATTENTION", "1")
    arch = ARCH64
    peak = packed_bf16_step_peak(arch)
    inputs = PlanInputs(arch=arch, seq_len=384, micro_batch=2, grad_accum=1, dtype_bytes=2, device_type="cpu",
                        lora_r=8, lora_dropout=0.0, packed=True, padded=False, optimizer="adamw")
    error = abs(estimate(inputs.with_(cpu_attention_kernel=True)).tensor_bytes - peak) / peak
    error_fp32 = abs(estimate(inputs).tensor_bytes - peak) / peak
    assert error < 0.05 < error_fp32, (error, error_fp32)


def test_a_failed_build_is_the_runs_one_attention_decision(tiny_model_dir, tmp_path, monkeypatch):
    """Where the kernel could run but does not build, setup decides once: the plan counts SDPA, the model runs it,
    the record says why (before: the plan counted the kernel while attention ran in fp32)."""
    from desktune.config import load_config
    from desktune.runs import EventRecord, RunDir, read_records, records_of
    from desktune.training import loop
    from tests.tiny import tiny_config

    monkeypatch.setattr(hardware, "cpu_attention_kernel_possible", lambda: True)
    monkeypatch.setattr(cpu_attention, "library", lambda: None)
    planned, real = [], loop.fit_to_budget
    monkeypatch.setattr(loop, "fit_to_budget",
                        lambda cfg, hw, **kw: planned.append(hw.cpu_attention_kernel) or real(cfg, hw, **kw))
    raw = tiny_config(tiny_model_dir, tmp_path, model={"name": str(tiny_model_dir), "dtype": "bf16"},
                      train={"max_steps": 2})
    result = loop.train(load_config(raw), quiet=True)
    assert planned == [False]
    said = [e for e in records_of(read_records(RunDir(result.run_dir).metrics), EventRecord)
            if e.name == "attention_fallback"]
    assert len(said) == 1 and "did not build" in said[0].message and "fp32" in said[0].message


def test_a_run_that_would_not_use_the_kernel_builds_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """An fp32 run (or one without packing) on a CPU that could run the kernel never compiles it at start-up."""
    from desktune.config import load_config
    from desktune.training import loop
    from tests.tiny import tiny_config

    built = []
    monkeypatch.setattr(hardware, "cpu_attention_kernel_possible", lambda: True)
    monkeypatch.setattr(cpu_attention, "library", lambda: built.append(1))
    for dtype, packing in (("fp32", True), ("bf16", False)):
        raw = tiny_config(tiny_model_dir, tmp_path, run_name=f"{dtype}-{packing}", model={"dtype": dtype},
                          data={"packing": packing}, train={"max_steps": 1})
        loop.train(load_config(raw), quiet=True)
    assert built == []
