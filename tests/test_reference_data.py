"""The reference data `desktune eval` measures forgetting with: well-formed, balanced, shipped in the package."""

from __future__ import annotations

import itertools
import json
import re
import sys
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "src" / "desktune" / "scoring" / "reference"
PROMPTS = REFERENCE / "general_prompts.jsonl"
PROBE = REFERENCE / "knowledge_probe.jsonl"
REPLAY = REFERENCE / "replay_prompts.jsonl"
PACKAGE_GLOB = "src/desktune/scoring/reference/*.jsonl"

CATEGORIES = {"everyday", "instruction", "reasoning", "writing", "knowledge", "advice", "explanation", "coding"}
MIN_PROMPTS, MIN_PER_CATEGORY, MIN_QUESTIONS = 200, 20, 100
MAX_PROMPT_CHARS = 200
# two prompts sharing this share of their words are one prompt said twice
NEAR_DUPLICATE_JACCARD = 0.8


def _rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{path.name}:{number}: blank line"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            pytest.fail(f"{path.name}:{number}: not JSON: {e}")
        assert isinstance(row, dict), f"{path.name}:{number}: not a JSON object"
        rows.append(row)
    return rows


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return _rows(PROMPTS)


@pytest.fixture(scope="module")
def probe() -> list[dict]:
    return _rows(PROBE)


def _assert_consecutive_ids(rows: list[dict], prefix: str) -> None:
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == len(ids), "duplicate ids"
    assert ids == [f"{prefix}{i:03d}" for i in range(1, len(rows) + 1)], "ids are not consecutive from 001"


# ---- general prompts ----

def test_prompt_count(prompts):
    assert len(prompts) >= MIN_PROMPTS


def test_prompt_rows_have_exactly_the_keys(prompts):
    for row in prompts:
        assert set(row) == {"id", "category", "prompt"}, row
        assert all(isinstance(row[k], str) for k in row), row
        assert row["category"] in CATEGORIES, row
        assert row["prompt"].strip() == row["prompt"] and row["prompt"], row
        assert len(row["prompt"]) < MAX_PROMPT_CHARS, row


def test_prompt_ids_unique_and_consecutive(prompts):
    _assert_consecutive_ids(prompts, "g")


def _assert_unique(rows, field):
    seen: dict[str, str] = {}
    for row in rows:
        key = _norm(row[field])
        assert key not in seen, f"{row['id']} repeats {seen[key]}: {row[field]!r}"
        seen[key] = row["id"]


def test_prompts_unique(prompts):
    _assert_unique(prompts, "prompt")


def test_no_near_duplicate_prompts(prompts):
    words = [(row["id"], _words(row["prompt"])) for row in prompts]
    for (id_a, a), (id_b, b) in itertools.combinations(words, 2):
        overlap = len(a & b) / len(a | b)
        assert overlap < NEAR_DUPLICATE_JACCARD, f"{id_a} and {id_b} are near-duplicates ({overlap:.2f})"


def test_every_category_is_balanced(prompts):
    counts = {category: 0 for category in CATEGORIES}
    for row in prompts:
        counts[row["category"]] += 1
    assert min(counts.values()) >= MIN_PER_CATEGORY, counts


# ---- replay prompts (training data: never the prompts forgetting is measured on) ----

# above this word overlap a replay prompt would be an evaluation prompt reworded
REPLAY_OVERLAP_JACCARD = 0.55


@pytest.fixture(scope="module")
def replay() -> list[dict]:
    return _rows(REPLAY)


def test_replay_rows_are_well_formed(replay):
    assert len(replay) == 128
    _assert_consecutive_ids(replay, "r")
    _assert_unique(replay, "prompt")
    for row in replay:
        assert set(row) == {"id", "category", "prompt"} and row["category"] in CATEGORIES, row


def test_replay_prompts_are_not_the_evaluation_prompts(replay, prompts, probe):
    held = [_words(r["prompt"]) for r in prompts] + [_words(q["question"]) for q in probe]
    for row in replay:
        mine = _words(row["prompt"])
        worst = max(len(mine & h) / len(mine | h) for h in held)
        assert worst <= REPLAY_OVERLAP_JACCARD, f"{row['id']} rewords an evaluation prompt ({worst:.2f})"


# ---- knowledge probe ----

def test_question_count(probe):
    assert len(probe) >= MIN_QUESTIONS


def test_probe_rows_have_exactly_the_keys(probe):
    for row in probe:
        assert set(row) == {"id", "question", "answers"}, row
        assert isinstance(row["id"], str) and isinstance(row["question"], str), row
        assert row["question"].strip() == row["question"] and row["question"], row
        assert isinstance(row["answers"], list) and row["answers"], row
        for answer in row["answers"]:
            assert isinstance(answer, str) and answer.strip() == answer and answer, row
        assert len({_norm(a) for a in row["answers"]}) == len(row["answers"]), f"repeated answer: {row}"


def test_probe_ids_unique_and_consecutive(probe):
    _assert_consecutive_ids(probe, "k")


def test_questions_unique(probe):
    _assert_unique(probe, "question")


def test_no_answer_leaks_from_its_question(probe):
    leaks = [f"{row['id']}: {answer!r}" for row in probe for answer in row["answers"]
             if answer.lower() in row["question"].lower()]
    assert not leaks, f"answers written out in their own question: {leaks}"


# ---- shipped with the package ----

def test_pyproject_ships_the_reference_files():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert PACKAGE_GLOB in text
    if sys.version_info >= (3, 11):
        import tomllib

        build = tomllib.loads(text)["tool"]["hatch"]["build"]
        assert PACKAGE_GLOB in build.get("artifacts", []), "the glob must sit in [tool.hatch.build] artifacts"
    for path in (PROMPTS, PROBE, REPLAY):
        assert path.match(PACKAGE_GLOB), path


@pytest.mark.parametrize("name", ["general_prompts.jsonl", "knowledge_probe.jsonl", "replay_prompts.jsonl"])
def test_reference_files_are_package_resources(name):
    resource = resources.files("desktune.scoring") / "reference" / name
    assert resource.is_file()
    assert resource.read_text(encoding="utf-8").strip()
