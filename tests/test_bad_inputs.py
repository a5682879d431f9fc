"""Bad user input through the real `desktune` entry point: one clear message, exit code 2, nothing saved changed.

Each case builds the command line from a fixture in tests/bad_inputs/ (binary, truncated and damaged files are
made here from a working template) and checks that stderr holds `error:`, the specific message (file and line
or field, what is wrong), a `Fix:`, no traceback, and that every file that existed before is unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.test_cli import run_main
from tests.tiny import make_model_dir, tiny_config

BAD = Path(__file__).parent / "bad_inputs"


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama of another hidden size: adapters of tiny_model_dir do not fit it."""
    return make_model_dir(tmp_path_factory.mktemp("other-llama"), hidden=32)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter trained for one step on tiny_model_dir."""
    from desktune.config import load_config
    from desktune.training.loop import train

    tmp = tmp_path_factory.mktemp("adapter-run")
    cfg = load_config(tiny_config(tiny_model_dir, tmp, run_name="a", train={"max_steps": 1},
                                  data={"val_fraction": 0.0}))
    return train(cfg, quiet=True).adapter_dir


@dataclass
class Ctx:
    """What a case can use: its own tmp folder, the tiny models and the trained adapter."""

    tmp: Path
    model: Path
    other: Path
    adapter: Path

    def config(self, overlay: dict | None = None, **sections) -> Path:
        """Write a working tiny run config (with `sections` and a deep-merged `overlay`) and return its path."""
        raw = tiny_config(self.model, self.tmp, **{"run_name": "new", **sections})
        _deep_merge(raw, overlay or {})
        path = self.tmp / "run.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    def data(self, path: Path, **data) -> list[str]:
        return ["train", str(self.config(data={"train": str(path), **data}))]

    def model_copy(self, name: str = "model") -> Path:
        return Path(shutil.copytree(self.model, self.tmp / name))

    def adapter_copy(self) -> Path:
        return Path(shutil.copytree(self.adapter, self.tmp / "adapter"))


def _deep_merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _overlay(name: str) -> dict:
    return yaml.safe_load((BAD / name).read_text(encoding="utf-8"))


@dataclass
class Case:
    """argv builder -> (argv, expected text in the normalised stderr, expected text of the Fix: part)."""

    build: Callable[[Ctx], tuple[list[str], list[str], str]]


# ---------------------------------------------------------------- cases: data files


def _data_case(name: str, where: str, said: str, fix: str, **data) -> Case:
    path = BAD / name
    return Case(lambda c: (c.data(path, **data), [f"{path}{where}: {said}"], fix))


def _binary(c: Ctx) -> tuple[list[str], list[str], str]:
    data = c.tmp / "chat.jsonl"
    argv = c.data(data)
    data.write_bytes((c.model / "model.safetensors").read_bytes()[:4096])  # weights saved under a data name
    return argv, [f"{data}: looks like a binary file (contains NUL bytes)"], "use one of: .jsonl"


def _gzipped(c: Ctx) -> tuple[list[str], list[str], str]:
    data = c.tmp / "chat.jsonl"
    argv = c.data(data)  # the config writes a good train.jsonl: its compressed bytes become the data
    data.write_bytes(gzip.compress((c.tmp / "train.jsonl").read_bytes()))
    return argv, [f"{data}: this is a gzip-compressed file, not text"], "decompress it first (gunzip)"


def _utf16(c: Ctx) -> tuple[list[str], list[str], str]:
    data = c.tmp / "chat.jsonl"
    argv = c.data(data)
    data.write_bytes((c.tmp / "train.jsonl").read_text(encoding="utf-8").encode("utf-16"))
    return argv, [f"{data}: the file is UTF-16 text, not UTF-8"], "save the file as UTF-8"


def _deeply_nested(c: Ctx) -> tuple[list[str], list[str], str]:
    data = c.tmp / "chat.jsonl"
    argv = c.data(data)
    data.write_text('{"messages": ' + "[" * 50_000 + "\n")  # brackets that never close
    return argv, [f"{data}:1: the JSON is nested too deeply to read"], "correct the JSON"


def _folder_without_dataset(c: Ctx) -> tuple[list[str], list[str], str]:
    folder = c.tmp / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("my training data\n")
    argv = c.data(folder)
    shutil.copy(c.tmp / "train.jsonl", folder / "chat.jsonl")
    return argv, [f"{folder}: folder is not a dataset saved with save_to_disk"], f"{folder / 'chat.jsonl'}"


def _empty_folder(c: Ctx) -> tuple[list[str], list[str], str]:
    folder = c.tmp / "data"
    folder.mkdir()
    return c.data(folder), [f"{folder}: folder is not a dataset saved with save_to_disk"], "the folder is empty"


# ---------------------------------------------------------------- cases: models


def _no_model(c: Ctx) -> tuple[list[str], list[str], str]:
    missing = c.tmp / "models" / "llama-tiny"
    cfg = c.config({"model": {"name": str(missing)}})
    return ["train", str(cfg)], [f"model.name={missing}: no such file or folder"], "use a local model folder"


def _no_model_relative(c: Ctx) -> tuple[list[str], list[str], str]:
    cfg = c.config({"model": {"name": "no-such-models/llama-tiny"}})  # relative: could also be a hub id
    said = ("model.name: model 'no-such-models/llama-tiny' is not a local folder nor in the local cache, and the "
            "model hub cannot be reached")
    return ["train", str(cfg)], [said], "set model.name to an existing model"


def _bad_model_json(c: Ctx) -> tuple[list[str], list[str], str]:
    model = c.model_copy()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,\n')
    cfg = c.config({"model": {"name": str(model)}})
    return ["train", str(cfg)], [f"{model / 'config.json'}: config.json is not valid JSON"], "restore the model"


def _model_json_without_type(c: Ctx) -> tuple[list[str], list[str], str]:
    model = c.model_copy()
    (model / "config.json").write_text('{"hidden_size": 64}\n')
    cfg = c.config({"model": {"name": str(model)}})
    return ["train", str(cfg)], [f"{model / 'config.json'}: config.json has no 'model_type'"], "restore the model"


def _unknown_architecture(c: Ctx) -> tuple[list[str], list[str], str]:
    model = c.model_copy()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no-such-arch"}))
    cfg = c.config({"model": {"name": str(model)}})
    return (["train", str(cfg)], [f"{model}: could not load the model:", "no-such-arch"],
            "upgrade transformers (pip install -U transformers)")


def _truncated_weights(c: Ctx) -> tuple[list[str], list[str], str]:
    model = c.model_copy()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = c.config({"model": {"name": str(model)}})
    return (["train", str(cfg)], [f"{weights}: could not load the model: the weights file is damaged or incomplete, "
                                  "perhaps truncated (Error while deserializing header"], "download or copy it again")


# ---------------------------------------------------------------- cases: adapters


def _adapter_other_base_generate(c: Ctx) -> tuple[list[str], list[str], str]:
    argv = ["generate", "hi", "--adapter", str(c.adapter), "--model", str(c.other), "--max-new-tokens", "2"]
    return argv, [f"{c.adapter}: could not load the adapter: its weight shapes do not match this base model"], \
        f"use the base model the adapter was trained on: {c.model}"


def _adapter_other_base_merge(c: Ctx) -> tuple[list[str], list[str], str]:
    argv = ["merge", str(c.adapter), "-o", str(c.tmp / "merged"), "--model", str(c.other)]
    return argv, [f"{c.adapter}: could not load the adapter: its weight shapes do not match this base model"], \
        f"use the base model the adapter was trained on: {c.model}"


def _merge_output_is_a_file(c: Ctx) -> tuple[list[str], list[str], str]:
    out = c.tmp / "merged.safetensors"
    out.write_text("not a folder\n")
    return (["merge", str(c.adapter), "-o", str(out)], [f"{out}: the output is a file, not a folder"],
            "choose a new folder with -o")


def _merge_output_under_a_file(c: Ctx) -> tuple[list[str], list[str], str]:
    blocker = c.tmp / "exports"
    blocker.write_text("a file where a folder should be\n")
    out = blocker / "merged"
    return (["merge", str(c.adapter), "-o", str(out)], [f"{out}: cannot create the output folder: {blocker} is a file"],
            "choose a folder in a writable place")


def _adapter_bad_json(c: Ctx) -> tuple[list[str], list[str], str]:
    adapter = c.adapter_copy()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA",')
    return (["generate", "hi", "--adapter", str(adapter)], [f"{adapter / 'adapter_config.json'}: invalid JSON"],
            "restore the adapter folder")


def _adapter_truncated(c: Ctx) -> tuple[list[str], list[str], str]:
    adapter = c.adapter_copy()
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return (["merge", str(adapter), "-o", str(c.tmp / "merged")],
            [f"{weights}: could not load the adapter: the weights file is damaged or incomplete, perhaps truncated"],
            "restore the adapter folder")


# ---------------------------------------------------------------- cases: config and run folder


def _not_writable(c: Ctx) -> tuple[list[str], list[str], str]:
    blocker = c.tmp / "outputs"
    blocker.write_text("a file where the output folder should be\n")
    cfg = c.config(output_dir=str(blocker / "runs"))
    return ["train", str(cfg)], [f"{blocker / 'runs' / 'new'}: cannot write the run folder"], \
        "choose a writable output_dir"


def _existing_run(c: Ctx) -> tuple[list[str], list[str], str]:
    cfg = c.config(run_name="earlier")
    return ["train", str(cfg)], [f"{c.tmp / 'runs' / 'earlier'}: the run folder already holds a run"], \
        "choose another run_name"


def _whole_config(name: str, said: str, fix: str, where: str = "") -> Case:
    return Case(lambda c: (["train", str(BAD / name)], [f"{BAD / name}{where}: {said}"], fix))


def _overlay_case(name: str, said: list[str], fix: str) -> Case:
    def build(c: Ctx) -> tuple[list[str], list[str], str]:
        cfg = c.config(_overlay(name))
        return ["train", str(cfg)], [s.format(cfg=cfg) for s in said], fix

    return Case(build)


CASES: dict[str, Case] = {
    "invalid_json_line": _data_case("invalid_json_line.jsonl", ":3", "invalid JSON on line 3: Expecting ',' delimiter",
                                    "each line must hold one complete JSON object"),
    "unknown_fields": _data_case(
        "unknown_fields.jsonl", ":1", "cannot detect the data format from the keys (question, answer)",
        "rename 'question' to 'instruction' and 'answer' to 'output' (format 'alpaca')"),
    "missing_fields": _data_case(
        "missing_fields.jsonl", ":2", "missing field 'output' for format 'alpaca' (row has: instruction, response)",
        "rename 'response' to 'output'; 'alpaca' rows need instruction, output"),
    "empty_content": _data_case("empty_content.jsonl", ":2", "content of message 2 is empty",
                                "fill it in or remove the row"),
    "whitespace_content": _data_case("whitespace_content.jsonl", ":3", "content of message 1 is empty",
                                     "fill it in or remove the row"),
    "wrong_role_order": _data_case("wrong_role_order.jsonl", ":2",
                                   "message 1: the conversation must start with a user turn",
                                   "order turns as: optional system, then user, assistant"),
    "non_string_content": _data_case("non_string_content.jsonl", ":2",
                                     "content of message 2 is number, expected a string", "make it a text value"),
    "empty_file": _data_case("empty.jsonl", "", "file is empty", "add training samples"),
    "binary_file": Case(_binary),
    "gzipped_file": Case(_gzipped),
    "utf16_file": Case(_utf16),
    "json_nested_too_deeply": Case(_deeply_nested),
    "csv_missing_column": _data_case(
        "missing_column.csv", ":row 1",
        "cannot detect the data format from the keys (instruction, input): format 'alpaca' also needs 'output'",
        "add the 'output' field (a column in CSV)"),
    "all_samples_too_long": _data_case(
        "too_long.jsonl", "", "every label of all 3 training samples is masked: none has a trainable token "
        "within max_seq_len=24 (rows ", "raise data.max_seq_len", max_seq_len=24, val_fraction=0.0),
    "data_folder_without_dataset": Case(_folder_without_dataset),
    "data_folder_empty": Case(_empty_folder),
    "model_folder_missing": Case(_no_model),
    "model_name_relative_missing": Case(_no_model_relative),
    "model_config_not_json": Case(_bad_model_json),
    "model_config_without_type": Case(_model_json_without_type),
    "model_unknown_architecture": Case(_unknown_architecture),
    "model_weights_truncated": Case(_truncated_weights),
    "adapter_other_base_generate": Case(_adapter_other_base_generate),
    "adapter_other_base_merge": Case(_adapter_other_base_merge),
    "merge_output_is_a_file": Case(_merge_output_is_a_file),
    "merge_output_under_a_file": Case(_merge_output_under_a_file),
    "adapter_config_not_json": Case(_adapter_bad_json),
    "adapter_weights_truncated": Case(_adapter_truncated),
    "unknown_target_modules": _overlay_case(
        "unknown_target_modules.yaml",
        ["lora.target_modules: unknown target module(s) 'value_proj' (did you mean 'v_proj'?); this model's linear "
         "layers are: "
         "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"],
        "use names from that list, or 'all-linear'"),
    "misspelt_keys": _overlay_case(
        "misspelt_keys.yaml",
        ["unknown key 'lora.rnak' (did you mean 'lora.r'?)",
         "unknown key 'train.micro_batch' (did you mean 'train.micro_batch_size'?)"],
        "correct or remove the key (examples/demo.yaml shows every section)"),
    "impossible_values": _overlay_case(
        "impossible_values.yaml",
        ["'lora.r': Input should be greater than 0 (got 0)", "'train.lr': Input should be greater than 0 (got -0.001)",
         "'train.micro_batch_size': Input should be greater than 0 (got 0)"],
        "set lora.r (default: 16), train.micro_batch_size (default: 2), train.lr (default: auto) to valid values"),
    "run_folder_not_writable": Case(_not_writable),
    "run_folder_holds_a_run": Case(_existing_run),
    "config_missing": Case(lambda c: (["train", str(c.tmp / "run.yml")],
                                      [f"{c.tmp / 'run.yml'}: config file not found"], "check the path")),
    "config_not_yaml": _whole_config("not_yaml.yaml", "invalid YAML: expected ',' or ']', but got ':'",
                                     "correct the YAML syntax", where=":5"),
    "config_not_a_mapping": _whole_config("not_a_mapping.yaml",
                                          "the config must be a mapping of sections, not a single value",
                                          "see examples/demo.yaml"),
}


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots`, with a hash of each file's bytes."""
    seen: dict[str, str] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return seen


def _earlier_run(tmp: Path, adapter: Path) -> Path:
    """A finished run already in output_dir: it must survive every failed command untouched."""
    run = tmp / "runs" / "earlier"
    shutil.copytree(adapter, run / "adapter")
    (run / "config.yaml").write_text("run_name: earlier\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n")
    return run


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_message_and_fix(name, monkeypatch, capsys, tmp_path, tiny_model_dir,
                                               other_model_dir, tiny_adapter):
    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir, other=other_model_dir, adapter=tiny_adapter)
    _earlier_run(tmp_path, tiny_adapter)
    argv, said, fix = CASES[name].build(ctx)
    before = _snapshot(tmp_path, tiny_model_dir, other_model_dir, tiny_adapter.parent, BAD)

    code, out, err = run_main(monkeypatch, capsys, *argv)
    print(f"[{name}] desktune {' '.join(argv)}\n{err}")  # shown with pytest -rP: the message a user would read

    flat = " ".join(err.split())
    assert code == 2, err
    assert "Traceback" not in out + err
    assert "error:" in err
    for text in said:
        assert " ".join(text.split()) in flat, f"expected {text!r} in:\n{err}"
    assert "Fix:" in err, err
    assert " ".join(fix.split()) in flat.split("Fix:", 1)[1], f"expected fix {fix!r} in:\n{err}"
    assert _snapshot(tmp_path, tiny_model_dir, other_model_dir, tiny_adapter.parent, BAD) == before
