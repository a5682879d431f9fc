from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.tiny import lora_adapter, make_model_dir, make_tokenizer


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


@pytest.fixture(scope="session")
def gguf_tiny(tmp_path_factory) -> SimpleNamespace:
    """A tiny base (wide init, so logits separate) and a random all-linear LoRA adapter on it."""
    root = tmp_path_factory.mktemp("gguf")
    base = make_model_dir(root / "base", init_std=0.1)
    return SimpleNamespace(root=root, base=base, adapter=lora_adapter(base, root / "adapter"))


def register_tiny_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the tiny tokenizer's check hash as llama.cpp's 'gpt-2' pre-tokenizer (its split regex is GPT-2's;
    its vocabulary is too small to give one of llama.cpp's own hashes)."""
    from desktune.export import gguf_tokenizer

    digest = hashlib.sha256(str(make_tokenizer().encode(gguf_tokenizer.CHECK_TEXT)).encode()).hexdigest()
    monkeypatch.setitem(gguf_tokenizer.PRE_BY_HASH, digest, "gpt-2")


@pytest.fixture
def known_tiny(monkeypatch):
    """The tiny tokenizer is known to the GGUF writer for this test."""
    register_tiny_hash(monkeypatch)
