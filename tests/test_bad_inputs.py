"""Bad user input through the real `desktune` entry point: one clear message, exit code 2, nothing saved changed.

Each case builds the command line from a fixture in tests/bad_inputs/ (binary, truncated and damaged files are
made here from a working template) and checks that stderr holds `error:`, the specific message (file and line
or field, what is wrong), a `Fix:`, no traceback, and that every file that existed before is unchanged.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import register_tiny_hash
from tests.test_cli import run_main
from tests.tiny import CHATML, make_model_dir, tiny_config

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
    """What a case can use: its own tmp folder, the tiny models, the trained adapter and the test's monkeypatch."""

    tmp: Path
    model: Path
    other: Path
    adapter: Path
    monkeypatch: pytest.MonkeyPatch

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

    def deny(self, path: Path, read: str) -> None:
        """No read permission on `path`: chmod 000 (what a user other than root meets) and, since root reads
        anyway, `Path.<read>` of that one path raises the PermissionError the user would get."""
        real = getattr(Path, read)

        def refused(p, *args, **kwargs):
            if os.path.abspath(p) == os.path.abspath(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
            return real(p, *args, **kwargs)

        self.monkeypatch.setattr(Path, read, refused)
        path.chmod(0)

    def trained_run(self, name: str, **sections) -> Path:
        """A finished run of the tiny config with `sections` (trained here, in process)."""
        from desktune.config import load_config
        from desktune.training.loop import train

        return train(load_config(tiny_config(self.model, self.tmp, run_name=name, **sections)), quiet=True).run_dir


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
    argv = ["merge", str(c.adapter), "--output", str(c.tmp / "merged"), "--model", str(c.other)]
    return argv, [f"{c.adapter}: could not load the adapter: its weight shapes do not match this base model"], \
        f"use the base model the adapter was trained on: {c.model}"


def _merge_output_is_a_file(c: Ctx) -> tuple[list[str], list[str], str]:
    out = c.tmp / "merged.safetensors"
    out.write_text("not a folder\n")
    return (["merge", str(c.adapter), "--output", str(out)], [f"{out}: the output is a file, not a folder"],
            "choose a new folder with --output")


def _merge_output_under_a_file(c: Ctx) -> tuple[list[str], list[str], str]:
    blocker = c.tmp / "exports"
    blocker.write_text("a file where a folder should be\n")
    out = blocker / "merged"
    return (["merge", str(c.adapter), "--output", str(out)],
            [f"{out}: cannot create the output folder: {blocker} is a file"],
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
    return (["merge", str(adapter), "--output", str(c.tmp / "merged")],
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


# ---------------------------------------------------------------- cases: unreadable and damaged files


def _config_unreadable(c: Ctx) -> tuple[list[str], list[str], str]:
    cfg = c.config()
    c.deny(cfg, "open")  # the config is read with a bounded Path.open (1 MiB at most)
    return ["train", str(cfg)], [f"{cfg}: cannot read the config file: Permission denied"], f"chmod u+r {cfg}"


def _template_file(c: Ctx) -> tuple[Path, Path]:
    template = c.tmp / "chat.jinja"
    template.write_text(CHATML, encoding="utf-8")
    return template, c.config({"model": {"chat_template": str(template)}})


def _template_unreadable(c: Ctx) -> tuple[list[str], list[str], str]:
    template, cfg = _template_file(c)
    c.deny(template, "read_text")
    return (["train", str(cfg)], [f"{template}: cannot read the chat template file: Permission denied"],
            f"chmod u+r {template}")


def _template_not_utf8(c: Ctx) -> tuple[list[str], list[str], str]:
    template, cfg = _template_file(c)
    latin1 = "{# répondre en français #}" + CHATML  # saved by an editor in Latin-1
    template.write_bytes(latin1.encode("latin-1"))
    return (["train", str(cfg)], [f"{template}: the chat template file is not UTF-8 text (byte 0xe9 at offset 4)"],
            "save the template as UTF-8")


def _data_folder_unreadable(c: Ctx) -> tuple[list[str], list[str], str]:
    import datasets

    folder = c.tmp / "saved"
    argv = c.data(folder)  # writes train.jsonl too: its rows become the saved dataset
    rows = [json.loads(line) for line in (c.tmp / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    c.deny(folder, "iterdir")
    return argv, [f"{folder}: cannot read the folder: Permission denied"], f"chmod u+rx {folder}"


def _gguf_disk_full(c: Ctx) -> tuple[list[str], list[str], str]:
    import gguf

    register_tiny_hash(c.monkeypatch)
    out = c.tmp / "tuned.gguf"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    c.monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    return (["export", "gguf", str(c.adapter), "--out", str(out)],
            [f"{out}: cannot write the GGUF file (No space left on device)"], "free space on that disk")


def _modelfile_disk_full(c: Ctx) -> tuple[list[str], list[str], str]:
    register_tiny_hash(c.monkeypatch)
    out = c.tmp / "tuned.gguf"
    real = Path.write_text

    def full(p, *args, **kwargs):
        if ".Modelfile" in Path(p).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(p, *args, **kwargs)

    c.monkeypatch.setattr(Path, "write_text", full)
    return (["export", "gguf", str(c.adapter), "--out", str(out)],
            [f"{out.with_suffix('.Modelfile')}: cannot write the Modelfile (No space left on device)"],
            "free space on that disk")


def _damaged_metrics(c: Ctx, damage: Callable[[list[bytes]], tuple[list[bytes], int]], said: str
                     ) -> tuple[list[str], list[str], str]:
    """Resume a run whose metrics.jsonl `damage` changed; it returns the new lines and the damaged line's number."""
    sections = {"data": {"val_fraction": 0.0}, "checkpoint": {"every": 2}}
    run = c.trained_run("crashed", **sections)
    metrics = run / "metrics.jsonl"
    lines, bad = damage(metrics.read_bytes().splitlines(keepends=True))
    metrics.write_bytes(b"".join(lines))
    argv = ["train", str(c.config(run_name="crashed", **sections)), "--resume", str(run)]
    return argv, [f"{metrics}:{bad}: line {bad} is not a desktune record ({said}"], f"delete or repair line {bad}"


def _metrics_binary_junk(c: Ctx) -> tuple[list[str], list[str], str]:
    junk = bytes(range(0x80, 0xA0)) + b"\n"  # bytes no UTF-8 text has, in the middle of the record
    return _damaged_metrics(c, lambda lines: ([*lines[:2], junk, *lines[2:]], 3), "not UTF-8 text")


def _metrics_complete_last_line_damaged(c: Ctx) -> tuple[list[str], list[str], str]:
    # its newline was written, so no kill tore it: a damaged line, not the torn end of a crashed run
    return _damaged_metrics(c, lambda lines: ([*lines, b'{"type": "train", "st\n'], len(lines) + 1),
                            "Unterminated string")


# ---------------------------------------------------------------- cases: silently accepted before


def _override_into_a_list(c: Ctx) -> tuple[list[str], list[str], str]:
    cfg = c.config(_overlay("list_section.yaml"))
    return (["train", str(cfg), "-o", "lora.r=4"],
            ["-o lora.r=4: 'lora' is a list in the config, not a section of keys"],
            "write the section's keys without '- '")


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
        "set lora.r (default: 16), train.micro_batch_size (default: 4), train.lr (default: auto) to valid values"),
    "run_folder_not_writable": Case(_not_writable),
    "run_folder_holds_a_run": Case(_existing_run),
    "config_missing": Case(lambda c: (["train", str(c.tmp / "run.yml")],
                                      [f"{c.tmp / 'run.yml'}: config file not found"], "check the path")),
    "config_not_yaml": _whole_config("not_yaml.yaml", "invalid YAML: expected ',' or ']', but got ':'",
                                     "correct the YAML syntax", where=":5"),
    "empty_target_modules": _overlay_case(
        "empty_target_modules.yaml", ["'lora.target_modules': names no module (got [])"],
        "set lora.target_modules to a list of the layers to adapt (such as q_proj, v_proj), or to 'all-linear'"),
    "override_into_a_list_section": Case(_override_into_a_list),
    "tool_calls": _data_case(
        "tool_calls.jsonl", ":2", "message 2 has 'tool_calls': desktune does not train on tool calls",
        "remove the tool calls (and 'tool' turns) from the data"),
    "config_unreadable": Case(_config_unreadable),
    "chat_template_unreadable": Case(_template_unreadable),
    "chat_template_not_utf8": Case(_template_not_utf8),
    "data_folder_unreadable": Case(_data_folder_unreadable),
    "gguf_disk_full": Case(_gguf_disk_full),
    "gguf_modelfile_disk_full": Case(_modelfile_disk_full),
    "metrics_binary_junk_on_resume": Case(_metrics_binary_junk),
    "metrics_complete_last_line_damaged": Case(_metrics_complete_last_line_damaged),
    "config_not_a_mapping": _whole_config("not_a_mapping.yaml",
                                          "the config must be a mapping of sections, not a single value",
                                          "see examples/demo.yaml"),
}


# ---------------------------------------------------------------- cases: safe loading (tests/test_safety.py has more)


def _adapter_config_unreadable(c: Ctx) -> tuple[list[str], list[str], str]:
    adapter = c.adapter_copy()
    c.deny(adapter / "adapter_config.json", "read_text")
    return (["generate", "hi", "--adapter", str(adapter)],
            [f"{adapter / 'adapter_config.json'}: cannot read the file (Permission denied)"], "chmod u+r")


def _adapter_config_a_list(c: Ctx) -> tuple[list[str], list[str], str]:
    adapter = c.adapter_copy()
    (adapter / "adapter_config.json").write_text('[{"peft_type": "LORA"}]\n')
    return (["merge", str(adapter), "--output", str(c.tmp / "merged")],
            [f"{adapter / 'adapter_config.json'}: not a JSON object (a list)"], "restore the adapter folder")


def _trainer_state_damaged(c: Ctx) -> tuple[list[str], list[str], str]:
    run = c.trained_run("ckpt", checkpoint={"every": 2}, data={"val_fraction": 0.0})
    point = run / "checkpoints" / "step-000002"
    state = point / "trainer_state.json"
    state.write_text(state.read_text()[:200])  # cut short
    return (["train", str(c.config(run_name="ckpt")), "--resume", str(point)],
            [f"{state}: the trainer state is damaged or incomplete, so this checkpoint cannot be resumed"],
            "start the run again (no other checkpoint of this run exists)")


def _flash_attention_missing(c: Ctx) -> tuple[list[str], list[str], str]:
    cfg = c.config({"model": {"attn_implementation": "flash_attention_2"}})
    return (["train", str(cfg)], ["model.attn_implementation: flash_attention_2 was asked for, but it cannot be used"],
            "or set model.attn_implementation: sdpa")


def _out_of_memory_loading(c: Ctx) -> tuple[list[str], list[str], str]:
    import torch
    import transformers

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    c.monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    return (["train", str(c.config())],
            [f"{c.model}: out of memory while loading the model (CUDA out of memory. Tried to allocate 20.00 GiB)"],
            "load the base in 4 bit (model.quant: nf4)")


CASES.update({
    "adapter_config_unreadable": Case(_adapter_config_unreadable),
    "adapter_config_a_list": Case(_adapter_config_a_list),
    "trainer_state_damaged_on_resume": Case(_trainer_state_damaged),
    "flash_attention_missing": Case(_flash_attention_missing),
    "out_of_memory_while_loading": Case(_out_of_memory_loading),
})


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots`, with a hash of each file's bytes."""
    seen: dict[str, str] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            try:
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            except PermissionError:  # a case's unreadable file (a user other than root): its size and time
                seen[str(p)] = f"<unreadable {p.stat().st_size} {p.stat().st_mtime_ns}>"
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
    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir, other=other_model_dir, adapter=tiny_adapter, monkeypatch=monkeypatch)
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


# ---------------------------------------------------------------- what a failed command leaves for the next one


def test_a_run_that_fails_in_setup_leaves_no_folder_and_the_name_stays_free(monkeypatch, capsys, tmp_path,
                                                                              tiny_model_dir):
    from desktune import cli
    from desktune.training import loop

    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir, other=tiny_model_dir, adapter=tmp_path, monkeypatch=monkeypatch)
    run = tmp_path / "runs" / "again"
    code, _, err = run_main(monkeypatch, capsys, "train", str(ctx.config(_overlay("empty_target_modules.yaml"),
                                                                         run_name="again")))
    assert code == 2 and "lora.target_modules" in err and not run.exists()

    def peft_refuses(*args, **kwargs):  # what peft raises for target modules it cannot find
        raise ValueError("Target modules set() not found in the base model.")

    good = ctx.config(run_name="again", train={"max_steps": 1})
    monkeypatch.setattr(loop, "attach_lora", peft_refuses)
    monkeypatch.setattr("sys.argv", ["desktune", "train", str(good)])
    with pytest.raises(ValueError, match="not found in the base model"):
        cli.main()
    assert not run.exists()  # setup failed before anything trained: no half-made run folder
    monkeypatch.undo()
    code, _, err = run_main(monkeypatch, capsys, "train", str(good))
    assert code == 0, err
    assert "already holds a run" not in err and (run / "adapter").is_dir()


def test_a_torn_last_line_of_metrics_is_dropped_on_resume(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """A kill mid-write leaves the last line without its newline: resume drops it and redoes what it described."""
    from desktune import cli
    from desktune.runs import TrainRecord, read_records, records_of
    from tests.tiny import crash_at

    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir, other=tiny_model_dir, adapter=tmp_path, monkeypatch=monkeypatch)
    cfg = ctx.config(run_name="torn", data={"val_fraction": 0.0}, checkpoint={"every": 2})
    crash_at(monkeypatch, 3)
    monkeypatch.setattr("sys.argv", ["desktune", "train", str(cfg)])
    with pytest.raises(RuntimeError, match="power cut"):
        cli.main()
    monkeypatch.undo()
    metrics = tmp_path / "runs" / "torn" / "metrics.jsonl"
    with metrics.open("ab") as f:
        f.write(b'{"type": "train", "time_s": 1.5, "step": 3, "lo')  # torn by the kill
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "--resume", str(metrics.parent))
    assert code == 0, err
    assert metrics.read_bytes().endswith(b"\n")
    assert [r.step for r in records_of(read_records(metrics), TrainRecord)] == [1, 2, 3, 4]


@pytest.mark.parametrize("tail", [b'{"type": "train", "step": 3, "lo', b"\x00" * 64, b"\x89\xfe\x00junk"])
def test_only_an_unterminated_last_line_is_taken_for_a_torn_write(tmp_path, tail):
    """A kill or a power cut mid-write leaves the last line without its newline (text cut short, or NUL bytes):
    dropped. The same bytes with their newline are damage: an error naming file:line."""
    from desktune.errors import DesktuneError
    from desktune.runs import read_records

    metrics = tmp_path / "metrics.jsonl"
    good = b"".join(json.dumps({"type": "eval", "time_s": 0.0, "step": s, "val_loss": 1.0, "val_tokens": 3}).encode()
                    + b"\n" for s in (0, 2))
    metrics.write_bytes(good + tail)
    assert [r.step for r in read_records(metrics)] == [0, 2]
    metrics.write_bytes(good + tail + b"\n")
    with pytest.raises(DesktuneError, match=r"metrics.jsonl:3: line 3 is not a desktune record"):
        read_records(metrics)


# ---------------------------------------------------------------- data.bad_rows through the CLI (issue 33, item 13)


def test_a_bad_row_stops_the_run_naming_the_switch_that_skips_it(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from desktune.config import load_config
    from desktune.runs import RunDir
    from tests.tiny import write_chat_data

    data = write_chat_data(tmp_path / "chat.jsonl")
    lines = data.read_text(encoding="utf-8").splitlines()
    lines[4] = lines[4][:-5]  # a line cut short
    lines[9] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]})
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir, other=tiny_model_dir, adapter=tmp_path, monkeypatch=monkeypatch)
    argv = ctx.data(data)
    code, _, err = run_main(monkeypatch, capsys, *argv)
    flat = " ".join(err.split())
    assert code == 2 and f"{data}:5: invalid JSON on line 5" in flat, err
    assert "-o data.bad_rows=skip" in flat.split("Fix:", 1)[1] and not (tmp_path / "runs" / "new").exists()

    code, out, err = run_main(monkeypatch, capsys, *argv, "-o", "data.bad_rows=skip")
    flat = " ".join((out + err).split())
    assert code == 0, err
    assert "left out 2 bad row(s) (data.bad_rows=skip):" in flat and "2 bad rows skipped" in flat, err
    assert "chat.jsonl:5: invalid JSON on line 5" in flat and "chat.jsonl:10: content of message 2 is empty" in flat
    assert load_config(RunDir(tmp_path / "runs" / "new").config).data.bad_rows == "skip"


# ---------------------------------------------------------------- hostile configs and sizes (issue 33, items 4, 5, 8)


@pytest.mark.parametrize(("budget", "said"), [("-5GB", "'-5GB' is not a positive size"),
                                              ("abc", "'abc' is not a size"),
                                              ("1e9TB", "'1e9TB' is more than 1 PiB"),
                                              ("24", "'24' has no unit: 24GB is 24 x 10^9 bytes")])
def test_a_bad_budget_is_one_user_error(budget, said, monkeypatch, capsys):
    """Before: a traceback and exit 1 (or, for a bare 24, a plan for 24 bytes advising 'seq_len 0')."""
    code, out, err = run_main(monkeypatch, capsys, "plan", "--model", "llama-3.1-8b", f"--budget={budget}")
    flat = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err, err
    assert f"error: --budget: {said}" in flat and "Fix: give the memory with its unit, such as 24GB or 24GiB" in flat


def test_a_duplicate_key_or_an_alias_bomb_stops_train_before_anything_is_made(monkeypatch, capsys, tmp_path,
                                                                              tiny_model_dir):
    ctx = Ctx(tmp=tmp_path, model=tiny_model_dir, other=tiny_model_dir, adapter=tmp_path, monkeypatch=monkeypatch)
    path = ctx.config(train={"lr": 0.001}, lora={"target_modules": "BOMB"})
    lines = path.read_text(encoding="utf-8").splitlines()
    first = lines.index("  lr: 0.001") + 1
    path.write_text("\n".join([*lines[:first], "  lr: 5", *lines[first:]]) + "\n", encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, "train", str(path))
    flat = " ".join(err.split())
    assert code == 2 and f"duplicate key 'train.lr' at {path}:{first} and again at {path}:{first + 1}" in flat, err
    levels = ["&l0 [q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 names once expanded
    path.write_text("\n".join(lines).replace("target_modules: BOMB", f"target_modules: [{', '.join(levels)}]"),
                    encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, "train", str(path))
    assert code == 2 and "holds more than 10,000 values once its aliases" in err and len(err) < 600, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
