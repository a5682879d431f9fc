"""llama.cpp itself as the independent reader of exported GGUF files: the prebuilt CPU build node-llama-cpp ships,
driven by tests/llamacpp/reader.mjs (installed by scripts/test-tools.sh; nothing is compiled)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

READER = Path(__file__).parent / "llamacpp" / "reader.mjs"
INSTALLED = READER.parent / "node_modules" / "@node-llama-cpp" / "linux-x64"


@dataclass(frozen=True)
class Answer:
    """llama.cpp's greedy answer to one rendered prompt."""

    prompt_ids: list[int]
    ids: list[int]  # generated, without the end-of-generation token
    text: str
    stop_id: int | None  # the end-of-generation token that ended it (None: it hit the token limit)


@dataclass(frozen=True)
class ChatAnswer:
    """llama.cpp's answer through the chat template it read from the file."""

    text: str
    stop_reason: str
    wrapper: str


def need_llama_cpp() -> None:
    """Skip (or fail, with DESKTUNE_REQUIRE_TOOLS=1) when node or the prebuilt llama.cpp is missing."""
    if shutil.which("node") and INSTALLED.is_dir():
        return
    message = "llama.cpp (node-llama-cpp) is not installed: run `bash scripts/test-tools.sh`"
    if os.environ.get("DESKTUNE_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def read_with_llama_cpp(model: Path, *, prompts: list[str] = (), chats: list[str] = (), lora: list[Path] = (),
                        max_tokens: int = 64, context: int = 1024, job_dir: Path) -> tuple[list[Answer],
                                                                                           list[ChatAnswer]]:
    """Answer rendered `prompts` token by token and `chats` through the file's template, greedily, in llama.cpp."""
    need_llama_cpp()
    job = {"model": str(model), "lora": [str(p) for p in lora], "threads": min(os.cpu_count() or 1, 4),
           "contextSize": context, "maxTokens": max_tokens, "prompts": list(prompts), "chats": list(chats)}
    path = job_dir / f"job-{model.stem}.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    done = subprocess.run(["node", str(READER), str(path)], cwd=READER.parent, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, f"llama.cpp failed on {model.name}:\n{done.stderr[-3000:]}"
    out = json.loads(done.stdout)
    answers = [Answer(a["promptTokens"], a["tokens"], a["text"], a["stopped"]) for a in out["answers"]]
    return answers, [ChatAnswer(c["text"], c["stopReason"], c["wrapper"]) for c in out["chats"]]
