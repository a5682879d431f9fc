from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

import desktune
from tests.tiny import tiny_config


def test_python_api_mirrors_the_cli(tiny_model_dir, tmp_path):
    raw = tiny_config(tiny_model_dir, tmp_path, run_name="api")
    cfg = desktune.load_config(raw, ["train.max_steps=2"])
    assert cfg.train.max_steps == 2
    result = desktune.train(cfg, quiet=True)
    assert result.steps == 2 and len(result.train_losses) == 2
    assert result.adapter_dir == tmp_path / "runs" / "api" / "adapter" and result.adapter_bytes > 0
    assert result.final_val_loss is not None
    text = desktune.generate("what is the sea?", adapter=result.adapter_dir, max_new_tokens=4)
    assert isinstance(text, str)
    merged = desktune.merge(result.adapter_dir, tmp_path / "merged", dtype="fp32")
    assert AutoModelForCausalLM.from_pretrained(merged).num_parameters() > 0


def test_api_raises_the_user_error_type(tmp_path):
    with pytest.raises(desktune.DesktuneError, match="config file not found"):
        desktune.train(tmp_path / "missing.yaml")


def test_api_functions_survive_importing_every_module():
    """A submodule named like an API function would replace it on import; none may."""
    import importlib
    import inspect
    import pkgutil

    for mod in pkgutil.walk_packages(desktune.__path__, "desktune."):
        importlib.import_module(mod.name)
    for name in ("train", "generate", "merge", "export_gguf", "demo", "load_config"):
        assert inspect.isfunction(getattr(desktune, name)), name


def test_public_names_resolve_and_star_import_works():
    namespace: dict = {}
    exec("from desktune import *", namespace)
    assert set(desktune.__all__) <= namespace.keys()
    assert namespace["RunConfig"] is desktune.RunConfig and desktune.RunConfig.__name__ == "RunConfig"
    assert desktune.RunResult.__name__ == "RunResult"
    with pytest.raises(AttributeError):
        desktune.not_a_name  # noqa: B018
