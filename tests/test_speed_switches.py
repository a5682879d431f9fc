"""Speed/memory switches change how a step is computed, not what: each is compared with the plain path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from desktune.adapters import attach_lora, enable_checkpointing
from desktune.config import LoraConfig, load_config
from desktune.data import IGNORE_INDEX, pack
from desktune.data.encode import Example
from desktune.training.loop import train
from desktune.training.loss import target_ce_sum
from desktune.training.speed import Switches, choose_switches, compile_layers, switched_on
from tests.tiny import tiny_config


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    exs = []
    for n in (9, 23, 14):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        exs.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * 3 + ids[3:], source="t"))
    return pack(exs)


def _lora_model(model_dir, seed: int = 0, checkpointing: str | None = None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:
        assert enable_checkpointing(model, checkpointing) == {"full": 2, "selective": 1}[checkpointing]  # of 2
    torch.manual_seed(seed)
    peft = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    for name, p in peft.named_parameters():  # non-zero B so every adapter gradient is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return peft


def _loss_and_grads(model, switches: Switches | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b = _batch()
    model.zero_grad()
    with (switches or Switches()).forward_context(torch.device("cpu")):
        s, n = target_ce_sum(model, b["input_ids"], b["labels"], position_ids=b["position_ids"])
    (s / n).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return (s / n).detach(), grads


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_modes_give_the_same_gradients(tiny_model_dir, mode):
    ref = _loss_and_grads(_lora_model(tiny_model_dir))
    peft = _lora_model(tiny_model_dir, checkpointing=mode)
    peft.train()
    got = _loss_and_grads(peft)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_fp32_within_bf16_precision(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    ref = _loss_and_grads(model)
    seen: list[torch.dtype] = []
    hook = model.get_base_model().model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    got = _loss_and_grads(model, Switches(autocast=torch.bfloat16))
    hook.remove()
    assert seen == [torch.bfloat16]  # the matmuls really ran in bf16
    assert abs(float(got[0] - ref[0])) < 0.02 * float(ref[0])
    cos = torch.nn.functional.cosine_similarity(got[1], ref[1], dim=0)
    assert cos > 0.99 and got[1].dtype == torch.float32  # adapter gradients stay fp32


def test_activation_offload_gives_the_same_gradients(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    ref = _loss_and_grads(model)
    packed_to_cpu = []
    real = torch.autograd.graph.save_on_cpu.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        pack_hook = self.pack_hook
        self.pack_hook = lambda t: packed_to_cpu.append(1) or pack_hook(t)

    torch.autograd.graph.save_on_cpu.__init__ = spy
    try:
        got = _loss_and_grads(model, Switches(offload_activations=True))
    finally:
        torch.autograd.graph.save_on_cpu.__init__ = real
    assert len(packed_to_cpu) > 20  # saved activations went through the offload hooks
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_compiled_layers_give_the_same_loss_and_gradients(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    with switched_on(model, Switches(packed_attention=True)):
        ref = _loss_and_grads(model)
        assert compile_layers(model) == 2
        got = _loss_and_grads(model)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)


def test_switches_needing_a_gpu_turn_off_with_a_note_on_cpu(tiny_model_dir, tmp_path):
    cfg = load_config(tiny_config(tiny_model_dir, tmp_path, train={
        "fused_kernels": "liger", "offload_activations": True, "autocast": "fp16"}))
    s = choose_switches(cfg, torch.device("cpu"), torch.float32)
    assert (s.fused_kernels, s.offload_activations, s.autocast) == (None, False, None)
    text = " ".join(s.notes)
    assert "liger needs CUDA" in text and "offload_activations buys GPU memory only" in text and "fp16" in text
    auto = choose_switches(load_config(tiny_config(tiny_model_dir, tmp_path)), torch.device("cpu"), torch.float32)
    assert auto.notes == [] and auto.fused_kernels is None and auto.packed_attention
    bf16 = load_config(tiny_config(tiny_model_dir, tmp_path, train={"autocast": "bf16"}))
    assert choose_switches(bf16, torch.device("cpu"), torch.float32).autocast == torch.bfloat16
    assert "no effect" in choose_switches(bf16, torch.device("cpu"), torch.bfloat16).notes[0]


def test_run_with_switches_logs_notes_and_restores_attention(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, train={"fused_kernels": "liger", "max_steps": 2},
                      data={"val_fraction": 0.0})
    result = train(load_config(raw), quiet=True)
    log = (result.run_dir / "metrics.jsonl").read_text()
    assert "liger needs CUDA" in log
    assert load_file(str(result.adapter_dir / "adapter_model.safetensors"))
