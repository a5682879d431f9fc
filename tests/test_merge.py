from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from desktune.adapters import load_adapter, read_adapter_config, shape_mismatches
from desktune.config import load_config
from desktune.errors import DesktuneError
from desktune.export.merge import merge_adapter
from desktune.training.loop import train
from tests.tiny import make_model_dir, tiny_config

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


# ---------------------------------------------------------------- adapter errors: causes, shapes, bugs


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A DoRA adapter on q_proj / v_proj of tiny_model_dir, saved by peft (untrained: only its shapes matter)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", use_dora=True)
    out = tmp_path_factory.mktemp("peft-adapter") / "adapter"
    peft.get_peft_model(base, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def narrow_base(tmp_path_factory) -> torch.nn.Module:
    """A tiny Llama of another hidden size: adapters of tiny_model_dir do not fit it."""
    folder = make_model_dir(tmp_path_factory.mktemp("narrow-llama"), hidden=32)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _peft_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def called(*args: object, **kwargs: object) -> None:
        pytest.fail("peft ran: the shape check should have refused the adapter first")

    monkeypatch.setattr(PeftModel, "from_pretrained", called)


def test_invalid_adapter_config_keeps_the_decoder_error_as_cause(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(DesktuneError, match="invalid JSON") as e:
        read_adapter_config(tmp_path)
    assert isinstance(e.value.__cause__, json.JSONDecodeError)


def test_adapter_of_another_base_is_refused_by_its_shapes(peft_adapter, narrow_base, tiny_model_dir, monkeypatch):
    _peft_must_not_run(monkeypatch)
    with pytest.raises(DesktuneError) as e:
        load_adapter(narrow_base, peft_adapter)
    assert str(e.value).startswith(f"{peft_adapter}: could not load the adapter: its weight shapes do not match "
                                   "this base model (was it trained on another base?)")
    assert e.value.fix == f"use the base model the adapter was trained on: {tiny_model_dir} (the default when " \
                          "--model is left out)"


def test_shape_check_passes_the_right_base_and_names_each_misfit(peft_adapter, narrow_base, tiny_model_dir):
    from safetensors import safe_open

    with safe_open(str(peft_adapter / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert any(k.endswith("lora_magnitude_vector") for k in shapes)  # DoRA's tensors are checked too
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert shape_mismatches(base, shapes) == []
    misfits = shape_mismatches(narrow_base, shapes)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight: (4, 64), the base needs (4, 32)" in misfits


def test_a_bug_inside_peft_is_not_a_user_error(peft_adapter, tiny_model_dir, monkeypatch):
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug in peft")

    monkeypatch.setattr(PeftModel, "from_pretrained", broken)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(TypeError, match="a bug in peft"):
        load_adapter(base, peft_adapter)


def test_a_peft_refusal_keeps_its_cause(peft_adapter, tiny_model_dir, tmp_path):
    import shutil

    adapter = Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["nope_proj"]}))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(DesktuneError, match="could not load the adapter: Target modules") as e:
        load_adapter(base, adapter)
    assert isinstance(e.value.__cause__, ValueError)


def test_a_failed_write_leaves_nothing_behind(peft_adapter, tmp_path, monkeypatch):
    def disk_full(self: object, folder: str | Path, *args: object, **kwargs: object) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    with pytest.raises(DesktuneError, match=r"cannot write the merged model \(No space left on device\)") as e:
        merge_adapter(peft_adapter, out_dir / "merged", dtype="fp32")
    assert isinstance(e.value.__cause__, OSError)
    assert list(out_dir.iterdir()) == []  # neither the output nor a temporary sibling


def test_merge_fills_an_existing_empty_folder(peft_adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    assert merge_adapter(peft_adapter, out, dtype="fp32") == out
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
