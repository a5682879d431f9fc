"""Reading data files into raw rows, and every way a file can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from desktune.data import RawRow, read_rows
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
