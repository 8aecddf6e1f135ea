"""The line of a JSON Lines file that Arrow's reader failed on, found by reading it again.

Arrow numbers rows from the start of its current 4 MiB block and often names no column
("couldn't parse:1.5", "unexpected field"), so its message cannot tell a user which line to
fix. Only after a failure (the fast path never comes here) the file is read with Python's
`json`, line by line, checking each value against the column types the reader had (or, when
inference itself failed, against the first value seen in each column); the first line that
breaks one is named, with its column and a fix.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

_INT64 = 2 ** 63


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of the non-blank lines; Arrow splits on `\\n` only."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _expected(dtype: pa.DataType) -> str | None:
    """The JSON kind Arrow's reader parses into `dtype`; None: any (not checked here)."""
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return "array"
    if pa.types.is_struct(dtype):
        return "object"
    return None


def _fits(kind: str, expected: str) -> bool:
    return kind == "null" or kind == expected or (kind == "integer" and expected == "number")


def _clash(column: str, first: str, kind: str, value: object, typed: bool) -> str:
    shown = json.dumps(value)[:40]
    if {first, kind} <= {"integer", "number"}:
        fix = f"give its type with --type {column}=float64"
    elif "string" in (first, kind):
        fix = (f"write every value of {column!r} as a JSON string (quoted), or every one as "
               "a number")
    else:
        fix = f"give {column!r} one JSON type in every line"
    before = ("read as " + first + " (its type from the first 4 MiB, the table or --type)"
              if typed else first + " in the lines before")
    return f"column {column!r} is {before} and {kind} here ({shown}); {fix}"


def locate(path: Path, schema: pa.Schema | None, given: set[str]) -> str | None:
    """`line N: what is wrong` for the first line that breaks `schema` (or, without one, the
    first type each column had); None when no line does (the reader's own message then)."""
    expected = {f.name: _expected(f.type) for f in schema} if schema is not None else {}
    firsts: dict[str, str] = {}
    try:
        for number, raw in _lines(path):
            problem = _check_line(raw, schema, expected, firsts, given)
            if problem is not None:
                return f"line {number}: {problem}"
    except (OSError, EOFError) as exc:
        return f"could not be read to the end ({exc}): a truncated or corrupt .gz?"
    return None


def _check_line(raw: bytes, schema: pa.Schema | None, expected: dict[str, str | None],
                firsts: dict[str, str], given: set[str]) -> str | None:
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        return "not UTF-8 text; JSON Lines must be UTF-8 (convert with `iconv -t utf-8`)"
    except ValueError as exc:
        return (f"not a complete JSON object ({exc.args[0].split(':')[0]}); a JSON Lines file "
                "holds one whole object per line: fix or remove the line")
    if not isinstance(record, dict):
        return (f"a JSON {_kind(record)} where an object {{...}} is expected; write one object "
                "per line")
    for column, value in record.items():
        kind = _kind(value)
        if kind == "integer" and abs(value) >= _INT64 and column not in given:
            return _huge(column, value)
        if kind == "number" and math.isinf(value):  # Python reads 1e400 as inf
            return (f"column {column!r}: {raw.decode(errors='replace').strip()[:60]} holds a "
                    "number beyond float64's range; fix the value")
        if schema is not None and column not in expected:
            return (f"field {column!r} is not in the first 4 MiB of the file, where the "
                    f"columns are fixed ({', '.join(schema.names)}); move a line that has it "
                    "to the top of the file, or split the file")
        want = expected.get(column) or firsts.get(column)
        if want is None:
            if kind != "null":
                firsts[column] = "number" if kind == "integer" else kind
            continue
        if not _fits(kind, want):
            return _clash(column, want, kind, value, column in expected)
    return None


def huge_integer(path: Path, column: str) -> str | None:
    """`line N: ...` for the first integer beyond int64 in `column`, else None."""
    for number, raw in _lines(path):
        try:
            value = json.loads(raw).get(column)
        except (ValueError, AttributeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT64:
            return f"line {number}: {_huge(column, value)}"
    return None


def _huge(column: str, value: int) -> str:
    return (f"column {column!r}: the integer {value} is beyond int64's range, and reading it "
            "would turn the whole column into rounded floats (1 as 1.0); write it as a string "
            "(quoted) or drop it")
