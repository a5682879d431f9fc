"""Regenerate src/desktune/scoring/reference/human_heldout.jsonl from the `chitchat-dataset==0.9.0` wheel (MIT).

The excerpt: 60 conversations written by people (two strangers chatting; the first speaker is the user), four
turns each (user, assistant, user, assistant) taken after the opening greeting exchange, short enough that
scoring them takes seconds on a 135M model on a CPU. `desktune eval` and the live forgetting watch score the
mean loss of the assistant turns, base vs tuned: human-written text of a kind replay never trains on.

Deterministic: the conversations are parsed as the benchmarks parse them (benchmarks/recipe_common.py), put in
the seed-0 order the benchmarks draw from (vs_standard_recipe.py, cpu_attention.py, gpu_qlora.py walk it from
the front), and taken from its far end; the first BENCH_HEAD positions are never used. A window holding a link,
an e-mail address, a long number, a blocked word, or any text found in the demo data, the teaching benchmark or
the built-in reference sets is skipped.

    .venv/bin/pip install -e ".[bench]"   # chitchat-dataset
    .venv/bin/python scripts/make_human_heldout.py [--check]

--check compares the regenerated file with the shipped one (exit 1 when they differ) instead of writing it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

OUT = ROOT / "src" / "desktune" / "scoring" / "reference" / "human_heldout.jsonl"
VERSION = "0.9.0"  # the excerpt is of this release; another may order or word things differently
SEED = 0  # the benchmarks' draw order (their --seed default)
BENCH_HEAD = 1500  # positions of that order the benchmarks may train on (gpu_qlora's default takes ~420)
COUNT = 60  # conversations shipped: about 7k tokens, a few seconds of scoring on a quiet CPU
START, TURNS = 2, 4  # skip the greeting exchange; then user, assistant, user, assistant
TURN_CHARS = (2, 240)  # each turn's length in characters
WINDOW_CHARS = (120, 480)  # the four turns together
ASSISTANT_CHARS = 60  # the scored (assistant) text of a window, at least
BLOCKED = re.compile(r"https?:|www\.|@|\d{7,}|\b(fuck\w*|shit\w*|bitch\w*|cunt\w*|dick\w*|porn\w*|sex\w*|nigg\w*|"
                     r"fag\w*|rape\w*|kill yourself)\b", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def _known_texts() -> set[str]:
    """Every message and prompt of the demo data, the teaching benchmark and the built-in reference sets."""
    from teaches import facts_task, persona_task

    texts: set[str] = set()
    for task in (facts_task, persona_task):
        rows, held = task()
        texts |= {_norm(m["content"]) for r in rows for m in r["messages"]} | {_norm(q) for q, _ in held}
    for path in [*(ROOT / "examples").rglob("*.jsonl"), *OUT.parent.glob("*.jsonl")]:
        if path == OUT:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            texts |= {_norm(m["content"]) for m in row.get("messages", [])}
            texts |= {_norm(row[k]) for k in ("prompt", "question") if k in row}
    texts |= {_norm(p) for p in (ROOT / "examples" / "demo" / "prompts.txt").read_text(encoding="utf-8").splitlines()}
    return texts - {""}


def _window(conv: list[dict[str, str]], known: set[str]) -> list[dict[str, str]] | None:
    """The four turns shipped from one conversation, or None when it has no acceptable window."""
    window = conv[START:START + TURNS]
    if len(window) < TURNS or window[0]["role"] != "user":
        return None
    lengths = [len(m["content"]) for m in window]
    if not all(TURN_CHARS[0] <= n <= TURN_CHARS[1] for n in lengths) or \
            not WINDOW_CHARS[0] <= sum(lengths) <= WINDOW_CHARS[1]:
        return None
    if sum(len(m["content"]) for m in window if m["role"] == "assistant") < ASSISTANT_CHARS:
        return None
    if any(BLOCKED.search(m["content"]) or _norm(m["content"]) in known for m in window):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in window]


def excerpt() -> list[dict]:
    """The rows of human_heldout.jsonl."""
    from recipe_common import chitchat_conversations

    if metadata.version("chitchat-dataset") != VERSION:
        raise SystemExit(f"needs chitchat-dataset=={VERSION} (pip install chitchat-dataset=={VERSION})")
    pool = chitchat_conversations()
    order = list(range(len(pool)))
    random.Random(SEED).shuffle(order)  # the benchmarks' order (recipe_common.select_conversations)
    head = {json.dumps(pool[i]) for i in order[:BENCH_HEAD]}
    known, rows, seen = _known_texts(), [], set()
    for i in reversed(order[BENCH_HEAD:]):
        window = _window(pool[i], known)
        key = json.dumps(window)
        if window is None or key in seen or json.dumps(pool[i]) in head:
            continue
        seen.add(key)
        rows.append({"id": f"h{len(rows) + 1:03d}", "messages": window})
        if len(rows) == COUNT:
            return rows
    raise SystemExit(f"only {len(rows)} acceptable windows")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    args = ap.parse_args(argv)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in excerpt())
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT.relative_to(ROOT)}: {'identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {COUNT} conversations, {len(text)} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
