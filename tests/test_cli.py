from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from desktune import cli
from tests.tiny import tiny_config

VERBS = ["demo", "train", "stop", "eval", "report", "plan", "chat", "generate", "merge", "serve"]


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Call the real entry point in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["desktune", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_useful_help(verb):
    result = CliRunner().invoke(cli.app, [verb, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert len(result.output) > 300
    if verb != "demo":
        assert "Example:" in result.output or "example" in result.output.lower()


def _config(tmp_path: Path, tiny_model_dir: Path, **sections) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path, **sections)))
    return path


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda tmp, m: ["train", str(tmp / "nope.yaml")], "nope.yaml: config file not found"),
        (lambda tmp, m: ["train", str(_config(tmp, m)), "-o", "train.lrr=1"], "did you mean 'train.lr'?"),
        (lambda tmp, m: ["train", str(_config(tmp, m)), "-o", "lora.r=0"], "'lora.r': Input should be greater than 0"),
        (lambda tmp, m: ["generate", "hi", "--adapter", str(tmp)], "no adapter_config.json here"),
        (lambda tmp, m: ["merge", str(tmp / "no-adapter"), "--output", str(tmp / "m")], "adapter folder not found"),
    ],
)
def test_user_errors_exit_2_with_one_message(monkeypatch, capsys, tmp_path, tiny_model_dir, setup, expected):
    code, out, err = run_main(monkeypatch, capsys, *setup(tmp_path, tiny_model_dir))
    assert code == 2
    assert "error:" in err and expected in " ".join(err.split())
    assert "Traceback" not in out + err


def test_malformed_data_line_names_file_and_line(monkeypatch, capsys, tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    data = Path(yaml.safe_load(cfg.read_text())["data"]["train"])
    lines = data.read_text().splitlines()
    lines[4] = '{"messages": [{"role": "user", "content": "hi"}'
    data.write_text("\n".join(lines) + "\n")
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg))
    assert code == 2
    assert f"{data}:5" in err
    assert "invalid JSON" in err and "Traceback" not in err


def test_train_then_generate_and_chat(monkeypatch, capsys, tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, run_name="cli", train={"max_steps": 2})
    code, out, err = run_main(monkeypatch, capsys, "train", str(cfg), "-o", "train.max_steps=3", "--quiet")
    assert code == 0, err
    assert "done: 3 steps" in out
    adapter = tmp_path / "runs" / "cli" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    code, out, err = run_main(monkeypatch, capsys, "generate", "what is the sea?", "--adapter", str(adapter),
                              "--max-new-tokens", "5", "--dtype", "fp32")
    assert code == 0, err
    assert out.strip()  # streamed text
    result = CliRunner().invoke(cli.app, ["chat", "--adapter", str(adapter), "--max-new-tokens", "4",
                                          "--temperature", "0", "--dtype", "fp32"], input="hello\n/reset\nhi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("assistant> ") == 2
    code, out, err = run_main(monkeypatch, capsys, "merge", str(adapter), "--output", str(tmp_path / "merged"))
    assert code == 0, err
    assert (tmp_path / "merged" / "config.json").is_file()


def test_console_script_entry_point(tmp_path):
    """The installed command itself: a user error prints one message, exit code 2, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "desktune.cli", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_choice_is_a_usage_error(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "generate", "hi", "--dtype", "fp8")
    assert code == 2 and "fp8" in err and "Traceback" not in out + err


@pytest.mark.parametrize(("verb", "option", "value"), [("merge", "--dtype", "fp8"), ("plan", "--dtype", "int3"),
                                                       ("plan", "--device", "tpu"), ("plan", "--optimizer", "sgd")])
def test_fixed_value_options_are_choices(monkeypatch, capsys, tmp_path, verb, option, value):
    first = [str(tmp_path), "--output", str(tmp_path / "m")] if verb == "merge" else ["--model", "llama-3.2-1b"]
    code, out, err = run_main(monkeypatch, capsys, verb, *first, option, value)
    assert code == 2 and f"'{value}' is not one of" in " ".join(err.split()) and "Traceback" not in out + err


def test_every_verb_is_listed_in_help_and_the_module_docstring():
    listed = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "120"}).output
    commands = sorted(c.name or c.callback.__name__ for c in cli.app.registered_commands)
    assert commands == sorted(VERBS)
    assert all(verb in listed and verb in cli.__doc__ for verb in commands)
    groups = [g.name for g in cli.app.registered_groups]  # verbs with sub-verbs: export gguf
    assert groups == ["export"] and "export" in listed and "export" in cli.__doc__


def test_version_comes_from_the_package_metadata(monkeypatch, capsys):
    from importlib.metadata import version

    import desktune

    code, out, _ = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"desktune {version('desktune')}" == f"desktune {desktune.__version__}"


def test_plan_list_prints_the_catalog(monkeypatch, capsys):
    from desktune.memory.catalog import CATALOG

    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_main(monkeypatch, capsys, "plan", "--list")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == len(CATALOG) and all(any(name in r for r in rows) for name in CATALOG)
    assert "smollm2-135m-instruct" in out  # the embedded model's aliases are shown


@pytest.mark.parametrize("debug", ["", "1"])
def test_debug_mode_adds_the_cause(monkeypatch, capsys, tmp_path, debug):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    monkeypatch.setenv("DESKTUNE_DEBUG", debug)
    code, _, err = run_main(monkeypatch, capsys, "train", str(bad))
    assert code == 2 and "invalid YAML" in err
    assert ("Traceback" in err and "yaml.parser.ParserError" in err) == bool(debug)


def _commands() -> dict[str, Any]:
    """Every command as click sees it (typer's own copy of click, or click), by its path: "train", "export gguf"."""
    found, todo = {}, [("", typer.main.get_command(cli.app))]
    while todo:
        path, cmd = todo.pop()
        if hasattr(cmd, "commands"):  # a group
            todo += [(f"{path} {name}".strip(), sub) for name, sub in cmd.commands.items()]
        else:
            found[path] = cmd
    return found


def test_a_short_flag_means_one_thing_in_every_command():
    """-o is --override (train); no command uses it for an output (--out, --output, --output-dir before)."""
    meanings: dict[str, set[str]] = {}
    for cmd in _commands().values():
        for param in cmd.params:
            for flag in (o for o in [*param.opts, *param.secondary_opts] if not o.startswith("--")):
                meanings.setdefault(flag, set()).add(max(param.opts, key=len))
    assert {flag: m for flag, m in meanings.items() if len(m) > 1} == {}
    assert meanings["-o"] == {"--override"}


@pytest.mark.parametrize("path", sorted(_commands()))
def test_help_reads_whole_at_80_columns(path):
    """No description cut with "…", no <bool> type on a flag, no line past 80 columns."""
    help_text = CliRunner().invoke(cli.app, [*path.split(), "--help"], env={"COLUMNS": "80"}).output
    assert "…" not in help_text and "<bool>" not in help_text and "<list[str]>" not in help_text
    assert max(len(line) for line in help_text.splitlines()) <= 80, help_text
    for param in _commands()[path].params:  # each option's help is all there, re-flowed
        if param.param_type_name == "option" and param.help:
            assert " ".join(param.help.split()) in " ".join(help_text.split()), param.help


def test_the_command_list_shows_each_summary_whole_at_80_columns():
    listed = " ".join(CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "80"}).output.split())
    for info in cli.app.registered_commands:
        summary = " ".join(info.callback.__doc__.split("\n\n")[0].split())
        assert summary in listed


def test_outputs_take_one_long_name_and_the_old_one_still_works(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "generate", "hi", "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err  # --out: still read, refused for being a folder
    for path in ("generate", "export gguf", "merge", "eval", "report"):
        assert "--output" in {o for p in _commands()[path].params for o in p.opts}, path



def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on():
    """In a terminal, Ctrl-C while an answer streams ended `desktune chat` (exit 130); now it stops that answer."""
    from desktune.inference import chat_loop

    asked, shown, notes = [], [], []
    typed = iter(["a poem please", "capital of France?"])

    class Session:
        def describe(self) -> str:
            return "a stand-in"

        def ask(self, text: str, on_text) -> str:
            asked.append(text)
            if len(asked) == 1:
                on_text("The sea, the")
                raise KeyboardInterrupt
            on_text("Paris.")
            return "Paris."

    def read(prompt: str) -> str:
        shown.append(prompt)
        line = next(typed, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    chat_loop(Session(), read, shown.append, notes.append)
    assert asked == ["a poem please", "capital of France?"]
    assert "".join(shown) == "you> assistant> The sea, the\nyou> assistant> Paris.\nyou> \n"
    assert any("answer stopped" in n for n in notes)
