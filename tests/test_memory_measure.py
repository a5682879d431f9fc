from __future__ import annotations

import time

import torch

import desktune.memory.estimate as estimate_module
from desktune.adapters import attach_lora
from desktune.config import LoraConfig, TrainConfig
from desktune.memory import PeakTracker, PlanInputs, model_tensors
from desktune.memory.catalog import ArchSpec
from desktune.memory.estimate import estimate
from desktune.memory.measure import tensor_storages
from desktune.scoring.ce import target_ce_sum
from desktune.training.optim import make_optimizer
from tests.tiny import packed_bf16_step_peak


def test_tracker_counts_live_tensors():
    w = torch.zeros(1000)  # 4000 bytes existing on entry
    with PeakTracker("cpu", [w, w.view(10, 100)]) as tr:
        assert tr.baseline_bytes == 4000  # one storage, counted once
        a = torch.empty(1000)  # +4000
        b = torch.empty(2000)  # +8000: peak 16000
        view = a.view(10, 100)  # same storage: nothing new
        del a, view, b  # back to 4000
        c = torch.empty(500, dtype=torch.float64)  # +4000
        assert tr.current_bytes == 8000
        d = torch.ones(3, dtype=torch.int8).add_(1)  # in place: the same storage
        assert tr.current_bytes == 8003
    assert tr.peak_bytes == 16000
    del c, d


def test_tracker_sees_autograd_and_optimizer():
    x = torch.randn(100, 100, requires_grad=True)  # 40000 bytes
    opt = torch.optim.AdamW([x])
    with PeakTracker("cpu", [x]) as tr:
        y = (x * 2).sum()  # x * 2 lives until sum has run (not saved): 40000 + 4
        y.backward()  # x.grad: 40000
        opt.step()  # exp_avg, exp_avg_sq: 80000 + step scalar
    assert tr.peak_bytes >= 40000 * 4
    assert tr.current_bytes >= 40000 * 4  # grad and state stay


def test_tracker_counts_quantized_inner_tensors():
    from desktune.models.quantize import import_torchao_nf4, tensor_nbytes

    nf4 = import_torchao_nf4()
    q = nf4.to_nf4(torch.randn(128, 256), 64, 256)
    assert sum(st.nbytes() for st in tensor_storages(q)) == tensor_nbytes(q)
    with PeakTracker("cpu", [q]) as tr:
        pass
    assert tr.baseline_bytes == tensor_nbytes(q)


def _tiny_arch() -> ArchSpec:
    return ArchSpec(name="tiny", family="llama", hidden=128, intermediate=352, layers=2, heads=2, kv_heads=1,
                    head_dim=64, vocab=4096, tied_embeddings=True)


def test_estimate_matches_a_real_training_step():
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    arch = _tiny_arch()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim, tie_word_embeddings=True, attn_implementation="sdpa"))
    model.requires_grad_(False)
    model = attach_lora(model, LoraConfig(r=8, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainConfig(lr=2e-4), torch.device("cpu"))
    ids = torch.randint(0, arch.vocab, (2, 256), generator=torch.Generator().manual_seed(0))
    with PeakTracker("cpu", model_tensors(model)) as tr:
        for _ in range(2):
            loss, n = target_ce_sum(model, ids, ids, torch.ones_like(ids))
            (loss / n).backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    plan = estimate(PlanInputs(arch=arch, seq_len=256, micro_batch=2, grad_accum=1, dtype_bytes=4,
                               device_type="cpu", lora_r=8, lora_dropout=0.05, padded=False))
    assert abs(plan.tensor_bytes - tr.peak_bytes) / tr.peak_bytes < 0.15, (plan.tensor_bytes, tr.peak_bytes)
    assert time.perf_counter() - t0 < 30


def test_estimate_charges_the_fp32_copies_the_cpu_bf16_packed_attention_saves(monkeypatch):
    """bf16 on the CPU, packed rows: each sample's SDPA runs in fp32 and saves fp32 copies of q, k, v and its
    output, and o_proj's input is a bf16 cast of its own; the plan of a real step counts them."""
    arch = ArchSpec(name="heads", family="llama", hidden=128, intermediate=256, layers=2, heads=8, kv_heads=2,
                    head_dim=16, vocab=1024, tied_embeddings=True)
    peak = packed_bf16_step_peak(arch)
    inputs = PlanInputs(arch=arch, seq_len=384, micro_batch=2, grad_accum=1, dtype_bytes=2, device_type="cpu",
                        lora_r=8, lora_dropout=0.0, packed=True, padded=False, optimizer="adamw")
    error = abs(estimate(inputs).tensor_bytes - peak) / peak
    monkeypatch.setattr(estimate_module, "cpu_fp32_attention", lambda inputs: False)
    error_without = abs(estimate(inputs).tensor_bytes - peak) / peak
    assert error < 0.05 < error_without, (error, error_without)
