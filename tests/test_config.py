from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from desktune.config import RunConfig, apply_overrides, dump_config, load_config
from desktune.errors import DesktuneError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_defaults_and_required_data():
    cfg = load_config({"data": {"train": "x.jsonl"}})
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.train.lr == "auto" and cfg.train.epochs == "auto" and cfg.data.train_on == "assistant"
    with pytest.raises(DesktuneError, match="missing required key 'data'"):
        load_config({})


def test_overrides_parse_types_and_nest():
    cfg = load_config({"data": {"train": "x"}}, ["train.lr=1e-4", "lora.target_modules=all-linear",
                                                  "train.gradient_checkpointing=true", "train.max_steps=7",
                                                  "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 1e-4 and cfg.train.gradient_checkpointing == "full" and cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    raw = apply_overrides({}, ["data.train=a.jsonl", "model.name=foo/bar"])
    assert raw == {"data": {"train": "a.jsonl"}, "model": {"name": "foo/bar"}}


@pytest.mark.parametrize(
    ("raw", "overrides", "expected"),
    [
        ({"data": {"train": "x"}, "train": {"lrr": 1}}, [], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ({"data": {"train": "x"}, "lora": {"target_module": []}}, [], "did you mean 'lora.target_modules'?"),
        ({"data": {"train": "x"}}, ["trian.lr=1"], "unknown key 'trian' (did you mean 'train'?)"),
        ({"data": {"train": "x"}}, ["micro_batch_size=2"], "did you mean 'train.micro_batch_size'?"),
        ({"data": {"train": "x"}, "lr": 1}, [], "unknown key 'lr' (did you mean 'train.lr'?)"),
        ({"data": {"train": "x"}}, ["train.lr=-1"], "'train.lr': Input should be greater than 0"),
        ({"data": {"train": "x"}}, ["lora.r=0"], "'lora.r': Input should be greater than 0"),
        ({"data": {"train": "x"}}, ["train.micro_batch_size=0"], "'train.micro_batch_size'"),
        ({"data": {"train": "x"}}, ["model.quant=nf5"], "'model.quant'"),
        ({"data": {"train": "x"}}, ["train.lr"], "has no '='"),
    ],
)
def test_errors_name_the_field_and_suggest(raw, overrides, expected):
    with pytest.raises(DesktuneError) as e:
        load_config(raw, overrides)
    assert expected in str(e.value)


def test_yaml_errors_name_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: x\n  val: [unclosed\n")
    with pytest.raises(DesktuneError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(DesktuneError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  train: x\nlora:\n  rank: 8\n")
    with pytest.raises(DesktuneError, match=r"typo.yaml: unknown key 'lora.rank'"):
        load_config(typo)


def test_relative_data_paths_resolve_against_the_config_file():
    cfg = load_config(EXAMPLES / "demo.yaml")
    assert Path(cfg.data.train).is_file() and Path(cfg.data.val).is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_config_validates(name: str):
    assert isinstance(load_config(EXAMPLES / name), RunConfig)


def test_qlora_example_is_the_classic_recipe():
    cfg = load_config(EXAMPLES / "llama3-8b-qlora-24gb.yaml")
    assert (cfg.model.quant, cfg.model.double_quant, cfg.model.dtype) == ("nf4", True, "bf16")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.lr) == (2, 4, 2e-4)


def test_seed_recipe_example_keeps_the_classic_settings():
    cfg = load_config(EXAMPLES / "seed-recipe.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.lr, cfg.train.epochs) == (2, 4, 2e-4, 1)


def test_dump_round_trips(tmp_path: Path):
    cfg = load_config({"data": {"train": "x"}}, ["lora.r=4", "train.seed=7"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg


def test_keys_a_resume_may_change_are_declared_on_the_fields():
    from desktune.config import resume_may_change
    from desktune.training.resume import config_fingerprint

    volatile = resume_may_change()
    assert volatile == {"output_dir", "run_name", "checkpoint.every", "checkpoint.keep_last", "train.threads",
                        "train.eval_every", "train.diagnostics", "train.device", "train.memory_budget",
                        "train.micro_batch_size", "train.grad_accum", "train.gradient_checkpointing",
                        "train.distributed", "train.offload_params", "train.collective_timeout_s"}
    fingerprint = config_fingerprint(load_config({"data": {"train": "x.jsonl"}}))
    assert not volatile & fingerprint.keys() and {"train.lr", "lora.r", "data.train"} <= fingerprint.keys()
