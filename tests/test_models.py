from __future__ import annotations

import shutil

import pytest
import torch

from desktune.config import ModelConfig
from desktune.errors import DesktuneError
from desktune.hardware import Hardware, pick_dtype
from desktune.models.loading import load_model, resolve_source

CPU32 = Hardware(device=torch.device("cpu"), dtype=torch.float32)


def test_local_folder_loads_frozen(tiny_model_dir):
    loaded = load_model(ModelConfig(name=str(tiny_model_dir)), CPU32)
    assert loaded.base_path == str(tiny_model_dir)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32 and loaded.tokenizer.pad_token_id is not None


def test_offline_hub_id_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DesktuneError) as e:
        load_model(ModelConfig(name="some-org/not-a-cached-model"), CPU32)
    msg = str(e.value)
    assert "cannot be reached" in msg and "model.name" in msg and "local-dir" in msg


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "without config.json"),
        (lambda p: (p / "w.bin").write_text("x") and p / "w.bin", "not a .gguf model"),
    ],
)
def test_bad_model_paths(tmp_path, make, expected):
    with pytest.raises(DesktuneError, match=expected):
        resolve_source(str(make(tmp_path)))


def test_corrupted_config_and_truncated_weights(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(DesktuneError, match=r"config.json is not valid JSON"):
        load_model(ModelConfig(name=str(broken)), CPU32)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DesktuneError, match="could not load the model"):
        load_model(ModelConfig(name=str(truncated)), CPU32)


def test_precision_rules():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) in (torch.bfloat16, torch.float32)  # never fp16 on a CPU
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(DesktuneError, match="fp16 on the CPU"):
        pick_dtype("fp16", cpu)
