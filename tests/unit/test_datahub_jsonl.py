"""`arf datahub ingest` of JSON Lines (`.jsonl`, `.ndjson`, gzipped): one object per line, an
array column made fixed-size with `--type joints=float32[7]` (arf_trainer.datahub.jsonl).
Real files, real Delta tables."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest

from arf_trainer.datahub import jsonl
from arf_trainer.datahub.column_types import parse_types
from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.tables import open_table
from arf_trainer.errors import DataHubError


def _rows(start: int, count: int) -> list[dict]:
    return [{"episode": i // 10, "step": i % 10, "joints": [i + k / 8 for k in range(7)],
             "ok": i % 3 == 0} for i in range(start, start + count)]


def _write(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def _table(hub: Path) -> pa.Table:
    return open_table(hub, "eps").dataset.to_table().sort_by([("episode", "ascending"),
                                                             ("step", "ascending")])


def test_json_lines_with_a_fixed_size_array_column(tmp_path: Path) -> None:
    files = [_write(tmp_path / "a.jsonl", _rows(0, 20)),
             _write(tmp_path / "b.ndjson.gz", _rows(20, 20))]
    result = ingest(tmp_path / "hub", "eps", files, types=parse_types(["joints=float32[7]"]))
    table = _table(tmp_path / "hub")
    assert result.rows == 40 and result.files == 2
    assert table.schema.field("joints").type == pa.list_(pa.float32(), 7)
    assert table.schema.field("step").type == pa.int64()
    assert table.schema.field("ok").type == pa.bool_()
    assert table.column("joints")[21].as_py() == pytest.approx([21 + k / 8 for k in range(7)])
    # An append takes the table's FLOAT[7] without --type.
    ingest(tmp_path / "hub", "eps", [_write(tmp_path / "c.jsonl", _rows(40, 5))])
    assert _table(tmp_path / "hub").num_rows == 45


def test_an_array_of_another_length_is_refused(tmp_path: Path) -> None:
    rows = _rows(0, 5)
    rows[3]["joints"] = rows[3]["joints"][:6]
    with pytest.raises(DataHubError, match=r"a\.jsonl: column 'joints' \(list<item: float>\) "
                                           r"cannot be read as fixed_size_list.*\[7\]"):
        ingest(tmp_path / "hub", "eps", [_write(tmp_path / "a.jsonl", rows)],
               types=parse_types(["joints=float32[7]"]))
    assert not (tmp_path / "hub" / "eps" / "_delta_log").exists()


def test_a_late_value_of_another_type_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 512)  # types from the first rows only
    rows = _rows(0, 40)
    rows[-1]["step"] = 9.5
    path = _write(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataHubError, match=r"a\.jsonl: line 40: column 'step' is read as "
                                           r"integer .*9\.5.*--type step=float64"):
        ingest(tmp_path / "hub", "eps", [path], types=parse_types(["joints=float32[7]"]))
    ingest(tmp_path / "hub", "eps", [path], types=parse_types(["joints=float32[7]",
                                                               "step=float64"]))
    assert _table(tmp_path / "hub").column("step").to_pylist()[-1] == 9.5


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n{"x": oops}\n')
    with pytest.raises(DataHubError, match=r"a\.jsonl: line 2: not a complete JSON object"):
        ingest(tmp_path / "hub", "eps", [path])
