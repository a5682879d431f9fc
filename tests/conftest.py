from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.tiny import make_model_dir, make_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    # a wider init than the default 0.02 lets the frozen tied head separate logits, so loss can fall fast
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"), init_std=0.1)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`desktune demo` once per session (a couple of minutes on 2 cores): (result, base answers, tuned answers)."""
    from rich.console import Console

    from desktune.demo_run import run_demo

    return run_demo(output_dir=tmp_path_factory.mktemp("demo") / "runs", console=Console(width=160, record=True))
