from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from desktune.config import load_config
from desktune.errors import DesktuneError
from desktune.export.merge import merge_adapter
from desktune.training.loop import train
from tests.tiny import tiny_config

IDS = torch.tensor([[3, 17, 42, 99, 5, 8, 120, 7]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_merged_logits_match_base_plus_adapter(tiny_model_dir, tmp_path, quant):
    raw = tiny_config(tiny_model_dir, tmp_path, model={"quant": quant}, lora={"target_modules": "all-linear"},
                      train={"max_steps": 4}, data={"val_fraction": 0.0})
    result = train(load_config(raw), quiet=True)
    out = merge_adapter(result.adapter_dir, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers, no peft
    assert not any("lora" in k for k in merged.state_dict())
    # the reference is the 16-bit (here fp32) base + adapter, never the de-quantized 4-bit base
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, str(result.adapter_dir))
    torch.testing.assert_close(_logits(merged), _logits(ref), rtol=1e-4, atol=1e-4)
    with ref.disable_adapter():
        assert (_logits(merged) - _logits(ref)).abs().max() > 1e-4  # the merge changed the weights
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None


def test_bf16_merge_writes_16_bit_safetensors(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 1})), quiet=True)
    out = merge_adapter(result.adapter_dir, tmp_path / "m16")
    assert list(out.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16


def test_merge_refuses_a_non_empty_output(tiny_model_dir, tmp_path):
    result = train(load_config(tiny_config(tiny_model_dir, tmp_path, train={"max_steps": 1})), quiet=True)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DesktuneError, match="not empty"):
        merge_adapter(result.adapter_dir, target)
    assert (target / "keep.txt").read_text() == "mine"
