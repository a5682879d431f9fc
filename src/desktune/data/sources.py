"""Read a data file (.jsonl, .json, .csv, .parquet or a saved HF dataset folder) into raw rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desktune.errors import DesktuneError

SUPPORTED = ".jsonl, .json, .csv, .parquet or a folder written by datasets' save_to_disk"
_SUPPORTED_FIX = f"use one of: {SUPPORTED}"
_JSONL = {".jsonl", ".ndjson"}
# keys that mark a top-level JSON object as one conversation rather than a {"data": [...]} wrapper
_SAMPLE_KEYS = {"messages", "conversations"}


_COMPRESSED = (
    (b"\x1f\x8b", "gzip-compressed file", "decompress it first (gunzip) and use the decompressed file"),
    (b"PK\x03\x04", "zip archive", "unzip it first and use the data file inside"),
    (b"BZh", "bzip2-compressed file", "decompress it first (bunzip2) and use the decompressed file"),
    (b"\xfd7zXZ\x00", "xz-compressed file", "decompress it first (unxz) and use the decompressed file"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed file", "decompress it first (unzstd) and use the decompressed file"),
)


SHOWN_ROWS = 5  # rows named in a message; the count says how many more
SKIP_FIX = "or leave such rows out: -o data.bad_rows=skip"


@dataclass(frozen=True)
class RawRow:
    """One record as read from disk, with where it came from (`path:line` or `path:row N`)."""

    data: dict[str, Any]
    source: str


def rows_text(sources: list[str]) -> str:
    """'a.jsonl:1, a.jsonl:2 and 3 more'."""
    shown = ", ".join(sources[:SHOWN_ROWS])
    return shown + (f" and {len(sources) - SHOWN_ROWS} more" if len(sources) > SHOWN_ROWS else "")


def error_text(e: DesktuneError) -> str:
    """The message of `e` without its where and fix (DesktuneError keeps only the joined text)."""
    text = str(e)
    text = text[: -len(f"\nFix: {e.fix}")] if e.fix else text
    return text[len(f"{e.where}: "):] if e.where else text


@dataclass
class BadRows:
    """data.bad_rows for one data file: `skip` keeps each bad row's error and goes on; `error` raises the first,
    its fix naming the switch. Only errors that name a row pass through here."""

    skip: bool = False
    errors: list[DesktuneError] = field(default_factory=list)

    def found(self, e: DesktuneError) -> None:
        """A bad row: kept when skipping, else raised with the skip switch added to its fix."""
        if not self.skip:
            fix = f"{e.fix}; {SKIP_FIX}" if e.fix else SKIP_FIX
            raise DesktuneError(error_text(e), where=e.where, fix=fix) from e
        self.errors.append(e)

    def note(self) -> str | None:
        """'left out 3 bad rows (data.bad_rows=skip): a.jsonl:2: why; ...', or None when none was."""
        if not self.errors:
            return None
        shown = "; ".join(f"{e.where}: {error_text(e)}" for e in self.errors[:SHOWN_ROWS])
        more = f"; and {len(self.errors) - SHOWN_ROWS} more" if len(self.errors) > SHOWN_ROWS else ""
        return f"left out {len(self.errors)} bad row(s) (data.bad_rows=skip): {shown}{more}"

    def none_left(self, where: str) -> DesktuneError:
        """Every row was bad: the first one's error and fix, with the count."""
        first = self.errors[0]
        return DesktuneError(f"all {len(self.errors)} rows are bad, none is left to use (data.bad_rows=skip); the "
                             f"first, {first.where}: {error_text(first)}", where=where, fix=first.fix)


def bad_row(bad: BadRows | None, e: DesktuneError) -> None:
    """A row that cannot be used: raised as it is without `bad` (not the training data), else skipped or raised
    as `bad` says."""
    if bad is None:
        raise e
    bad.found(e)


def read_rows(path: str | Path, bad: BadRows | None = None) -> list[RawRow]:
    """Read every row of a data file or saved dataset folder; raise DesktuneError on any bad input (a bad row
    goes to `bad` when given: skipped or raised, as data.bad_rows says)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DesktuneError(
            "data file not found", where=str(p), fix="check the path in data.train / data.val"
        )
    if p.is_dir():
        rows = _read_saved_dataset(p)
    else:
        suffix = p.suffix.lower()
        if suffix in _JSONL:
            rows = _read_jsonl(p, bad)
        elif suffix == ".json":
            rows = _read_json(p, bad)
        elif suffix == ".csv":
            rows = _read_csv(p, bad)
        elif suffix == ".parquet":
            rows = _read_parquet(p)
        else:
            raise DesktuneError(
                f"unknown data file type '{p.suffix or '(none)'}'", where=str(p), fix=_SUPPORTED_FIX
            )
    if not rows:
        if bad is not None and bad.errors:
            raise bad.none_left(str(p))
        raise DesktuneError("the data has no rows", where=str(p), fix="add training samples to the file")
    return rows


def _read_text(p: Path) -> str:
    """The file's text (UTF-8, optional BOM); empty and binary files raise."""
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DesktuneError(
            f"cannot read the file: {e.strerror or e}", where=str(p), fix="check its permissions"
        ) from e
    if not raw.strip():
        raise DesktuneError("file is empty", where=str(p), fix="add training samples to the file")
    if raw.startswith(b"PAR1"):
        raise DesktuneError("this is a Parquet file", where=str(p), fix="rename it to end in .parquet")
    for magic, what, fix in _COMPRESSED:
        if raw.startswith(magic):
            raise DesktuneError(f"this is a {what}, not text", where=str(p), fix=fix)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DesktuneError("the file is UTF-16 text, not UTF-8", where=str(p),
                            fix="save the file as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 IN > OUT)")
    if b"\x00" in raw:
        raise DesktuneError("looks like a binary file (contains NUL bytes)", where=str(p), fix=_SUPPORTED_FIX)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DesktuneError(
            f"not UTF-8 text (invalid byte at offset {e.start})",
            where=str(p),
            fix="save the file as UTF-8 text, or pass a .parquet file",
        ) from e


def _as_row(obj: Any, source: str) -> RawRow:
    if not isinstance(obj, dict):
        raise DesktuneError(
            f"row is a {kind_of(obj)}, not an object",
            where=source,
            fix='each row must be a JSON object such as {"instruction": ..., "output": ...}',
        )
    return RawRow({str(k): v for k, v in obj.items()}, source)


def kind_of(obj: Any) -> str:
    """A user-facing name for a JSON value's type."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if obj is None else names.get(type(obj), type(obj).__name__)


def _read_jsonl(p: Path, bad: BadRows | None) -> list[RawRow]:
    rows = []
    for n, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rows.append(_as_row(_json_line(line, n, where), where))
        except DesktuneError as e:
            bad_row(bad, e)
    return rows


def _json_line(line: str, n: int, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DesktuneError(
            f"invalid JSON on line {n}: {e.msg} (column {e.colno})",
            where=where,
            fix="each line must hold one complete JSON object",
        ) from e
    except RecursionError as e:
        raise _too_deep(where) from e


def _read_json(p: Path, bad: BadRows | None) -> list[RawRow]:
    text = _read_text(p)
    try:
        obj = json.loads(text)
    except RecursionError as e:
        raise _too_deep(str(p)) from e
    except json.JSONDecodeError as e:
        fix = "correct the JSON syntax"
        if e.msg.startswith("Extra data"):
            fix = "the file holds several JSON values; if it has one object per line, name it .jsonl"
        raise DesktuneError(
            f"invalid JSON: {e.msg} (column {e.colno})", where=f"{p}:{e.lineno}", fix=fix
        ) from e
    rows = []
    for i, item in enumerate(_json_items(obj, p), start=1):
        try:
            rows.append(_as_row(item, f"{p}:row {i}"))
        except DesktuneError as e:
            bad_row(bad, e)
    return rows


def _too_deep(where: str) -> DesktuneError:
    return DesktuneError("the JSON is nested too deeply to read (brackets that never close?)", where=where,
                         fix="correct the JSON: rows are objects of text fields and lists of turns")


def _json_items(obj: Any, p: Path) -> list[Any]:
    """The rows inside a JSON document: a list, or an object with exactly one list value ({"data": [...]})."""
    if isinstance(obj, list):
        return obj
    fix = 'write a list of objects [{...}, {...}], or an object with one list such as {"data": [...]}'
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1 and not _SAMPLE_KEYS & obj.keys():
            return lists[0]
        what = "a single sample" if _SAMPLE_KEYS & obj.keys() else f"an object with keys {_keys(obj)}"
        raise DesktuneError(f"the JSON holds {what}, not a list of rows", where=str(p), fix=fix)
    raise DesktuneError(f"the JSON holds a {kind_of(obj)}, not a list of rows", where=str(p), fix=fix)


def _keys(obj: dict[str, Any]) -> str:
    return ", ".join(repr(str(k)) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")


def _read_csv(p: Path, bad: BadRows | None) -> list[RawRow]:
    reader = csv.reader(io.StringIO(_read_text(p), newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise _csv_error(e, p, reader) from e
    if header is None or not any(h.strip() for h in header):
        raise DesktuneError("the CSV has no header row", where=str(p), fix="put column names on the first line")
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DesktuneError(f"duplicate CSV columns: {', '.join(dupes)}", where=str(p), fix="rename the columns")
    rows = []
    for n, fields in enumerate(_csv_records(reader, p), start=1):
        if isinstance(fields, DesktuneError):
            bad_row(bad, fields)
        elif fields and len(fields) != len(header):
            bad_row(bad, DesktuneError(f"row has {len(fields)} fields but the header has {len(header)} columns",
                                       where=f"{p}:row {n}", fix="quote fields that contain commas or newlines"))
        elif fields:
            rows.append(RawRow(dict(zip(header, fields, strict=True)), f"{p}:row {n}"))
    return rows


def _csv_records(reader: Any, p: Path) -> Iterator[list[str] | DesktuneError]:
    """The CSV's records, an unreadable one as its error (the reader goes on after it)."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield _csv_error(e, p, reader)


def _csv_error(e: csv.Error, p: Path, reader: Any) -> DesktuneError:
    return DesktuneError(f"invalid CSV: {e}", where=f"{p}:{reader.line_num}", fix="correct the CSV quoting")


def _read_parquet(p: Path) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if p.stat().st_size == 0:
        raise DesktuneError("file is empty", where=str(p), fix="add training samples to the file")
    try:
        records = pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DesktuneError(
            f"cannot read as Parquet: {str(e).splitlines()[0]}",
            where=str(p),
            fix="pass a valid .parquet file",
        ) from e
    return [RawRow(rec, f"{p}:row {i}") for i, rec in enumerate(records, start=1)]


def _read_saved_dataset(p: Path) -> list[RawRow]:
    """Rows of a folder written by Dataset.save_to_disk (a DatasetDict: its 'train' split)."""
    try:
        entries = sorted(p.iterdir())
    except OSError as e:
        raise DesktuneError(f"cannot read the folder: {e.strerror or e}", where=str(p),
                            fix=f"make it readable (chmod u+rx {p}), or point data.train at a data file") from e
    names = {f.name for f in entries}
    if "dataset_dict.json" not in names and "state.json" not in names:
        files = [f for f in entries if f.is_file() and f.suffix.lower() in {*_JSONL, ".json", ".csv", ".parquet"}]
        fix = _SUPPORTED_FIX
        if files:
            fix = f"set data.train (or data.val) to a data file instead, such as {files[0]}"
        elif not entries:
            fix = f"the folder is empty; {_SUPPORTED_FIX}"
        raise DesktuneError("folder is not a dataset saved with save_to_disk", where=str(p), fix=fix)
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.load_from_disk(str(p))
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        # OSError: a file it names is missing; ValueError: invalid JSON (state.json, dataset_info.json,
        # dataset_dict.json) or an unreadable .arrow file (ArrowInvalid); KeyError: a JSON file without its keys
        raise DesktuneError(
            f"cannot load the saved dataset: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            where=str(p),
            fix=f"make its files readable (chmod -R u+rX {p})" if isinstance(e, PermissionError)
            else "re-save it with Dataset.save_to_disk",
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DesktuneError(
                f"the saved DatasetDict has no 'train' split (splits: {', '.join(ds)})",
                where=str(p),
                fix="save the split to use as 'train', or point data.train at a single split's folder",
            )
        ds = ds["train"]
    return [RawRow(rec, f"{p}:row {i}") for i, rec in enumerate(ds.to_list(), start=1)]
