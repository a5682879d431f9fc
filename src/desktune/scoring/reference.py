"""The general reference forgetting is measured on, and the base model's own answers to it, cached per model.

Built in (scoring/reference/, written for desktune): 224 general prompts (everyday questions, instructions,
small reasoning, writing, explanations, code) and a 136-question knowledge probe with one right answer each.
The base model answers each prompt once, greedily; the answers are cached per prompt under desktune's cache, in
one file per model fingerprint, load variant, chat template and answer length, so a later eval or run (another
dataset, a larger share of replay) reuses every answer already made and generates only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

from desktune.errors import DesktuneError

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
GENERAL_PROMPTS = "general_prompts.jsonl"
KNOWLEDGE_PROBE = "knowledge_probe.jsonl"
REPLAY_PROMPTS = "replay_prompts.jsonl"  # training replay: disjoint from GENERAL_PROMPTS, which measure forgetting
ANSWER_TOKENS = 64  # the base's greedy answer to a general prompt: a few sentences, enough to carry its style
PROBE_TOKENS = 24  # a probe answer is a word or a number; room for a short sentence around it
FINGERPRINT_BYTES = 1 << 20  # bytes read from each end of a weight file: changed weights change these bytes
_CACHE_VERSION = 2  # bump when what is cached changes meaning


@dataclass(frozen=True)
class Reference:
    """Prompts to measure forgetting on; `texts` are given answers (a user's file) instead of the base's own."""

    name: str
    prompts: list[str]
    texts: list[str] | None = None


@dataclass(frozen=True)
class Question:
    """A knowledge-probe question and the answers counted as right."""

    question: str
    answers: tuple[str, ...]


def _jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, object) of every non-empty line; a bad line is a user error naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DesktuneError(f"cannot read the reference file ({e})", where=str(path),
                            fix="pass a readable UTF-8 .jsonl or .txt file") from e
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append((number, json.loads(line)))
            except ValueError as e:
                raise DesktuneError(f"not JSON ({e})", where=f"{path}:{number}",
                                    fix='write one JSON object per line, e.g. {"prompt": "..."}') from e
    return out


def builtin_reference() -> Reference:
    """The built-in general prompts."""
    rows = _jsonl(REFERENCE_DIR / GENERAL_PROMPTS)
    return Reference(name=f"built-in general prompts ({len(rows)})", prompts=[r["prompt"] for _, r in rows])


def builtin_replay() -> Reference:
    """The built-in general prompts whose base answers a run replays (never the ones forgetting is measured on)."""
    rows = _jsonl(REFERENCE_DIR / REPLAY_PROMPTS)
    return Reference(name=f"built-in replay prompts ({len(rows)})", prompts=[r["prompt"] for _, r in rows])


def builtin_probe() -> list[Question]:
    """The built-in knowledge probe."""
    return [Question(r["question"], tuple(r["answers"])) for _, r in _jsonl(REFERENCE_DIR / KNOWLEDGE_PROBE)]


def read_reference(path: str | Path) -> Reference:
    """A user's reference: a .txt file (one prompt per line) or .jsonl with "prompt" and optionally "answer"."""
    path = Path(path)
    if path.suffix == ".txt":
        try:
            prompts = [p.strip() for p in path.read_text(encoding="utf-8").splitlines() if p.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DesktuneError(f"cannot read the reference file ({e})", where=str(path),
                                fix="pass a readable UTF-8 text file, one prompt per line") from e
        texts = None
    else:
        rows = _jsonl(path)
        for number, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise DesktuneError('the line has no "prompt" text', where=f"{path}:{number}",
                                    fix='write {"prompt": "...", "answer": "..."} (answer optional) per line')
        prompts = [r["prompt"] for _, r in rows]
        given = [r.get("answer") for _, r in rows]
        texts = given if all(isinstance(a, str) and a.strip() for a in given) else None
    if not prompts:
        raise DesktuneError("the reference file holds no prompt", where=str(path), fix="add prompts to it")
    return Reference(name=f"{path.name} ({len(prompts)} prompts)", prompts=prompts, texts=texts)


def model_fingerprint(folder: str | Path) -> str:
    """A short hash of a model folder's config, tokenizer and weight files (their size and both ends)."""
    h = hashlib.sha256()
    root = Path(folder)
    if not root.is_dir():  # a hub id: its name is all we have without loading it
        return hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            h.update(f.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                f.seek(-FINGERPRINT_BYTES, 2)
                h.update(f.read())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class AnswerKey:
    """What a base model's greedy answer depends on besides its prompt: the model's files, how it was loaded,
    the chat template, the answer length and the repetition penalty."""

    fingerprint: str
    variant: str
    chat_template: str | None
    tokens: int
    repetition_penalty: float = 1.0


class AnswerStore:
    """The base's greedy answers under one `AnswerKey`, per prompt: a JSON-lines file, one line appended per
    answer as it is made (a stopped run keeps what it made; a torn last line is skipped), shared by replay, the
    forgetting reference and the knowledge probe."""

    # our own few lines rather than diskcache (it pickles values) or sqlite: appendable, readable, nothing executes

    def __init__(self, folder: Path, key: AnswerKey) -> None:
        text = json.dumps([_CACHE_VERSION, *astuple(key)], ensure_ascii=False)
        self.key = key
        self.path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.jsonl"

    def read(self) -> dict[str, str]:
        """Prompt -> answer for every whole line (none when the file is absent or unreadable)."""
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may be in a text
        except (OSError, UnicodeDecodeError):
            return {}
        known: dict[str, str] = {}
        for line in lines:
            try:
                row = json.loads(line)
                prompt, answer = row["prompt"], row["answer"]
            except (ValueError, KeyError, TypeError):
                continue  # the header, a torn last line or damage: that prompt is answered again
            if isinstance(prompt, str) and isinstance(answer, str):
                known[prompt] = answer
        return known

    def add(self, pairs: list[tuple[str, str]]) -> None:
        """Append answers, flushed to disk at once; a read-only or full cache only costs time later."""
        lines = "".join(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n" for p, a in pairs)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as f:
                if f.seek(0, os.SEEK_END) == 0:
                    lines = json.dumps({"key": asdict(self.key)}, ensure_ascii=False) + "\n" + lines
                else:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        lines = "\n" + lines  # a torn line from a stopped run stays alone on its line
                f.write(lines.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass
