"""The shape of the house: one owner for each name, short training functions, imports that run down the chain."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from desktune.runs import layout

SRC = Path(__file__).resolve().parents[1] / "src" / "desktune"
RUN_FOLDER_NAMES = {layout.CONFIG, layout.METRICS, layout.CHECKPOINTS, layout.DEMO_ANSWERS, layout.ADAPTER_CONFIG,
                    layout.ADAPTER_WEIGHTS, layout.ADAPTER_WEIGHTS_PICKLE, layout.CHAT_TEMPLATE, layout.META,
                    layout.TRAINER_STATE, layout.TRAINER_TENSORS, layout.TRAINER_STATE_PICKLE, layout.CHECKPOINT_MARKER,
                    layout.STOP_REQUEST}


def _modules(under: Path = SRC) -> list[Path]:
    return sorted(under.rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _names(text: str, name: str) -> bool:
    """A file name anywhere in the text; a plain-word folder name (checkpoints) only as a path part."""
    if "." in name:
        return name in text
    return text == name or f"{name}/" in text or f"/{name}" in text


def name_literals(path: Path) -> list[str]:
    """Run-folder names written as string literals in code (docstrings are prose, not names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [f"{path.name}:{node.lineno}: {n}" for n in RUN_FOLDER_NAMES if _names(node.value, n)]
    return found


def test_run_folder_names_live_only_in_the_runs_layer():
    outside = [p for p in _modules() if "runs" not in p.relative_to(SRC).parts]
    found = [hit for p in outside for hit in name_literals(p)]
    assert found == []


def test_the_name_check_sees_a_literal(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Mentions metrics.jsonl in prose."""\npath = run / "metrics.jsonl"\n')
    assert name_literals(bad) == ["bad.py:2: metrics.jsonl"]


@pytest.mark.parametrize("path", _modules(SRC / "training"), ids=lambda p: p.name)
def test_training_functions_fit_on_a_screen(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_runs_and_constants_are_torch_free_foundations():
    for path in [*_modules(SRC / "runs"),
                 *(SRC / f for f in ("constants.py", "errors.py", "units.py", "safety.py", "console.py"))]:
        imported = _imports(path)
        assert not any(m.split(".")[0] in {"torch", "transformers", "peft"} for m in imported), path
        ours = {m for m in imported if m.startswith("desktune")}
        assert ours <= {"desktune.errors", "desktune.runs", "desktune.runs.atomic", "desktune.runs.layout",
                        "desktune.runs.records", "desktune.constants"}, (path, ours)


def test_no_module_imports_the_package_root():
    """The root package is the public face; importing it from inside would run back up the chain."""
    offenders = [p.name for p in _modules() if p.name != "__init__.py" and "desktune" in _imports(p)]
    assert offenders == []


# the chain, in order; a module may import its own layer, the ones before it, and the foundations
CHAIN = ["config", "hardware", "memory", "defaults", "models", "adapters", "data", "scoring", "training", "evaluation",
         "inference", "export", "serving", "reporting"]
FOUNDATIONS = {"errors", "constants", "units", "runs", "safety", "console"}
FACES = {"cli", "demo_run", "__init__", "__main__"}


def _layer(module: str) -> str:
    """The chain layer of a dotted desktune module name (or of a file's path below src/desktune)."""
    return module.split(".")[1] if module.startswith("desktune.") else module


def chain_position(layer: str, where: str) -> int:
    """The layer's place in CHAIN; a layer not in it (a new package) fails saying where such a package belongs."""
    if layer not in CHAIN:
        raise AssertionError(
            f"{where}: '{layer}' is not a layer of the chain. Add it to CHAIN in tests/test_structure.py after the "
            f"layers it imports and before those that import it (the data flow: {' -> '.join(CHAIN)}), or to "
            f"FOUNDATIONS (torch-free, imported by anyone) or FACES (the CLI and other front ends, which may import "
            f"every layer), and say so in docs/architecture.md")
    return CHAIN.index(layer)


def test_imports_run_down_the_chain():
    back = []
    for path in _modules():
        rel = path.relative_to(SRC)
        here = rel.parts[0].removesuffix(".py")
        if here in FOUNDATIONS or here in FACES:
            continue
        for module in _imports(path):
            there = _layer(module)
            if not module.startswith("desktune.") or there in FOUNDATIONS:
                continue
            if there in FACES or chain_position(there, f"{rel} imports {module}") > chain_position(here, str(rel)):
                back.append(f"{rel} imports {module}")  # a face is the chain's end: no layer imports one
    assert back == []


def test_a_new_package_outside_the_chain_is_named_with_where_it_belongs():
    with pytest.raises(AssertionError, match=r"ui/app\.py: 'ui' is not a layer of the chain\. Add it to CHAIN"):
        chain_position("ui", "ui/app.py")


def test_the_chain_check_sees_a_back_import(monkeypatch):
    real = _imports
    monkeypatch.setattr(sys.modules[__name__], "_imports", lambda p: real(p) | (
        {"desktune.training.loop"} if p.name == "score.py" else set()))
    with pytest.raises(AssertionError, match=re.escape("score.py imports desktune.training.loop")):
        test_imports_run_down_the_chain()
