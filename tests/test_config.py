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
                        "train.distributed", "train.offload_params", "train.collective_timeout_s",
                        "data.bad_rows"}
    fingerprint = config_fingerprint(load_config({"data": {"train": "x.jsonl"}}))
    assert not volatile & fingerprint.keys() and {"train.lr", "lora.r", "data.train"} <= fingerprint.keys()


# ---------------------------------------------------------------- hostile YAML: duplicates, alias bombs, size


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path):
    """`lr: 1e-3` then `lr: 5` trained with 5 before; now the error names the key and both file:lines."""
    path = _write(tmp_path, "data:\n  train: x.jsonl\ntrain:\n  lr: 1e-3\n  epochs: 1\n  lr: 5\n")
    with pytest.raises(DesktuneError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"duplicate key 'train.lr' at {path}:4 and again at {path}:6" in msg
    assert "keep one 'lr' under 'train'" in msg
    top = _write(tmp_path, "data:\n  train: x.jsonl\nrun_name: a\nrun_name: b\n")
    with pytest.raises(DesktuneError, match=rf"duplicate key 'run_name' at {top}:3 and again at {top}:4"):
        load_config(top)
    with pytest.raises(DesktuneError, match="duplicate key 'a'"):  # an -o value is checked the same way
        load_config({"data": {"train": "x"}}, ["lora.target_modules={a: 1, a: 2}"])
    merged = "data:\n  train: x.jsonl\nbase: &b {lr: 1.0e-4, seed: 1}\ntrain:\n  <<: *b\n  seed: 2\n"
    with pytest.raises(DesktuneError, match="unknown key 'base'"):  # a merge key overridden is no duplicate
        load_config(_write(tmp_path, merged))


def _bomb(width: int, depth: int, leaf: str = "q_proj") -> str:
    """A YAML flow list whose aliases expand to width**depth leaves, all inside one value (a 'billion laughs')."""
    levels = [f"&l0 [{', '.join([leaf] * width)}]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return f"[{', '.join(levels)}]"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path):
    """10^9 names under lora.target_modules grew to 1.78 GB in 60 s with no output: now refused from the parse
    (counted on YAML's shared nodes, never expanded), with a short message naming where."""
    path = _write(tmp_path, f"data:\n  train: x.jsonl\nlora:\n  target_modules: {_bomb(10, 9)}\n")
    with pytest.raises(DesktuneError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'lora.target_modules[3]' holds more than 10,000 values once its aliases" in msg
    assert msg.startswith(f"{path}:4:") and len(msg) < 400
    sixth = _write(tmp_path, f"data:\n  train: x.jsonl\nlora:\n  r: {_bomb(9, 6)}\n")  # 9^6 under a valid key
    with pytest.raises(DesktuneError, match="once its aliases") as e:
        load_config(sixth)
    assert len(str(e.value)) < 500
    with pytest.raises(DesktuneError, match="once its aliases"):  # an -o value too
        load_config({"data": {"train": "x"}}, [f"lora.target_modules={_bomb(10, 9)}"])
    loop = _write(tmp_path, "data:\n  train: &a [x.jsonl, *a]\n")
    with pytest.raises(DesktuneError, match=r"'data.train' contains itself through an alias"):
        load_config(loop)
    fine = _write(tmp_path, f"data:\n  train: x.jsonl\nlora:\n  target_modules: {_bomb(3, 3)}\n")
    with pytest.raises(DesktuneError, match="Input should be a valid string"):  # small: reaches validation
        load_config(fine)


def test_huge_or_deeply_nested_files_are_refused(tmp_path: Path):
    big = _write(tmp_path, "data:\n  train: x.jsonl\nrun_name: " + "a" * (1 << 20) + "\n")
    with pytest.raises(DesktuneError, match=r"larger than 1 MiB; a run config is a few KB"):
        load_config(big)
    deep = _write(tmp_path, "data: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(DesktuneError, match="nested too deeply"):
        load_config(deep)


def test_errors_quote_only_a_short_excerpt_of_a_value(tmp_path: Path):
    """9^6 items under a valid key gave a 681 KB message: a value is quoted in at most 80 characters, and at most
    5 problems are listed."""
    bomb: list = ["x"] * 9
    for _ in range(5):
        bomb = [bomb] * 9  # 9^6 items, shared lists as YAML aliases build them
    with pytest.raises(DesktuneError) as e:
        load_config({"data": {"train": "x"}, "lora": {"r": bomb}})
    msg = str(e.value)
    assert "'lora.r': Input should be a valid integer (got [[[...]" in msg and len(msg) < 500
    with pytest.raises(DesktuneError) as e:
        load_config({"data": {"train": "x"}, "train": {"time_budget": "9" * 100_000 + "parsecs"}})
    assert "is not a duration" in str(e.value) and len(str(e.value)) < 700
    with pytest.raises(DesktuneError) as e:
        load_config({"data": {"train": "x"}, "lora": {"target_modules": list(range(1000))}})
    assert "and 996 more problems" in str(e.value) and len(str(e.value)) < 1000
    with pytest.raises(DesktuneError) as e:
        load_config({"data": {"train": "x"}, "k" * 100_000: 1})
    assert "unknown key 'kkk" in str(e.value) and len(str(e.value)) < 500
