"""Nothing loaded from outside runs code: trainer state without pickle, pickle files refused unless allowed (and
then read weights-only), a model's own code refused unless trusted, GGUF tensors checked one by one, and run
folders that cannot escape output_dir. Each crafted file proves its own danger before it is refused."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from desktune.errors import DesktuneError
from desktune.runs.layout import (
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_PICKLE,
    CHECKPOINT_MARKER,
    TRAINER_STATE,
    TRAINER_STATE_PICKLE,
    TRAINER_TENSORS,
    RunDir,
    new_run_dir,
)
from desktune.safety import ALLOW_PICKLE_ENV
from desktune.training.checkpoint import load_state
from desktune.training.resume import capture_rng
from desktune.training.state import TrainState, decode, encode, read_state, write_state
from tests.test_cli import run_main
from tests.tiny import tiny_config, write_chat_data


@pytest.fixture(autouse=True)
def no_opt_in(monkeypatch):
    """Each test starts without --allow-pickle, and whatever a command sets is undone after it."""
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "0")


class _Plant:
    """Unpickling this runs code: it creates `marker` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _plant(path: Path, marker: Path, payload: dict | None = None) -> Path:
    torch.save({**(payload or {}), "step": _Plant(marker)}, path)
    return path


def _prove_dangerous(path: Path, marker: Path) -> None:
    """The crafted file really runs its code when fully unpickled (so the refusals above mean something)."""
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------- the trainer state file


def _state(step: int = 3) -> TrainState:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    return TrainState(step=step, micro_batch_size=2, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                      scaler={}, rng=capture_rng(), config_fingerprint={"lora.r": 4, "x": [1, 2.5, None]},
                      data_fingerprint={"train.jsonl": "ab"}, total_steps=9)


def test_the_state_file_round_trips_every_value_a_resume_needs(tmp_path):
    state = _state()
    write_state(state, tmp_path / TRAINER_STATE, tmp_path / TRAINER_TENSORS)
    back = read_state(tmp_path / TRAINER_STATE, tmp_path / TRAINER_TENSORS)
    assert back.step == 3 and back.total_steps == 9 and back.config_fingerprint == state.config_fingerprint
    assert back.optimizer["param_groups"] == state.optimizer["param_groups"]  # tuples (betas) stay tuples
    assert set(back.optimizer["state"]) == {0, 1}  # the optimizer's integer keys stay integers
    for k, moments in state.optimizer["state"].items():
        assert all(torch.equal(v, back.optimizer["state"][k][n]) for n, v in moments.items())
    random.setstate(back.rng["python"])
    np.random.set_state(back.rng["numpy"])
    torch.set_rng_state(back.rng["torch"])
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.setstate(state.rng["python"])
    np.random.set_state(state.rng["numpy"])
    torch.set_rng_state(state.rng["torch"])
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())
    assert b"\x80" not in (tmp_path / TRAINER_STATE).read_bytes()  # plain JSON text, no pickle opcode


def test_keys_that_look_like_the_encoding_survive():
    value = {"__tensor__": "t0", 3: (1, "a"), "plain": {"__map__": []}}
    tensors: dict[str, torch.Tensor] = {}
    assert decode(json.loads(json.dumps(encode(value, tensors))), tensors) == value


def test_what_the_state_file_cannot_hold_is_a_bug_not_a_pickle():
    with pytest.raises(TypeError, match="cannot store"):
        encode({"f": object()}, {})


def _checkpoint(folder: Path, state: TrainState) -> Path:
    folder.mkdir(parents=True)
    write_state(state, folder / TRAINER_STATE, folder / TRAINER_TENSORS)
    return folder


@pytest.mark.parametrize("damage", ["json", "tensors", "missing"])
def test_a_damaged_state_names_the_file_and_the_checkpoints_left(tmp_path, damage):
    run = tmp_path / "run" / "checkpoints"
    _checkpoint(run / "step-000002", _state(2))
    bad = _checkpoint(run / "step-000004", _state(4))
    if damage == "json":
        (bad / TRAINER_STATE).write_text('{"format": 1, "state": {"step": 4,')
    elif damage == "tensors":
        (bad / TRAINER_TENSORS).write_bytes((bad / TRAINER_TENSORS).read_bytes()[:50])
    else:
        (bad / TRAINER_TENSORS).unlink()
    with pytest.raises(DesktuneError, match="damaged or incomplete") as e:
        load_state(bad)
    assert str(bad / TRAINER_STATE) in str(e.value) and "step-000002" in str(e.value)


# ---------------------------------------------------------------- resume: the pickled trainer state


def _run(tmp_path: Path, model: Path, name: str = "r") -> tuple[Path, Path]:
    """A finished 4-step tiny run with a checkpoint at step 2; returns (config path, run folder)."""
    raw = tiny_config(model, tmp_path, run_name=name, checkpoint={"every": 2, "keep_last": 3},
                      data={"val_fraction": 0.0})
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    from desktune.config import load_config
    from desktune.training.loop import train

    return cfg, train(load_config(cfg), quiet=True).run_dir


@pytest.fixture()
def finished(tmp_path, tiny_model_dir):
    return _run(tmp_path, tiny_model_dir)


def test_resuming_a_crafted_pickle_runs_no_code(finished, tmp_path, monkeypatch, capsys):
    cfg, run = finished
    point = run / "checkpoints" / "step-000002"
    (point / TRAINER_STATE).unlink()
    (point / TRAINER_TENSORS).unlink()
    marker = tmp_path / "pwned"
    _plant(point / TRAINER_STATE_PICKLE, marker)

    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "--resume", str(point))
    assert code == 2 and "Traceback" not in err
    assert "stored as a pickle (trainer_state.pt)" in err and "--allow-pickle" in err and not marker.exists()

    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "--resume", str(point), "--allow-pickle")
    assert code == 2 and "Traceback" not in err
    assert "it was not loaded" in " ".join(err.split()) and not marker.exists()
    assert (run / "adapter" / ADAPTER_WEIGHTS).is_file()  # nothing saved was lost
    _prove_dangerous(point / TRAINER_STATE_PICKLE, marker)


def test_an_older_pickled_state_resumes_only_when_allowed(finished, monkeypatch, capsys):
    cfg, run = finished
    before = load_file(str(run / "adapter" / ADAPTER_WEIGHTS))
    point = run / "checkpoints" / "step-000002"
    torch.save(load_state(point).to_dict(), point / TRAINER_STATE_PICKLE)  # as desktune once wrote it
    (point / TRAINER_STATE).unlink()
    (point / TRAINER_TENSORS).unlink()

    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "--resume", str(point))
    assert code == 2 and "stored as a pickle" in err
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "--resume", str(point), "--allow-pickle", "-q")
    assert code == 0, err
    after = load_file(str(run / "adapter" / ADAPTER_WEIGHTS))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the same 4 steps, exactly


# ---------------------------------------------------------------- adapters and models stored as pickles


def _pickled_adapter(adapter: Path, into: Path) -> Path:
    folder = Path(shutil.copytree(adapter, into))
    torch.save(load_file(str(folder / ADAPTER_WEIGHTS)), folder / ADAPTER_WEIGHTS_PICKLE)
    (folder / ADAPTER_WEIGHTS).unlink()
    return folder


def _commands(adapter: Path, model: Path, tmp: Path) -> dict[str, list[str]]:
    data = write_chat_data(tmp / "held.jsonl", n=6)
    return {
        "generate": ["generate", "hi", "--adapter", str(adapter), "--model", str(model), "--max-new-tokens", "2"],
        "chat": ["chat", "--adapter", str(adapter), "--model", str(model)],
        "merge": ["merge", str(adapter), "--output", str(tmp / "merged"), "--model", str(model)],
        "export": ["export", "gguf", str(adapter), "--out", str(tmp / "m.gguf"), "--model", str(model)],
        "eval": ["eval", "--adapter", str(adapter), "--model", str(model), "--data", str(data), "--no-forgetting",
                 "--no-nf4", "--output", str(tmp / "eval.json")],
        "serve": ["serve", "--adapter", f"a={adapter}", "--model", str(model), "--port", "0"],
    }


@pytest.mark.parametrize("command", ["generate", "chat", "merge", "export", "eval", "serve"])
def test_every_command_refuses_a_pickled_adapter(command, finished, tmp_path, tiny_model_dir, monkeypatch,
                                                  capsys):
    adapter = _pickled_adapter(finished[1] / "adapter", tmp_path / "pickled")
    monkeypatch.setattr("builtins.input", lambda *_: (_ for _ in ()).throw(EOFError))  # chat: no keyboard
    monkeypatch.setattr("uvicorn.Server.run", lambda *_a, **_k: pytest.fail("serve got as far as serving"))
    code, out, err = run_main(monkeypatch, capsys, *_commands(adapter, tiny_model_dir, tmp_path)[command])
    flat = " ".join(err.split())
    assert code == 2, out + err
    assert "Traceback" not in err and f"{adapter}: the adapter is stored as a pickle (adapter_model.bin)" in flat
    assert "loading a pickle can run any code" in flat and "--allow-pickle" in flat.split("Fix:")[1]


def test_allow_pickle_reads_a_pickled_adapter_weights_only(finished, tmp_path, tiny_model_dir, monkeypatch, capsys):
    safe = finished[1] / "adapter"
    pickled = _pickled_adapter(safe, tmp_path / "pickled")
    args = ["--model", str(tiny_model_dir), "--max-new-tokens", "6", "--device", "cpu"]
    code, want, err = run_main(monkeypatch, capsys, "generate", "what is the sea?", "--adapter", str(safe), *args)
    assert code == 0, err
    code, got, err = run_main(monkeypatch, capsys, "generate", "what is the sea?", "--adapter", str(pickled), *args,
                              "--allow-pickle")
    assert code == 0, err
    assert got == want


def test_a_crafted_adapter_pickle_runs_no_code_even_when_allowed(finished, tmp_path, tiny_model_dir, monkeypatch,
                                                                 capsys):
    adapter = _pickled_adapter(finished[1] / "adapter", tmp_path / "pickled")
    marker = tmp_path / "pwned"
    _plant(adapter / ADAPTER_WEIGHTS_PICKLE, marker, load_file(str(finished[1] / "adapter" / ADAPTER_WEIGHTS)))
    code, _, err = run_main(monkeypatch, capsys, "generate", "hi", "--adapter", str(adapter), "--model",
                            str(tiny_model_dir), "--max-new-tokens", "2", "--allow-pickle")
    assert code == 2 and "Traceback" not in err and not marker.exists()
    _prove_dangerous(adapter / ADAPTER_WEIGHTS_PICKLE, marker)


@pytest.fixture()
def pickled_model(tmp_path, tiny_model_dir) -> Path:
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "pickled-model"))
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def _refused_by_train_and_generate(model: Path, tmp_path: Path, monkeypatch, capsys) -> list[str]:
    """`desktune train` on a config of `model` and `desktune generate --model`: both exit 2 without a traceback;
    returns their whitespace-flattened messages."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(model, tmp_path, run_name="refused")))
    said = []
    for argv in (["train", str(cfg)], ["generate", "hi", "--model", str(model)]):
        code, _, err = run_main(monkeypatch, capsys, *argv)
        assert code == 2 and "Traceback" not in err, err
        said.append(" ".join(err.split()))
    return said


def test_a_model_stored_as_a_pickle_is_refused_by_train_and_generate(pickled_model, tmp_path, monkeypatch, capsys):
    for flat in _refused_by_train_and_generate(pickled_model, tmp_path, monkeypatch, capsys):
        assert f"{pickled_model}: the model's weights is stored as a pickle (pytorch_model.bin)" in flat
    assert not (tmp_path / "runs" / "refused").exists()  # the refused run left no folder behind


def test_allow_pickle_loads_a_pickled_model(pickled_model, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "generate", "hi", "--model", str(pickled_model),
                            "--max-new-tokens", "2", "--allow-pickle")
    assert code == 0, err


def test_transformers_is_told_to_refuse_pickles_too(tiny_model_dir, monkeypatch):
    """Past desktune's own check (a hub id, say), from_pretrained gets use_safetensors=True unless allowed."""
    import transformers

    from desktune.config import ModelConfig
    from desktune.hardware import detect
    from desktune.models import loading

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: seen.append(kw["use_safetensors"]) or real(*a, **kw))
    hw = detect("cpu", "fp32")
    loading.load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), hw)
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    loading.load_model(ModelConfig(name=str(tiny_model_dir), dtype="fp32"), hw)
    assert seen == [True, None]


# ---------------------------------------------------------------- a model's own code


@pytest.fixture()
def remote_code_model(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "custom"))
    marker = tmp_path / "pwned"
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="desktune-test-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                            "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(raw))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)
    return folder, marker


def test_a_model_that_needs_its_own_code_is_refused(remote_code_model, tmp_path, monkeypatch, capsys):
    folder, marker = remote_code_model
    for flat in _refused_by_train_and_generate(folder, tmp_path, monkeypatch, capsys):
        assert (f"{folder}: this model needs its own Python code to load (configuration_custom.py, "
                "modeling_custom.py, named by auto_map in config.json)") in flat
        assert "model.trust_remote_code: true" in flat.split("Fix:")[1]
    assert not marker.exists()
    sys.path.insert(0, str(folder))  # the code is real: importing it runs it
    try:
        __import__("configuration_custom")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("configuration_custom", None)
    assert marker.exists()


# ---------------------------------------------------------------- GGUF: every tensor or none


def test_a_gguf_missing_a_tensor_is_refused_by_name(gguf_tiny, tmp_path, known_tiny, monkeypatch):
    from desktune.export import gguf as export_mod
    from desktune.models.gguf import convert_gguf

    plan = export_mod.model_plan
    monkeypatch.setattr(export_mod, "model_plan", lambda *a: [t for t in plan(*a) if t.name != "blk.1.ffn_up.weight"])
    path = export_mod.export_gguf(gguf_tiny.base, tmp_path / "holey.gguf", qtype="f32").path
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DesktuneError, match=r"missing 1: model\.layers\.1\.mlp\.up_proj\.weight") as e:
        convert_gguf(path)
    assert str(path) in str(e.value) and "would stay random" in str(e.value)


def test_a_complete_gguf_still_converts(gguf_tiny, tmp_path, known_tiny, monkeypatch):
    from desktune.export.gguf import export_gguf
    from desktune.models.gguf import convert_gguf

    path = export_gguf(gguf_tiny.base, tmp_path / "whole.gguf", qtype="f32").path
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    folder = convert_gguf(path)
    want, got = load_file(str(gguf_tiny.base / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert all(torch.allclose(want[k].float(), got[k].float(), atol=1e-2) for k in want)


# ---------------------------------------------------------------- run folders and pruning


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", "/etc", "..hidden", ".x", "a\\b"])
def test_a_run_name_cannot_leave_output_dir(name, tmp_path):
    with pytest.raises(DesktuneError, match="run_name"):
        new_run_dir(tmp_path / "runs", name)
    assert list(tmp_path.iterdir()) == []


def test_a_run_name_override_that_escapes_is_one_message(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path, run_name="ok")))
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "-o", "run_name=../../outside")
    assert code == 2 and "Traceback" not in err and "run_name" in err
    assert not (tmp_path.parent / "outside").exists()


def test_a_run_folder_that_is_a_symlink_is_refused(tmp_path):
    target = tmp_path / "users-folder"
    target.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(target)
    with pytest.raises(DesktuneError, match="symbolic link"):
        new_run_dir(tmp_path / "runs", "r")
    assert list(target.iterdir()) == []


def test_pruning_deletes_only_checkpoints_desktune_made(finished, tmp_path):
    run = RunDir(finished[1])
    made = run.step_folders()
    assert made and all((p / CHECKPOINT_MARKER).is_file() for p in made)
    users = run.checkpoints / "step-000001"  # a folder of the user's that happens to match the pattern
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / CHECKPOINT_MARKER).write_text("a marker, but behind a link")
    (run.checkpoints / "step-000000").symlink_to(elsewhere)
    deleted = run.prune_checkpoints(keep_last=1)
    assert deleted == made[:-1]
    assert (users / "notes.txt").read_text() == "mine" and (elsewhere / CHECKPOINT_MARKER).is_file()
    assert made[-1].is_dir()


def test_a_gguf_whose_path_is_not_utf8_converts(gguf_tiny, tmp_path, known_tiny, monkeypatch):
    """A file name in another encoding (bytes that are not UTF-8) is a valid Linux path: it converts, and the
    converted folder gets an ASCII name the tokenizer library can write under."""
    import os

    from desktune.export.gguf import export_gguf
    from desktune.models.gguf import convert_gguf

    path = export_gguf(gguf_tiny.base, tmp_path / "plain.gguf", qtype="f32").path
    latin1 = Path(os.fsdecode(os.fsencode(tmp_path) + b"/mod\xe9le.gguf"))
    path.rename(latin1)
    monkeypatch.setenv("DESKTUNE_CACHE", str(tmp_path / "cache"))
    folder = convert_gguf(latin1)
    assert folder.name.isascii() and (folder / "model.safetensors").is_file()
