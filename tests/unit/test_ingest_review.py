"""Regressions from a QA sweep of `arf datahub ingest` (CSV, JSON Lines, Parquet): bad input
fails with a message naming the file, line and column, and writes no table version; each test
failed before its fix."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arf_trainer.datahub import jsonl, sources
from arf_trainer.datahub.column_types import parse_types
from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.tables import open_table
from arf_trainer.errors import DataHubError


def _rows(hub: Path, name: str) -> list[dict]:
    return open_table(hub, name).dataset.to_table().to_pylist()


def _version(hub: Path, name: str) -> int | None:
    try:
        return open_table(hub, name).version
    except DataHubError:
        return None


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# 1. Null tokens: only an empty field is null.

def test_csv_null_tokens_are_text_and_fail_in_a_number_column(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    data = _text(tmp_path / "tok.csv", "id,x,s\n1,10,NA\n2,NA,null\n3,,n/a\n4,nan,\n")
    ingest(hub, "t", [data])
    rows = _rows(hub, "t")
    assert [r["x"] for r in rows] == ["10", "NA", "", "nan"]  # text, as written
    assert [r["s"] for r in rows] == ["NA", "null", "n/a", ""]
    numbers = _text(tmp_path / "n.csv", "id,x\n1,2\n2,\n")
    ingest(hub, "n", [numbers])
    assert [r["x"] for r in _rows(hub, "n")] == [2, None]  # an empty field is null
    bad = _text(tmp_path / "na.csv", "id,x\n7,n/a\n")
    with pytest.raises(DataHubError, match=r"na\.csv: line 2: column 'x': .*'n/a'.*--type x="):
        ingest(hub, "n", [bad])
    assert _version(hub, "n") == 0


def test_csv_null_token_after_the_inference_block_fails_at_its_line(tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 256)
    lines = [f"{i},{i}" for i in range(200)]
    data = _text(tmp_path / "big.csv", "id,x\n" + "\n".join(lines + ["200,NULL"]) + "\n")
    with pytest.raises(DataHubError, match=r"big\.csv: line 202: column 'x': .*'NULL'"):
        ingest(tmp_path / "hub", "t", [data])
    assert _version(tmp_path / "hub", "t") is None


# 2. A file named twice.

def test_a_file_named_twice_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    data = pq.write_table(pa.table({"id": [1, 2]}), folder / "a.parquet") or folder / "a.parquet"
    with pytest.raises(DataHubError, match=r"a\.parquet .*named twice"):
        ingest(tmp_path / "hub", "t", [data, data])
    with pytest.raises(DataHubError, match=r"a\.parquet .*named twice"):
        ingest(tmp_path / "hub", "t", [folder, data])
    assert _version(tmp_path / "hub", "t") is None


# 3. A folder of the user's own files under the table's name.

def test_a_foreign_folder_is_not_taken_over_but_an_empty_one_is_used(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    data = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1]}), data)
    (hub / "mine").mkdir(parents=True)
    (hub / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataHubError, match=r"folder .*mine already holds files .*notes\.txt.*"
                                           "another table name"):
        ingest(hub, "mine", [data])
    assert (hub / "mine" / "notes.txt").read_text() == "keep me"
    (hub / "left").mkdir()
    (hub / "left" / "part-00001-0b6a4d2e-8a35-4f3a-9d4b-1c2d3e4f5a6b-c000.snappy.parquet"
     ).write_bytes(b"orphan of a stopped ingest")
    assert ingest(hub, "left", [data]).version == 0


# 4. Precision and range.

def test_nanoseconds_are_refused_not_truncated(tmp_path: Path) -> None:
    data = tmp_path / "ns.parquet"
    pq.write_table(pa.table({"id": [1], "t": pa.array([1], pa.timestamp("ns"))}), data)
    with pytest.raises(DataHubError, match=r"ns\.parquet: column 't' holds instants finer .*"
                                           r"--type t=int64"):
        ingest(tmp_path / "hub", "t", [data])
    assert _version(tmp_path / "hub", "t") is None
    ingest(tmp_path / "hub", "t", [data], types=parse_types(["t=int64"]))
    assert _rows(tmp_path / "hub", "t") == [{"id": 1, "t": 1}]
    whole = tmp_path / "us.parquet"
    pq.write_table(pa.table({"t": pa.array([1000], pa.timestamp("ns"))}), whole)
    ingest(tmp_path / "hub", "w", [whole])  # no precision lost: accepted
    assert _rows(tmp_path / "hub", "w") == [{"t": dt.datetime(1970, 1, 1, 0, 0, 0, 1)}]


def test_jsonl_integer_beyond_int64_is_refused(tmp_path: Path) -> None:
    data = _text(tmp_path / "big.jsonl", '{"id":1}\n{"id":99999999999999999999999}\n')
    with pytest.raises(DataHubError, match=r"big\.jsonl: line 2: column 'id': the integer "
                                           "99999999999999999999999 is beyond int64"):
        ingest(tmp_path / "hub", "t", [data])
    floats = _text(tmp_path / "f.jsonl", '{"id":1.5}\n{"id":1e23}\n')  # floats as written
    assert ingest(tmp_path / "hub", "f", [floats]).rows == 2


@pytest.mark.parametrize("value", ["1e400", "inf", "-Infinity"])
def test_csv_infinity_is_refused(tmp_path: Path, value: str) -> None:
    data = _text(tmp_path / "inf.csv", f"id,x\n1,0.5\n2,{value}\n")
    with pytest.raises(DataHubError, match=r"inf\.csv: line 3: column 'x': the value is "
                                           "infinite"):
        ingest(tmp_path / "hub", "t", [data])
    assert _version(tmp_path / "hub", "t") is None


# 5-7. Names, partitions, empty inputs.

def test_a_column_with_no_name_is_refused(tmp_path: Path) -> None:
    data = _text(tmp_path / "e.csv", "id,,name\n1,2,a\n")
    with pytest.raises(DataHubError, match=r"e\.csv: column 2 has no name"):
        ingest(tmp_path / "hub", "t", [data])
    parquet = tmp_path / "e.parquet"
    pq.write_table(pa.table({"": [1], "b": [2]}), parquet)
    with pytest.raises(DataHubError, match=r"e\.parquet: column 1 has no name"):
        ingest(tmp_path / "hub", "t", [parquet])


def test_an_empty_partition_value_is_refused(tmp_path: Path) -> None:
    data = _text(tmp_path / "p.csv", "id,name\n1,a\n2,\n")
    with pytest.raises(DataHubError, match=r"p\.csv: partition column 'name' has an empty "
                                           r"value \(data row 2\).*--partition-by"):
        ingest(tmp_path / "hub", "t", [data], partition_by=["name"])
    assert _version(tmp_path / "hub", "t") is None


def test_no_rows_write_no_version(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    rows, empty = tmp_path / "a.parquet", tmp_path / "zero.parquet"
    pq.write_table(pa.table({"id": [1]}), rows)
    pq.write_table(pa.table({"id": pa.array([], pa.int64())}), empty)
    with pytest.raises(DataHubError, match=r"no rows in .*zero\.parquet; nothing written"):
        ingest(hub, "t", [empty])
    ingest(hub, "t", [rows])
    with pytest.raises(DataHubError, match="no rows"):
        ingest(hub, "t", [empty])
    with pytest.raises(DataHubError, match="would silently empty the table"):
        ingest(hub, "t", [empty], mode="overwrite")
    assert _version(hub, "t") == 0 and _rows(hub, "t") == [{"id": 1}]


# 8-10. Unreadable files and type names.

@pytest.mark.parametrize("content", [
    pytest.param("id,name\n1,caf\u00e9\n".encode("latin-1"), id="latin1-row"),
    pytest.param("caf\u00e9,x\n1,2\n".encode("latin-1"), id="latin1-header"),
    pytest.param("id,x\n1,2\n".encode("utf-16"), id="utf16"),
    pytest.param(bytes(range(256)) * 4, id="binary"),
])
def test_a_csv_that_is_not_utf8_is_named(tmp_path: Path, content: bytes) -> None:
    data = tmp_path / "enc.csv"
    data.write_bytes(content)
    with pytest.raises(DataHubError, match=r"enc\.csv: not UTF-8 text.*iconv -f latin1"):
        ingest(tmp_path / "hub", "t", [data])


def test_corrupt_or_truncated_gzip_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataHubError, match=r"bad\.csv\.gz: not a readable gzip file"):
        ingest(tmp_path / "hub", "t", [bad])
    whole = gzip.compress(("id,x\n" + "".join(f"{i},{i}\n" for i in range(5000))).encode())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataHubError, match=r"cut\.csv\.gz: .*truncated"):
        ingest(tmp_path / "hub", "t", [cut])
    assert _version(tmp_path / "hub", "t") is None


@pytest.mark.parametrize("spec", ["x=float32[99999999999]", "x=uint8[65536][65536]",
                                  "x=float32[0]"])
def test_array_sizes_out_of_range_are_refused(spec: str) -> None:
    with pytest.raises(DataHubError, match="array sizes must be at least 1"):
        parse_types([spec])


# 11. JSON Lines errors name the line and the column.

@pytest.mark.parametrize(("body", "match"), [
    pytest.param('{"id":2,"x":', r"line 203: not a complete JSON object", id="truncated"),
    pytest.param('{"id":2,"x":1.5}', r"line 203: column 'x' is read as integer .*1\.5.*"
                                     "--type x=float64", id="float-in-int"),
    pytest.param('{"id":2,"x":"abc"}', r"line 203: column 'x' is read as integer .*string",
                 id="string-in-int"),
    pytest.param('{"id":2,"x":3,"new":1}', r"line 203: field 'new' is not in the first",
                 id="new-field"),
    pytest.param('[1, 2]', r"line 203: a JSON array where an object", id="not-an-object"),
])
def test_jsonl_errors_name_the_file_line(tmp_path: Path, monkeypatch, body: str,
                                         match: str) -> None:
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 1024)  # the bad line is in a later block
    lines = [f'{{"id":{i},"x":{i}}}' for i in range(200)]
    data = _text(tmp_path / "d.jsonl", "\n\n" + "\n".join(lines + [body]) + "\n")
    with pytest.raises(DataHubError, match=r"d\.jsonl: " + match):
        ingest(tmp_path / "hub", "t", [data])
    assert _version(tmp_path / "hub", "t") is None


def test_jsonl_mixed_column_in_the_first_block(tmp_path: Path) -> None:
    data = _text(tmp_path / "m.jsonl", '{"id":1,"x":1}\n{"id":2,"x":"abc"}\n')
    with pytest.raises(DataHubError, match=r"m\.jsonl: line 2: column 'x' is number in the "
                                           "lines before and string"):
        ingest(tmp_path / "hub", "t", [data])


# 12-15. Messages.

def test_uint64_out_of_range_names_file_and_column(tmp_path: Path) -> None:
    data = tmp_path / "u.parquet"
    pq.write_table(pa.table({"id": [1], "u": pa.array([2 ** 64 - 1], pa.uint64())}), data)
    with pytest.raises(DataHubError, match=r"u\.parquet: column 'u' \(uint64\)") as info:
        ingest(tmp_path / "hub", "t", [data])
    assert "append" not in str(info.value)


@pytest.mark.parametrize("text", ["", "id,x,name", "id,x,name\n"])
def test_empty_csv_says_no_rows(tmp_path: Path, text: str) -> None:
    data = _text(tmp_path / "e.csv", text)
    with pytest.raises(DataHubError, match=r"e\.csv: .*(no rows|empty)") as info:
        ingest(tmp_path / "hub", "t", [data])
    assert "row 0" not in str(info.value) and "Fix or remove that row" not in str(info.value)


def test_csv_fixed_size_arrays_parse_as_documented(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    data = _text(tmp_path / "a.csv", 'id,v\n1,"[1,2,3]"\n3,"[4, 5, 6.5]"\n')
    ingest(hub, "t", [data], types=parse_types(["v=float32[3]"]))
    table = open_table(hub, "t").dataset.to_table()
    assert table.schema.field("v").type == pa.list_(pa.float32(), 3)
    assert table["v"].to_pylist() == [[1, 2, 3], [4, 5, 6.5]]
    ingest(hub, "t", [data])  # an append reads the table's FLOAT[3]
    wrong = _text(tmp_path / "w.csv", 'id,v\n1,"[1,2,3]"\n2,"[1,2]"\n')
    with pytest.raises(DataHubError, match=r"w\.csv: line 3: column 'v': an array of 2 "
                                           "values where .* gives 3"):
        ingest(hub, "t", [wrong])
    text = _text(tmp_path / "x.csv", 'id,v\n1,"[1,2,3]"\n2,abc\n')
    with pytest.raises(DataHubError, match=r"x\.csv: line 3: column 'v': a value is not a "
                                           "JSON array"):
        ingest(hub, "t", [text])
    empty = _text(tmp_path / "e.csv", 'id,v\n1,"[1,2,3]"\n2,\n')
    with pytest.raises(DataHubError, match=r"e\.csv: line 3: column 'v': an empty value"):
        ingest(hub, "t", [empty])
    assert _version(hub, "t") == 1


def test_naive_timestamps_name_the_fix(tmp_path: Path) -> None:
    data = _text(tmp_path / "n.csv", "id,t\n1,2026-01-01T10:00:00Z\n2,2026-01-01 10:00:00\n")
    with pytest.raises(DataHubError, match=r"n\.csv: line 3: column 't': the value "
                                           r"'2026-01-01 10:00:00' has no time zone.*"
                                           r"--type t=timestamp\[us\]"):
        ingest(tmp_path / "hub", "t", [data], types=parse_types(["t=timestamp"]))
