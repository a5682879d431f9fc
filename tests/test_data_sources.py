"""Reading data files into raw rows, and every way a file can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desktune.data import RawRow, convert_rows, read_rows
from desktune.data.formats import FORMATS
from desktune.data.sources import BadRows, error_text
from desktune.errors import DesktuneError

ROWS = [{"instruction": "say hi", "output": "hi"}, {"instruction": "say bye", "output": "bye"}]


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> DesktuneError:
    with pytest.raises(DesktuneError) as info:
        read_rows(path)
    return info.value


# ---------------------------------------------------------------- each file type


def test_jsonl_rows_carry_their_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    rows = read_rows(p)
    assert rows == [RawRow(ROWS[0], f"{p}:1"), RawRow(ROWS[1], f"{p}:3")]


def test_jsonl_with_utf8_bom_and_unicode(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "d.jsonl", b"\xef\xbb\xbf" + json.dumps({"text": "h\u00e9llo \u4e16\u754c"}).encode()
    )
    assert read_rows(p)[0].data == {"text": "h\u00e9llo \u4e16\u754c"}


def test_json_list(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.json", json.dumps(ROWS, indent=2))
    rows = read_rows(p)
    assert [r.data for r in rows] == ROWS
    assert [r.source for r in rows] == [f"{p}:row 1", f"{p}:row 2"]


@pytest.mark.parametrize("doc", [{"data": ROWS}, {"version": "1.0", "rows": ROWS}])
def test_json_object_with_single_list(tmp_path: Path, doc: dict[str, object]) -> None:
    p = _write(tmp_path / "d.json", json.dumps(doc))
    assert [r.data for r in read_rows(p)] == ROWS


def test_csv_rows_keep_strings_and_quoted_newlines(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.csv", 'instruction,input,output\n"say, hi","","line1\nline2"\nadd,1 2,3\n')
    rows = read_rows(p)
    assert rows[0].data == {"instruction": "say, hi", "input": "", "output": "line1\nline2"}
    assert rows[1].data == {"instruction": "add", "input": "1 2", "output": "3"}
    assert rows[1].source == f"{p}:row 2"


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(p)
    rows = read_rows(p)
    assert [r.data for r in rows] == ROWS
    assert rows[1].source == f"{p}:row 2"


def test_parquet_nested_messages(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pd.DataFrame({"messages": [msgs]}).to_parquet(p)
    assert read_rows(p)[0].data == {"messages": msgs}


def test_saved_dataset_folder(tmp_path: Path) -> None:
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(tmp_path / "ds")
    assert [r.data for r in rows] == ROWS
    assert rows[0].source == f"{tmp_path / 'ds'}:row 1"


def test_saved_dataset_dict_uses_train_split(tmp_path: Path) -> None:
    dd = DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.data for r in read_rows(tmp_path / "dd")] == ROWS


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope.jsonl")
    assert "not found" in str(err) and err.where == str(tmp_path / "nope.jsonl") and err.fix


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    err = _error(_write(tmp_path / name, ""))
    assert "empty" in str(err) and err.fix


def test_whitespace_only_file_is_empty(tmp_path: Path) -> None:
    assert "empty" in str(_error(_write(tmp_path / "d.jsonl", "\n  \n")))


def test_non_utf8_file(tmp_path: Path) -> None:
    err = _error(_write(tmp_path / "d.jsonl", b'{"text": "caf\xe9"}\n'))
    assert "not UTF-8" in str(err) and "UTF-8" in (err.fix or "")


def test_binary_file(tmp_path: Path) -> None:
    assert "binary" in str(_error(_write(tmp_path / "d.csv", b"text\n\x00\x01\x02\n")))


def test_parquet_named_jsonl(tmp_path: Path) -> None:
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    p = _write(tmp_path / "d.jsonl", (tmp_path / "d.parquet").read_bytes())
    assert "Parquet" in str(_error(p))


def test_unknown_extension(tmp_path: Path) -> None:
    err = _error(_write(tmp_path / "d.txt", "hello"))
    assert "'.txt'" in str(err) and ".jsonl" in (err.fix or "")


def test_invalid_json_line_names_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n" + '{"instruction": "x", \n')
    err = _error(p)
    assert err.where == f"{p}:2" and "line 2" in str(err)


def test_jsonl_row_that_is_not_an_object(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.jsonl", json.dumps(ROWS[0]) + "\n[1, 2]\n")
    err = _error(p)
    assert err.where == f"{p}:2" and "list, not an object" in str(err)


def test_invalid_json_document(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.json", '[\n{"a": 1},\n{"a": }\n]')
    err = _error(p)
    assert err.where == f"{p}:3" and "invalid JSON" in str(err)


def test_jsonl_content_in_json_file_suggests_jsonl(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.json", json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    assert ".jsonl" in (_error(p).fix or "")


@pytest.mark.parametrize(
    ("doc", "said"),
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "a single sample"),
        ({"a": [], "b": []}, "an object with keys"),
        ("just text", "a string"),
    ],
)
def test_json_document_that_is_not_rows(tmp_path: Path, doc: object, said: str) -> None:
    assert said in str(_error(_write(tmp_path / "d.json", json.dumps(doc))))


def test_json_list_item_not_an_object(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.json", json.dumps([ROWS[0], "oops"]))
    err = _error(p)
    assert err.where == f"{p}:row 2" and "string, not an object" in str(err)


def test_empty_json_list(tmp_path: Path) -> None:
    assert "no rows" in str(_error(_write(tmp_path / "d.json", "[]")))


def test_csv_header_only(tmp_path: Path) -> None:
    assert "no rows" in str(_error(_write(tmp_path / "d.csv", "instruction,output\n")))


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    p = _write(tmp_path / "d.csv", "instruction,output\na,b\nc,d,e\n")
    err = _error(p)
    assert err.where == f"{p}:row 2" and "3 fields" in str(err) and "2 columns" in str(err)


def test_csv_duplicate_columns(tmp_path: Path) -> None:
    assert "duplicate" in str(_error(_write(tmp_path / "d.csv", "text,text\na,b\n")))


def test_corrupt_parquet(tmp_path: Path) -> None:
    err = _error(_write(tmp_path / "d.parquet", b"this is not parquet at all"))
    assert "Parquet" in str(err) and err.fix


def test_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    assert "save_to_disk" in str(_error(tmp_path / "folder"))


def test_dataset_dict_without_train_split(tmp_path: Path) -> None:
    DatasetDict({"test": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    err = _error(tmp_path / "dd")
    assert "no 'train' split" in str(err) and "test" in str(err)


# ---------------------------------------------------------------- errors keep their cause; bugs stay bugs


def test_invalid_json_line_keeps_the_decoder_error_as_cause(tmp_path: Path) -> None:
    err = _error(_write(tmp_path / "d.jsonl", '{"instruction": "a",\n'))
    assert isinstance(err.__cause__, json.JSONDecodeError)


def test_damaged_saved_dataset_keeps_the_arrow_error_as_cause(tmp_path: Path) -> None:
    import pyarrow as pa

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    for arrow in (tmp_path / "ds").glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:40])  # truncated mid-schema
    err = _error(tmp_path / "ds")
    assert "cannot load the saved dataset" in str(err) and err.fix
    assert isinstance(err.__cause__, pa.ArrowException)


def test_a_bug_inside_the_dataset_loader_is_not_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug in the loader")

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setattr(datasets, "load_from_disk", broken)
    with pytest.raises(TypeError, match="a bug in the loader"):
        read_rows(tmp_path / "ds")


# ---------------------------------------------------------------- any file content: rows or a DesktuneError


_KEY = st.sampled_from(["messages", "conversations", "instruction", "input", "output", "prompt", "completion",
                        "text", "role", "content", "from", "value", "system", "x", ""])
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10),
              st.sampled_from(["user", "assistant", "system", "human", "gpt"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEY, inner, max_size=4)),
    max_leaves=10,
)
_GOOD = st.sampled_from([
    {"instruction": "say hi", "output": "hi"},
    {"prompt": "p", "completion": "c"},
    {"text": "some text"},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
])
_ROW = st.one_of(_GOOD, st.dictionaries(_KEY, _JSON, max_size=4), _JSON)


def _csv_text(rows: list[list[str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


_CONTENT = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    st.lists(_ROW, max_size=5).map(lambda rows: "\n".join(json.dumps(r) for r in rows)),  # JSON lines
    st.one_of(st.lists(_ROW, max_size=5), st.dictionaries(_KEY, st.lists(_ROW, max_size=3), max_size=2), _JSON)
    .map(json.dumps),  # one JSON document
    st.lists(st.lists(st.one_of(_KEY, st.text(max_size=8)), min_size=1, max_size=4), max_size=5).map(_csv_text),
    st.tuples(st.lists(_GOOD, min_size=1, max_size=4), st.integers(0, 400), st.binary(max_size=4)).map(
        lambda t: "\n".join(json.dumps(r) for r in t[0]).encode()[: t[1]] + t[2]  # truncated or with junk at the end
    ),
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=_CONTENT, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".ndjson"]),
       fmt=st.sampled_from(["auto", "auto", *FORMATS]))
def test_any_file_content_reads_or_raises_desktune_error(tmp_path: Path, content: str | bytes, suffix: str,
                                                         fmt: str) -> None:
    path = _write(tmp_path / f"data{suffix}", content)
    try:
        _, samples = convert_rows(read_rows(path), fmt)
    except DesktuneError as e:
        assert e.where and e.where.startswith(str(path)) and e.fix, str(e)
        return
    assert samples and all((s.messages is None) != (s.text is None) for s in samples)


# ---------------------------------------------------------------- data.bad_rows


_BAD_LINES = "\n".join([json.dumps(ROWS[0]), "{not json", "[1, 2]", '{"a": ' + "[" * 5000, json.dumps(ROWS[1])])


def test_bad_rows_skip_leaves_out_each_bad_line_and_names_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _BAD_LINES)
    bad = BadRows(skip=True)
    rows = read_rows(path, bad)
    assert [r.data for r in rows] == ROWS and [r.source for r in rows] == [f"{path}:1", f"{path}:5"]
    assert [e.where for e in bad.errors] == [f"{path}:{n}" for n in (2, 3, 4)]
    note = bad.note() or ""
    assert note.startswith("left out 3 bad row(s) (data.bad_rows=skip): ")
    assert f"{path}:2: invalid JSON on line 2" in note and f"{path}:3: row is a list, not an object" in note
    assert f"{path}:4: the JSON is nested too deeply" in note and "Fix:" not in note


def test_bad_rows_error_stops_at_the_first_with_the_switch_in_its_fix(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _BAD_LINES)
    with pytest.raises(DesktuneError) as info:
        read_rows(path, BadRows(skip=False))
    assert str(info.value).splitlines()[0] == str(_error(path)).splitlines()[0]  # the message as without it
    assert info.value.where == f"{path}:2"
    assert info.value.fix == "each line must hold one complete JSON object; or leave such rows out: " \
                             "-o data.bad_rows=skip"
    assert "bad_rows" not in (_error(path).fix or "")  # not the training data (eval --data): no switch to name


def test_bad_rows_skip_in_json_and_csv(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.json", json.dumps([ROWS[0], "text", ROWS[1]]))
    bad = BadRows(skip=True)
    assert [r.source for r in read_rows(path, bad)] == [f"{path}:row 1", f"{path}:row 3"]
    assert [e.where for e in bad.errors] == [f"{path}:row 2"]
    huge = "a," + "b" * 200_000  # over the csv module's field limit: csv.Error, and the reader goes on after it
    path = _write(tmp_path / "d.csv", f"instruction,output\nsay hi,hi\nsay, bye,bye\n{huge}\nsay bye,bye\n")
    bad = BadRows(skip=True)
    assert [r.data for r in read_rows(path, bad)] == ROWS
    assert [error_text(e) for e in bad.errors] == ["row has 3 fields but the header has 2 columns",
                                                   "invalid CSV: field larger than field limit (131072)"]
    assert [e.where for e in bad.errors] == [f"{path}:row 2", f"{path}:4"]


def test_bad_rows_skip_with_every_row_bad_is_still_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", "{oops\n[1]\n")
    with pytest.raises(DesktuneError) as info:
        read_rows(path, BadRows(skip=True))
    assert info.value.where == str(path)
    assert str(info.value).startswith(f"{path}: all 2 rows are bad, none is left to use (data.bad_rows=skip); "
                                      f"the first, {path}:1: invalid JSON on line 1")
    assert info.value.fix == "each line must hold one complete JSON object"


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(content=_CONTENT, suffix=st.sampled_from([".jsonl", ".json", ".csv"]), fmt=st.sampled_from(["auto", *FORMATS]))
def test_any_file_content_with_bad_rows_skipped_reads_or_raises_desktune_error(tmp_path: Path, content: str | bytes,
                                                                               suffix: str, fmt: str) -> None:
    path = _write(tmp_path / f"data{suffix}", content)
    bad = BadRows(skip=True)
    try:
        _, samples = convert_rows(read_rows(path, bad), fmt, bad)
    except DesktuneError as e:
        assert e.where and e.where.startswith(str(path)) and e.fix, str(e)
        return
    assert all(e.where and e.where.startswith(str(path)) for e in bad.errors)
    assert all((s.messages is None) != (s.text is None) for s in samples)
