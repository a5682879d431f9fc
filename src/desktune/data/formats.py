"""Raw rows -> Samples: one converter per data format, and detection of the format from the keys."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from desktune.data.sources import BadRows, RawRow, bad_row, kind_of
from desktune.errors import DesktuneError

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
EXPECTED_KEYS = {
    "alpaca": "instruction, output (optional: input, system)",
    "messages": "messages (or conversations) = [{role, content}, ...]",
    "sharegpt": "conversations = [{from, value}, ...]",
    "prompt_completion": "prompt, completion",
    "text": "text",
}
# field names people often use instead of the ones a format expects (for "rename X to Y" hints)
_SYNONYMS = {
    "instruction": ("question", "query", "prompt", "input"),
    "output": ("response", "answer", "completion", "target", "reply"),
    "prompt": ("question", "query", "instruction", "input"),
    "completion": ("response", "answer", "output", "target", "reply"),
    "text": ("content", "body", "document", "sentence"),
    "messages": ("conversation", "chat", "dialog", "dialogue", "turns"),
}
_NEEDED = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
           "messages": ("messages",), "text": ("text",)}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
_DETECT_ROWS = 5
# OpenAI-style tool use, which no converter renders: refused rather than dropped
_TOOL_KEYS = ("tool_calls", "function_call")
_TOOL_ROLES = {"tool", "function", "ipython", "observation", "function_call"}
_TOOLS_FIX = ("remove the tool calls (and 'tool' turns) from the data, or write each call into the assistant's "
              "'content' as the exact text the model should produce")


@dataclass(frozen=True)
class Sample:
    """A converted row: a chat (`messages`) or plain text (`text`), and where it came from."""

    messages: list[dict[str, str]] | None
    text: str | None
    source: str


def formats_help() -> str:
    """One line listing every format and the keys it expects."""
    return "; ".join(f"{name}: {keys}" for name, keys in EXPECTED_KEYS.items())


# ---------------------------------------------------------------- detection


def _detect_row(data: Any) -> str | None:
    """The format a single row looks like, or None."""
    if not isinstance(data, dict):
        return None
    if "messages" in data:
        return "messages"
    if "conversations" in data:
        turns = _maybe_json(data["conversations"])
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and "role" in first and "from" not in first:
            return "messages"
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    return None


def detect_format(rows: Sequence[RawRow]) -> str:
    """Detect the format from the keys of the first rows; raise DesktuneError when none fits."""
    for row in rows[:_DETECT_ROWS]:
        fmt = _detect_row(row.data)
        if fmt is not None:
            return fmt
    if not rows:
        raise DesktuneError("no rows to detect the data format from", fix="add training samples")
    first = rows[0]
    keys = _keys(first.data) if isinstance(first.data, dict) else kind_of(first.data)
    near = _near_miss(first.data)
    if near is not None:  # e.g. a CSV with an instruction column but no output column
        fmt, missing = near
        names = " and ".join(repr(m) for m in missing)
        renames = _renames(first.data, missing)
        raise DesktuneError(
            f"cannot detect the data format from the keys ({keys}): format '{fmt}' also needs {names}",
            where=first.source,
            fix=(f"rename {' and '.join(renames)}, or " if renames else "")
            + f"add the {names} field (a column in CSV), or rename the fields to one of the formats "
            f"({formats_help()}), or set data.format",
        )
    hint = _rename_hint(first.data)
    raise DesktuneError(
        f"cannot detect the data format from the keys ({keys})",
        where=first.source,
        fix=(f"{hint}; or " if hint else "") + f"rename the fields to one of the formats ({formats_help()}), "
        "or set data.format",
    )


def _near_miss(data: Any) -> tuple[str, list[str]] | None:
    """A two-key format of which the row has one key: (format, missing keys)."""
    if not isinstance(data, dict):
        return None
    for fmt, needed in (("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion"))):
        missing = [k for k in needed if k not in data]
        if len(missing) < len(needed):
            return fmt, missing
    return None


# ---------------------------------------------------------------- helpers


def _keys(data: dict[str, Any]) -> str:
    shown = ", ".join(str(k) for k in list(data)[:8]) + (", ..." if len(data) > 8 else "")
    return shown or "no keys"


def _renames(data: dict[str, Any], missing: Sequence[str]) -> list[str] | None:
    """"'response' to 'output'" for each missing field that a synonym present in the row can fill, else None."""
    used: set[str] = set()
    out = []
    for m in missing:
        found = next((k for k in _SYNONYMS.get(m, ()) if k in data and k not in used), None)
        if found is None:
            return None
        used.add(found)
        out.append(f"'{found}' to '{m}'")
    return out


def _rename_hint(data: Any) -> str | None:
    """A format the row becomes by renaming some fields: "rename 'question' to 'instruction' ... (format alpaca)"."""
    if not isinstance(data, dict):
        return None
    for fmt, needed in _NEEDED.items():
        renames = _renames(data, [n for n in needed if n not in data])
        if renames:
            return f"rename {' and '.join(renames)} (format '{fmt}')"
    return None


def _maybe_json(value: Any) -> Any:
    """A list given as a JSON string (CSV cells) is parsed; anything else is returned as is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def _require(row: RawRow, fmt: str, *names: str) -> None:
    """Raise when fields the format needs are missing."""
    if not isinstance(row.data, dict):
        raise DesktuneError(
            f"row is a {kind_of(row.data)}, not an object", where=row.source, fix=formats_help()
        )
    missing = [n for n in names if n not in row.data]
    if missing:
        renames = _renames(row.data, missing)
        hint = f"rename {' and '.join(renames)}; " if renames else ""
        raise DesktuneError(
            f"missing field {', '.join(repr(m) for m in missing)} for format '{fmt}'"
            f" (row has: {_keys(row.data)})",
            where=row.source,
            fix=f"{hint}'{fmt}' rows need {EXPECTED_KEYS[fmt]}; or set data.format to one of: {formats_help()}",
        )


def _text(value: Any, what: str, where: str, *, optional: bool = False) -> str:
    """A non-empty string field (optional fields may be missing/null/empty and return '')."""
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DesktuneError(
            f"{what} is {kind_of(value)}, expected a string", where=where, fix="make it a text value"
        )
    if not value.strip() and not optional:
        raise DesktuneError(f"{what} is empty", where=where, fix="fill it in or remove the row")
    return value


def _chat(user: str, assistant: str, system: str = "") -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------- converters


def _alpaca(row: RawRow) -> Sample:
    _require(row, "alpaca", "instruction", "output")
    d, w = row.data, row.source
    instruction = _text(d["instruction"], "field 'instruction'", w)
    extra = _text(d.get("input"), "field 'input'", w, optional=True)
    output = _text(d["output"], "field 'output'", w)
    system = _text(d.get("system"), "field 'system'", w, optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Sample(_chat(user, output, system), None, w)


def _prompt_completion(row: RawRow) -> Sample:
    _require(row, "prompt_completion", "prompt", "completion")
    d, w = row.data, row.source
    prompt = _text(d["prompt"], "field 'prompt'", w)
    return Sample(_chat(prompt, _text(d["completion"], "field 'completion'", w)), None, w)


def _text_row(row: RawRow) -> Sample:
    _require(row, "text", "text")
    return Sample(None, _text(row.data["text"], "field 'text'", row.source), row.source)


def _conversation(row: RawRow, fmt: str, keys: tuple[str, str]) -> Sample:
    """messages/sharegpt: turns with role/content or from/value (both are accepted)."""
    key = next((k for k in keys if k in row.data), keys[0]) if isinstance(row.data, dict) else keys[0]
    _require(row, fmt, key)
    turns = _maybe_json(row.data[key])
    w = row.source
    if not isinstance(turns, list) or not turns:
        what = "an empty list" if turns == [] else f"a {kind_of(turns)}"
        raise DesktuneError(
            f"field '{key}' is {what}, expected a list of turns", where=w, fix=EXPECTED_KEYS[fmt]
        )
    messages = [_turn(t, i, w) for i, t in enumerate(turns, start=1)]
    _check_order(messages, w)
    return Sample(messages, None, w)


def _turn(turn: Any, i: int, where: str) -> dict[str, str]:
    """One {role, content} (or {from, value}) turn, normalised to {role, content}."""
    if not isinstance(turn, dict):
        raise DesktuneError(
            f"message {i} is a {kind_of(turn)}, not an object",
            where=where,
            fix='write each turn as {"role": ..., "content": ...} or {"from": ..., "value": ...}',
        )
    role = turn.get("role", turn.get("from"))
    calls = next((k for k in _TOOL_KEYS if turn.get(k)), None)
    if calls is not None:  # dropping them would train the text around a call the model never sees
        raise DesktuneError(f"message {i} has '{calls}': desktune does not train on tool calls, and leaving "
                            "them out would teach the reply without the call", where=where, fix=_TOOLS_FIX)
    if "content" in turn:
        content = turn["content"]
    elif "value" in turn:
        content = turn["value"]
    else:
        raise DesktuneError(
            f"message {i} has no 'content' (or 'value') (keys: {_keys(turn)})",
            where=where,
            fix="give each turn a role and its text",
        )
    if not isinstance(role, str) or role.strip().lower() not in ROLES:
        shown = repr(role) if isinstance(role, str) else kind_of(role)
        tool = isinstance(role, str) and role.strip().lower() in _TOOL_ROLES
        raise DesktuneError(
            f"message {i} has unknown role {shown}" + (" (a tool's result: tool use is not trained)" if tool else ""),
            where=where,
            fix=_TOOLS_FIX if tool else "roles are system, user, assistant (sharegpt: system, human, gpt)",
        )
    text = _text(content, f"content of message {i}", where)
    return {"role": ROLES[role.strip().lower()], "content": text}


def _check_order(messages: list[dict[str, str]], where: str) -> None:
    """Optional system first, then user/assistant alternating from a user turn, with an assistant turn."""
    fix = "order turns as: optional system, then user, assistant, user, assistant, ..."
    for i, m in enumerate(messages, start=1):
        if m["role"] == "system" and i != 1:
            raise DesktuneError(f"message {i}: a system turn is only allowed first", where=where, fix=fix)
    body = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(body)
    if not body:
        raise DesktuneError("the conversation has only a system turn", where=where, fix=fix)
    if body[0]["role"] != "user":
        raise DesktuneError(
            f"message {offset + 1}: the conversation must start with a user turn (after an optional system)",
            where=where,
            fix=fix,
        )
    for i in range(1, len(body)):
        if body[i]["role"] == body[i - 1]["role"]:
            raise DesktuneError(
                f"message {offset + i + 1}: two '{body[i]['role']}' turns in a row",
                where=where,
                fix="merge consecutive turns of the same role; user and assistant turns must alternate",
            )
    if not any(m["role"] == "assistant" for m in body):
        raise DesktuneError(
            "the conversation has no assistant turn",
            where=where,
            fix="add the assistant's reply; the loss is computed on assistant turns",
        )


_CONVERTERS: dict[str, Callable[[RawRow], Sample]] = {
    "alpaca": _alpaca,
    "messages": lambda row: _conversation(row, "messages", ("messages", "conversations")),
    "sharegpt": lambda row: _conversation(row, "sharegpt", ("conversations", "messages")),
    "prompt_completion": _prompt_completion,
    "text": _text_row,
}


def to_sample(row: RawRow, fmt: str) -> Sample:
    """Convert one row in format `fmt` ('auto' detects it from this row); raise DesktuneError on bad rows."""
    if fmt == "auto":
        fmt = detect_format([row])
    if fmt not in _CONVERTERS:
        raise DesktuneError(f"unknown data format '{fmt}'", fix=f"use one of: auto, {', '.join(FORMATS)}")
    return _CONVERTERS[fmt](row)


def convert_rows(rows: Sequence[RawRow], fmt: str = "auto", bad: BadRows | None = None) -> tuple[str, list[Sample]]:
    """Convert every row; `fmt='auto'` detects the format from the first rows. Returns (format, samples); a row
    that does not convert goes to `bad` when given (skipped or raised, as data.bad_rows says)."""
    if fmt == "auto":
        fmt = detect_format(rows)
    samples = []
    for row in rows:
        try:
            samples.append(to_sample(row, fmt))
        except DesktuneError as e:
            bad_row(bad, e)
    return fmt, samples
