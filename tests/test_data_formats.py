"""Raw rows -> samples: each format, auto-detection, bad rows, and a property test on arbitrary rows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desktune.data import FORMATS, RawRow, Sample, convert_rows, detect_format, encode_sample, to_sample
from desktune.errors import DesktuneError
from tests.tiny import make_tokenizer


def _row(data: Any, source: str = "d.jsonl:7") -> RawRow:
    return RawRow(data, source)


def _chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def _error(data: Any, fmt: str = "auto") -> DesktuneError:
    with pytest.raises(DesktuneError) as info:
        to_sample(_row(data), fmt)
    assert info.value.where == "d.jsonl:7"
    assert info.value.fix
    return info.value


# ---------------------------------------------------------------- each format


def test_alpaca_with_input_and_system() -> None:
    s = to_sample(_row({"instruction": "add", "input": "1 2", "output": "3", "system": "be brief"}), "alpaca")
    assert s == Sample(
        _chat(("system", "be brief"), ("user", "add\n\n1 2"), ("assistant", "3")), None, "d.jsonl:7"
    )


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "  "}, {"input": None}])
def test_alpaca_without_input(extra: dict[str, Any]) -> None:
    s = to_sample(_row({"instruction": "say hi", "output": "hi", **extra}), "alpaca")
    assert s.messages == _chat(("user", "say hi"), ("assistant", "hi"))


def test_messages() -> None:
    msgs = _chat(("system", "sys"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    assert to_sample(_row({"messages": msgs}), "messages").messages == msgs


def test_messages_under_conversations_key() -> None:
    msgs = _chat(("user", "q"), ("assistant", "a"))
    assert to_sample(_row({"conversations": msgs}), "messages").messages == msgs


def test_messages_as_json_string_from_csv() -> None:
    msgs = _chat(("user", "q"), ("assistant", "a"))
    assert to_sample(_row({"messages": json.dumps(msgs)}), "auto").messages == msgs


@pytest.mark.parametrize(("user", "bot"), [("human", "gpt"), ("user", "assistant"), ("Human", "GPT")])
def test_sharegpt(user: str, bot: str) -> None:
    conv = [{"from": "system", "value": "s"}, {"from": user, "value": "q"}, {"from": bot, "value": "a"}]
    s = to_sample(_row({"conversations": conv}), "sharegpt")
    assert s.messages == _chat(("system", "s"), ("user", "q"), ("assistant", "a"))


def test_prompt_completion() -> None:
    s = to_sample(_row({"prompt": "2+2=", "completion": "4"}), "prompt_completion")
    assert s.messages == _chat(("user", "2+2="), ("assistant", "4"))


def test_text() -> None:
    assert to_sample(_row({"text": "plain text", "id": 3}), "text") == Sample(None, "plain text", "d.jsonl:7")


def test_trailing_user_turn_is_allowed() -> None:
    msgs = _chat(("user", "q"), ("assistant", "a"), ("user", "thanks"))
    assert to_sample(_row({"messages": msgs}), "messages").messages == msgs


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"messages": _chat(("user", "q"), ("assistant", "a"))}, "messages"),
        ({"conversations": _chat(("user", "q"), ("assistant", "a"))}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"text": "t"}, "text"),
    ],
)
def test_detect_format(data: dict[str, Any], fmt: str) -> None:
    assert detect_format([_row(data)]) == fmt


def test_detect_uses_first_recognisable_row() -> None:
    rows = [_row({"junk": 1}), _row({"prompt": "p", "completion": "c"})]
    assert detect_format(rows) == "prompt_completion"


def test_detect_failure_names_keys_and_formats() -> None:
    with pytest.raises(DesktuneError) as info:
        detect_format([_row({"question": "q", "answer": "a"})])
    err = info.value
    assert err.where == "d.jsonl:7" and "question, answer" in str(err)
    assert all(f in (err.fix or "") for f in FORMATS) and "data.format" in (err.fix or "")


def test_format_override_beats_detection() -> None:
    rows = [_row({"text": "t", "prompt": "p", "completion": "c"})]
    assert convert_rows(rows, "auto")[0] == "prompt_completion"
    fmt, samples = convert_rows(rows, "text")
    assert fmt == "text" and samples[0].text == "t"


# ---------------------------------------------------------------- bad rows


def test_missing_fields_are_named_with_expected_keys() -> None:
    err = _error({"instruction": "i", "response": "r"}, "alpaca")
    assert "'output'" in str(err) and "alpaca" in str(err) and "instruction, response" in str(err)
    assert "instruction, output" in (err.fix or "") and "prompt, completion" in (err.fix or "")


def test_missing_column_in_later_row() -> None:
    rows = [_row({"prompt": "p", "completion": "c"}, "d.csv:row 1"), _row({"prompt": "p"}, "d.csv:row 2")]
    with pytest.raises(DesktuneError) as info:
        convert_rows(rows)
    assert info.value.where == "d.csv:row 2" and "'completion'" in str(info.value)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ({"instruction": "", "output": "o"}, "'instruction' is empty"),
        ({"instruction": "i", "output": "   \n"}, "'output' is empty"),
        ({"prompt": "p", "completion": 4}, "'completion' is number, expected a string"),
        ({"text": None}, "'text' is null"),
        ({"messages": _chat(("user", "q"), ("assistant", " "))}, "content of message 2 is empty"),
        ({"messages": [{"role": "user", "content": ["q"]}]}, "content of message 1 is list"),
        ({"messages": _chat(("user", "q"), ("tool", "a"))}, "unknown role 'tool'"),
        ({"messages": [{"role": 3, "content": "q"}]}, "unknown role number"),
        ({"messages": [{"role": "user", "text": "q"}]}, "no 'content'"),
        ({"messages": ["hi"]}, "message 1 is a string"),
        ({"messages": []}, "empty list"),
        ({"messages": {"role": "user"}}, "is a object"),
        ({"messages": _chat(("assistant", "a"), ("user", "q"))}, "must start with a user turn"),
        ({"messages": _chat(("user", "q"), ("user", "q2"), ("assistant", "a"))}, "two 'user' turns in a row"),
        ({"messages": _chat(("user", "q"), ("system", "s"), ("assistant", "a"))}, "only allowed first"),
        ({"messages": _chat(("user", "q"))}, "no assistant turn"),
        ({"messages": _chat(("system", "s"))}, "only a system turn"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
    ],
)
def test_bad_rows(data: dict[str, Any], said: str) -> None:
    assert said in str(_error(data))


def test_not_an_object() -> None:
    assert "not an object" in str(_error(["a", "b"], "text"))


# ---------------------------------------------------------------- property: never an unexpected exception

_KEYS = st.sampled_from(
    [
        "instruction",
        "input",
        "output",
        "system",
        "messages",
        "conversations",
        "prompt",
        "completion",
        "text",
        "role",
        "content",
        "from",
        "value",
        "x",
    ]
)
_ROLES = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", "", "USER"])
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12), _ROLES
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)
_TURN = st.fixed_dictionaries(
    {}, optional={"role": _ROLES, "from": _ROLES, "content": _VALUES, "value": _VALUES, "x": _VALUES}
)
_GOOD_TURN = st.fixed_dictionaries({"role": _ROLES, "content": st.text(max_size=8)})
_CONV = st.builds(
    lambda texts, system: {
        "messages": ([{"role": "system", "content": system}] if system is not None else [])
        + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]
    },
    st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=5),
    st.one_of(st.none(), st.text(max_size=5)),
)
_FLAT = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "system", "prompt", "completion", "text"]),
    st.one_of(st.text(min_size=1, max_size=10), st.none(), st.integers()),
    max_size=5,
)
_ROWS = st.one_of(
    _CONV,
    _FLAT,
    st.dictionaries(_KEYS, _VALUES, max_size=5),
    st.builds(
        lambda k, t: {k: t}, st.sampled_from(["messages", "conversations"]), st.lists(_TURN, max_size=5)
    ),
    st.builds(lambda t: {"messages": json.dumps(t)}, st.lists(_TURN, max_size=4)),
    st.builds(lambda t: {"messages": t}, st.lists(_GOOD_TURN, min_size=1, max_size=5)),
    _VALUES,
)
_TOKENIZER = make_tokenizer()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_ROWS, fmt=st.sampled_from(["auto", "auto", "auto", *FORMATS]))
def test_arbitrary_rows_convert_or_raise_desktune_error(data: Any, fmt: str) -> None:
    try:
        sample = to_sample(_row(data), fmt)
    except DesktuneError as e:
        assert e.where == "d.jsonl:7" and e.fix
        return
    assert (sample.messages is None) != (sample.text is None)
    if sample.messages is not None:
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in sample.messages)
        assert any(m["role"] == "assistant" for m in sample.messages)
    example, _ = encode_sample(_TOKENIZER, sample, max_seq_len=64)
    assert len(example.input_ids) == len(example.labels) <= 64


# ---------------------------------------------------------------- data.bad_rows


def test_convert_rows_skips_bad_rows_into_bad_and_keeps_the_rest() -> None:
    from desktune.data.sources import BadRows

    rows = [_row(d, f"d.csv:row {n}") for n, d in enumerate([{"prompt": "p", "completion": "c"}, {"prompt": "p"},
                                                             {"prompt": "", "completion": "c"},
                                                             {"prompt": "q", "completion": "d"}], start=1)]
    bad = BadRows(skip=True)
    fmt, samples = convert_rows(rows, "auto", bad)
    assert fmt == "prompt_completion" and [s.source for s in samples] == ["d.csv:row 1", "d.csv:row 4"]
    assert [e.where for e in bad.errors] == ["d.csv:row 2", "d.csv:row 3"]
    assert "d.csv:row 3: field 'prompt' is empty" in (bad.note() or "")
    with pytest.raises(DesktuneError) as info:
        convert_rows(rows, "auto", BadRows(skip=False))
    assert info.value.where == "d.csv:row 2" and (info.value.fix or "").endswith("-o data.bad_rows=skip")
