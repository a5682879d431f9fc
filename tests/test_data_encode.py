"""Messages -> ids + labels under several chat templates, templates themselves, and build_datasets."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desktune.config import DataConfig
from desktune.data import (
    BUILTIN_TEMPLATES,
    FALLBACK_NOTICE,
    IGNORE_INDEX,
    Example,
    Sample,
    build_datasets,
    encode_prompt,
    encode_sample,
    encode_samples,
    resolve_chat_template,
)
from desktune.errors import DesktuneError
from tests.tiny import make_tokenizer

CHAT = [
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thank you"},
]
IM_END = "<|im_end|>"


@pytest.fixture
def tok() -> Any:
    """A fresh tiny tokenizer per test: templates are set on it."""
    return make_tokenizer()


def _sample(messages: list[dict[str, str]] = CHAT) -> Sample:
    return Sample(messages, None, "d.jsonl:1")


def _labelled(tok: Any, ex: Example) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs: list[list[int]] = []
    prev = False
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        on = label != IGNORE_INDEX
        if on:
            assert label == token
            if not prev:
                runs.append([])
            runs[-1].append(token)
        prev = on
    return [tok.decode(r) for r in runs]


def _encode(tok: Any, sample: Sample | None = None, **kw: Any) -> Example:
    ex, _ = encode_sample(tok, sample or _sample(), max_seq_len=kw.pop("max_seq_len", 512), **kw)
    return ex


# ---------------------------------------------------------------- masking


def test_chatml_labels_exactly_assistant_content_and_im_end(tok: Any) -> None:
    ex = _encode(tok)
    assert _labelled(tok, ex) == ["hello" + IM_END, "fine thank you" + IM_END]
    assert tok.decode(ex.input_ids).endswith(IM_END + "\n")
    assert ex.labels[-1] == IGNORE_INDEX  # the template's trailing newline is not trained
    assert ex.labels.count(tok.eos_token_id) == 2


def test_llama3_template_labels_turn_ends_and_appends_eos(tok: Any) -> None:
    resolve_chat_template(tok, "llama3")
    ex = _encode(tok)
    text = tok.decode(ex.input_ids)
    assert text.startswith(tok.bos_token + "<|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>")
    # this tokenizer's eos is not in the llama3 template: it is added after the last reply and trained
    assert _labelled(tok, ex) == ["hello<|eot_id|>", "fine thank you<|eot_id|>" + IM_END]
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id


def test_zephyr_template(tok: Any) -> None:
    resolve_chat_template(tok, "zephyr")
    ex = _encode(tok, _sample([{"role": "system", "content": "be kind"}, *CHAT]))
    assert tok.decode(ex.input_ids).startswith(f"<|system|>\nbe kind{IM_END}\n<|user|>\nhi there{IM_END}\n")
    assert _labelled(tok, ex) == ["hello" + IM_END, "fine thank you" + IM_END]


def test_mistral_template_puts_system_into_first_user_turn(tok: Any) -> None:
    resolve_chat_template(tok, "mistral")
    ex = _encode(tok, _sample([{"role": "system", "content": "be kind"}, *CHAT]))
    expected = f"{tok.bos_token}[INST] be kind\n\nhi there [/INST]hello{IM_END}[INST] how are you [/INST]"
    assert tok.decode(ex.input_ids).startswith(expected)
    assert _labelled(tok, ex) == ["hello" + IM_END, "fine thank you" + IM_END]


def test_template_without_eos_gets_eos_after_last_reply(tok: Any) -> None:
    resolve_chat_template(
        tok,
        "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:\\n{% endif %}",
    )
    msgs = [*CHAT, {"role": "user", "content": "bye"}]
    ex = _encode(tok, _sample(msgs))
    assert _labelled(tok, ex) == ["hello", "fine thank you" + IM_END]
    assert tok.decode(ex.input_ids).endswith(f"fine thank you{IM_END}\nuser:\nbye\n")


def test_template_that_is_not_prefix_stable_falls_back_to_content(tok: Any) -> None:
    # the generation prompt differs from how past assistant turns are rendered
    resolve_chat_template(
        tok,
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}" + IM_END + "{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}",
    )
    assert _labelled(tok, _encode(tok)) == ["hello" + IM_END, "fine thank you" + IM_END]


def test_text_sample_is_all_labelled_with_eos(tok: Any) -> None:
    ex = _encode(tok, Sample(None, "the quick brown fox", "d.jsonl:1"))
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == "the quick brown fox" + IM_END


def test_train_on_all_labels_every_token(tok: Any) -> None:
    ex = _encode(tok, train_on="all")
    assert ex.labels == ex.input_ids
    assert ex.input_ids == _encode(tok).input_ids


def test_system_prompt_added_only_when_missing(tok: Any) -> None:
    ex = _encode(tok, system_prompt="be kind")
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nbe kind" + IM_END)
    own = _sample([{"role": "system", "content": "mine"}, *CHAT])
    text = tok.decode(_encode(tok, own, system_prompt="be kind").input_ids)
    assert "be kind" not in text and "mine" in text


def test_encode_prompt_ends_with_generation_prompt(tok: Any) -> None:
    ids = encode_prompt(tok, CHAT[:1])
    assert tok.decode(ids) == "<|im_start|>user\nhi there" + IM_END + "\n<|im_start|>assistant\n"
    assert tok.decode(encode_prompt(tok, CHAT[:1], system_prompt="sys")).startswith("<|im_start|>system\nsys")


_TEXT = st.text(alphabet="abc xyz!?,.\u00e9\u4e16\n", min_size=1, max_size=20).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(_TEXT, min_size=2, max_size=6), template=st.sampled_from(["chatml", "zephyr", "mistral"])
)
def test_labelled_tokens_are_the_replies_for_any_conversation(texts: list[str], template: str) -> None:
    tok = make_tokenizer()
    resolve_chat_template(tok, template)
    msgs = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]
    ex = _encode(tok, _sample(msgs), max_seq_len=4096)
    replies = [m["content"] + IM_END for m in msgs if m["role"] == "assistant"]
    assert "".join(_labelled(tok, ex)) == "".join(replies)


# ---------------------------------------------------------------- truncation and dropping


def test_truncation_is_counted_and_untrainable_samples_dropped(tok: Any) -> None:
    short = _sample(CHAT[:2])
    long_prompt = _sample(
        [{"role": "user", "content": "the lazy dog " * 40}, {"role": "assistant", "content": "ok"}]
    )
    n_short = len(_encode(tok, short).input_ids)
    out = encode_samples(tok, [short, long_prompt], max_seq_len=n_short)
    assert (out.n_truncated, out.n_dropped) == (1, 1)
    assert [e.source for e in out.examples] == ["d.jsonl:1"] and len(out.examples[0].input_ids) == n_short
    cut = encode_samples(tok, [short], max_seq_len=n_short - 2)  # cuts the trailing newline and <|im_end|>
    assert cut.n_truncated == 1 and len(cut.examples[0].input_ids) == n_short - 2
    assert _labelled(tok, cut.examples[0]) == ["hello"]


def test_template_error_is_a_desktune_error(tok: Any) -> None:
    resolve_chat_template(tok, "{{ raise_exception('no system role') }}")
    with pytest.raises(DesktuneError) as info:
        _encode(tok)
    assert "no system role" in str(info.value) and info.value.where == "d.jsonl:1"


# ---------------------------------------------------------------- resolve_chat_template


def test_resolve_builtin_name(tok: Any) -> None:
    assert resolve_chat_template(tok, "Zephyr") == BUILTIN_TEMPLATES["zephyr"] == tok.chat_template


def test_resolve_keeps_tokenizer_template(tok: Any) -> None:
    own = tok.chat_template
    assert resolve_chat_template(tok, None) == own


def test_resolve_falls_back_to_chatml_with_notice(tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    tok.chat_template = None
    with caplog.at_level(logging.WARNING):
        assert resolve_chat_template(tok, None) == BUILTIN_TEMPLATES["chatml"]
    assert FALLBACK_NOTICE in caplog.text


def test_resolve_template_file(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(tok, str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] }}"


@pytest.mark.parametrize(
    ("value", "said"), [("vicuna", "unknown chat template"), ("{% for x %}", "invalid Jinja")]
)
def test_resolve_bad_template(tok: Any, value: str, said: str) -> None:
    with pytest.raises(DesktuneError) as info:
        resolve_chat_template(tok, value)
    assert said in str(info.value) and "chatml" in (info.value.fix or "")


# ---------------------------------------------------------------- build_datasets


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


ALPACA = [
    {"instruction": f"say {w}", "output": w} for w in ["hi", "bye", "yes", "no", "ok", "fox", "dog", "cat"]
]


def test_build_datasets_stats(tok: Any, tmp_path: Path) -> None:
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", ALPACA))
    train, val, stats = build_datasets(cfg, tok, seed=0)
    assert (stats.format, stats.n_train, stats.n_val, stats.n_truncated, stats.n_dropped) == (
        "alpaca",
        8,
        0,
        0,
        0,
    )
    assert val == [] and [e.source for e in train] == [f"{tmp_path / 't.jsonl'}:{i}" for i in range(1, 9)]
    assert stats.n_tokens == sum(len(e.input_ids) for e in train)
    assert stats.n_target_tokens == sum(e.n_target for e in train) > 8
    assert "8 train" in stats.summary()


def test_build_datasets_val_fraction_is_deterministic(tok: Any, tmp_path: Path) -> None:
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", ALPACA), val_fraction=0.01)
    train, val, stats = build_datasets(cfg, tok, seed=1)
    assert (len(train), len(val), stats.n_val) == (7, 1, 1)
    again = build_datasets(cfg, tok, seed=1)[1]
    assert [e.source for e in again] == [e.source for e in val]
    picks = {build_datasets(cfg, tok, seed=s)[1][0].source for s in range(8)}
    assert len(picks) > 1


def test_build_datasets_val_file_and_format_override(tok: Any, tmp_path: Path) -> None:
    cfg = DataConfig(
        train=_jsonl(tmp_path / "t.jsonl", [{"text": "the fox"}, {"text": "the dog"}]),
        val=_jsonl(tmp_path / "v.jsonl", [{"text": "a cat", "prompt": "p", "completion": "c"}]),
        format="text",
    )
    train, val, stats = build_datasets(cfg, tok, seed=0)
    assert (stats.format, len(train), len(val)) == ("text", 2, 1)
    assert val[0].labels == val[0].input_ids and tok.decode(val[0].input_ids) == "a cat" + IM_END


def test_build_datasets_all_dropped(tok: Any, tmp_path: Path) -> None:
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", ALPACA[:3]), max_seq_len=3)
    with pytest.raises(DesktuneError) as info:
        build_datasets(cfg, tok, seed=0)
    msg = str(info.value)
    assert "every label of all 3 training samples is masked" in msg and "max_seq_len" in (info.value.fix or "")
    assert all(f"t.jsonl:{n}" in msg for n in (1, 2, 3)), msg  # the rows are named


def test_build_datasets_counts_truncation(tok: Any, tmp_path: Path) -> None:
    rows = [*ALPACA[:2], {"instruction": "go", "output": "the quick brown fox " * 30}]
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", rows), max_seq_len=40)
    train, _, stats = build_datasets(cfg, tok, seed=0)
    assert (stats.n_train, stats.n_truncated, stats.n_dropped) == (3, 1, 0)
    assert max(len(e.input_ids) for e in train) == 40 == stats.max_len


def test_build_datasets_without_any_template_uses_chatml(tok: Any, tmp_path: Path) -> None:
    tok.chat_template = None
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", ALPACA[:2]))
    train, _, stats = build_datasets(cfg, tok, seed=0)
    assert FALLBACK_NOTICE in stats.notes and tok.chat_template == BUILTIN_TEMPLATES["chatml"]
    assert _labelled(tok, train[0]) == ["hi" + IM_END]


# ---------------------------------------------------------------- data.bad_rows, a last user turn, the auto split


def _lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_build_datasets_skips_bad_rows_with_a_note(tok: Any, tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in ALPACA[:4]]
    lines[1:1] = ["{broken", json.dumps({"instruction": "x"}), json.dumps({"instruction": "x", "output": " "})]
    train = _lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(DesktuneError) as info:
        build_datasets(DataConfig(train=train), tok, seed=0)
    assert info.value.where == f"{train}:2" and "-o data.bad_rows=skip" in (info.value.fix or "")
    got, _, stats = build_datasets(DataConfig(train=train, bad_rows="skip"), tok, seed=0)
    assert [e.source for e in got] == [f"{train}:{n}" for n in (1, 5, 6, 7)]
    assert stats.n_skipped == 3 and "3 bad rows skipped" in stats.summary()
    note = next(n for n in stats.notes if n.startswith("left out 3 bad row(s)"))
    assert f"{train}:2: invalid JSON" in note and f"{train}:3: missing field 'output'" in note
    assert f"{train}:4: field 'output' is empty" in note


def test_build_datasets_skip_with_no_row_left_is_an_error(tok: Any, tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "t.jsonl", ALPACA[:2])
    val = _lines(tmp_path / "v.jsonl", ["{x", json.dumps({"instruction": "x", "output": ""})])
    with pytest.raises(DesktuneError, match=r"all 2 rows are bad, none is left to use") as info:
        build_datasets(DataConfig(train=train, val=val, bad_rows="skip"), tok, seed=0)
    assert info.value.where == val


def test_build_datasets_skips_a_row_the_template_cannot_render(tok: Any, tmp_path: Path) -> None:
    tok.chat_template = ("{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no') }}"
                         "{% endif %}{{ m['content'] }}<|im_end|>{% endfor %}")
    rows = [*ALPACA[:3], {"instruction": "forbidden", "output": "x"}]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DesktuneError, match="the chat template failed") as info:
        build_datasets(DataConfig(train=train), tok, seed=0)
    assert info.value.where == f"{train}:4" and "-o data.bad_rows=skip" in (info.value.fix or "")
    got, _, stats = build_datasets(DataConfig(train=train, bad_rows="skip"), tok, seed=0)
    assert (len(got), stats.n_skipped) == (3, 1)


def test_conversations_ending_on_a_user_turn_are_counted(tok: Any, tmp_path: Path) -> None:
    user_last = {"messages": [*CHAT, {"role": "user", "content": "and you?"}]}
    rows = [{"messages": CHAT}, user_last, {"messages": CHAT}, user_last]
    train = _jsonl(tmp_path / "t.jsonl", rows)
    _, _, stats = build_datasets(DataConfig(train=train), tok, seed=0)
    assert stats.n_ends_on_user == 2
    note = next(n for n in stats.notes if "end on a user turn" in n)
    assert note.startswith("2 conversation(s) end on a user turn: nothing is trained on it") and \
        f"rows {train}:2, {train}:4" in note
    _, _, stats = build_datasets(DataConfig(train=_jsonl(tmp_path / "u.jsonl", rows[:1])), tok, seed=0)
    assert stats.n_ends_on_user == 0 and not any("user turn" in n for n in stats.notes)


def _many(tmp_path: Path, n: int) -> str:
    return _jsonl(tmp_path / f"t{n}.jsonl", [{"instruction": f"say {i}", "output": f"{i}"} for i in range(n)])


def test_auto_validation_split_is_said_and_resolved_and_repeats(tok: Any, tmp_path: Path) -> None:
    cfg = DataConfig(train=_many(tmp_path, 60))
    assert cfg.val_fraction == "auto"
    train, val, stats = build_datasets(cfg, tok, seed=3)
    assert (len(train), len(val), stats.val_fraction) == (52, 8, 8 / 60)
    assert any(n.startswith("data.val_fraction auto = 0.133: 8 of 60 samples held out") for n in stats.notes)
    resolved = stats.resolved(cfg)
    assert resolved.val_fraction == 8 / 60 and cfg.val_fraction == "auto"
    for again in (cfg, resolved):  # a resume (the same config, or the one the run recorded) splits the same
        assert [e.source for e in build_datasets(again, tok, seed=3)[1]] == [e.source for e in val]


def test_auto_validation_split_only_when_the_data_allows(tok: Any, tmp_path: Path) -> None:
    _, val, stats = build_datasets(DataConfig(train=_many(tmp_path, 39)), tok, seed=0)
    assert val == [] and stats.val_fraction == 0.0 and any("too few to hold some out" in n for n in stats.notes)
    _, val, stats = build_datasets(DataConfig(train=_many(tmp_path, 60), val_fraction=0), tok, seed=0)
    assert val == [] and not any("val_fraction" in n for n in stats.notes)
    cfg = DataConfig(train=_many(tmp_path, 60), val=_jsonl(tmp_path / "v.jsonl", ALPACA[:2]))
    _, val, stats = build_datasets(cfg, tok, seed=0)
    assert len(val) == 2 and stats.val_fraction is None and stats.resolved(cfg) == cfg
