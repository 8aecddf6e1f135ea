"""`arf datahub ingest | tables | describe` with real files: Parquet, CSV, Arrow IPC, folders,
Delta; versions, schema clashes, bad rows, missing files, a SIGKILLed ingest, array columns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from arf_trainer.cli import main as trainer_main
from arf_trainer.datahub import sources
from arf_trainer.datahub.describe import describe_table, list_summaries
from arf_trainer.datahub.ingest import ingest
from arf_trainer.datahub.tables import open_table, write_table
from arf_trainer.errors import DataHubError


def _episodes(n: int, first: int = 0) -> pa.Table:
    rng = np.random.default_rng(first)
    return pa.table({
        "episode_id": pa.array(np.arange(first, first + n) // 10, pa.int64()),
        "step": pa.array(np.arange(n) % 10, pa.int32()),
        "reward": pa.array(rng.random(n)),
        "robot": pa.array([f"arm{i % 3}" for i in range(n)]),
    })


def _arrays(n: int) -> pa.Table:
    """A FLOAT[7] joint vector and a uint8[4][4][3] image with values above 127."""
    rng = np.random.default_rng(1)
    joints = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 7, dtype=np.float32)), 7)
    pixels = pa.array(rng.integers(0, 256, n * 48, dtype=np.uint8))
    image = pixels
    for size in (3, 4, 4):
        image = pa.FixedSizeListArray.from_arrays(image, size)
    return pa.table({"episode_id": pa.array(np.arange(n), pa.int64()), "joints": joints,
                     "image": image})


def _rows(hub: Path, name: str, version: int | None = None) -> pa.Table:
    table = open_table(hub, name, version).dataset.to_table()
    keys = [c for c in ("episode_id", "step") if c in table.column_names]
    return table.sort_by([(c, "ascending") for c in keys])


def _version(hub: Path, name: str) -> int:
    return DeltaTable(str(hub / name)).version()


def test_parquet_csv_arrow_and_folder(tmp_path: Path) -> None:
    hub, data = tmp_path / "hub", tmp_path / "in"
    (data / "more" / "deeper").mkdir(parents=True)
    parts = [_episodes(40, first) for first in (0, 40, 80, 120, 160)]
    pq.write_table(parts[0], data / "a.parquet")
    pacsv.write_csv(parts[1], data / "more" / "b.csv")
    with pa.OSFile(str(data / "more" / "c.arrow"), "wb") as sink:  # IPC file format
        with pa.ipc.new_file(sink, parts[2].schema) as writer:
            writer.write_table(parts[2], max_chunksize=7)
    with pa.OSFile(str(data / "more" / "deeper" / "d.arrows"), "wb") as sink:  # IPC stream
        with pa.ipc.new_stream(sink, parts[3].schema) as writer:
            writer.write_table(parts[3])
    (data / "_SUCCESS").write_text("")
    result = ingest(hub, "demos", [data])
    assert (result.version, result.rows, result.files) == (0, 160, 4)
    assert _rows(hub, "demos").equals(pa.concat_tables(parts[:4]))
    delta_src = tmp_path / "src_delta"
    write_table(tmp_path, "src_delta", parts[4])
    assert ingest(hub, "demos", [delta_src]).version == 1  # a Delta table by path
    assert _rows(hub, "demos").equals(pa.concat_tables(parts))


def test_append_overwrite_versions_and_schema_clash(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    first, second = _episodes(20), _episodes(20, 20)
    pq.write_table(first, tmp_path / "1.parquet")
    pq.write_table(second.select(["robot", "reward", "step", "episode_id"]),
                   tmp_path / "2.parquet")  # same columns, another order
    assert ingest(hub, "t", [tmp_path / "1.parquet"]).version == 0
    assert ingest(hub, "t", [tmp_path / "2.parquet"]).version == 1
    clash = first.drop_columns(["robot"]).append_column("gripper", pa.array([0.5] * 20))
    clash = clash.set_column(1, "step", pa.array(np.arange(20), pa.float64()))
    pq.write_table(clash, tmp_path / "clash.parquet")
    with pytest.raises(DataHubError) as err:
        ingest(hub, "t", [tmp_path / "clash.parquet"])
    message = str(err.value)
    assert "missing column 'robot'" in message and "extra column 'gripper'" in message
    assert "column 'step' is double in the input but int32 in the table" in message
    assert "--mode overwrite" in message
    assert _version(hub, "t") == 1
    over = ingest(hub, "t", [tmp_path / "clash.parquet"], mode="overwrite")
    assert (over.version, over.rows) == (2, 20)
    assert _rows(hub, "t").column_names == clash.column_names
    assert _rows(hub, "t", 1).equals(pa.concat_tables([first, second]))  # old versions stay


def test_bad_csv_rows_name_file_and_line(tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    good = tmp_path / "good.csv"
    pacsv.write_csv(_episodes(30), good)
    assert ingest(hub, "t", [good]).version == 0
    # A short row after many good ones: read in small blocks, so the write has already streamed
    # earlier rows to delta-rs when the bad one comes.
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 512)
    lines = good.read_text().splitlines()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines + ["3,4,0.5"] + lines[1:]) + "\n")
    with pytest.raises(DataHubError, match=r"short\.csv: line 32: Expected 4 columns, got 3"):
        ingest(hub, "t", [good, short])
    typed = tmp_path / "typed.csv"  # an int column with a text value, checked against the table
    typed.write_text("\n".join(lines + ['3,oops,0.5,"arm1"']) + "\n")
    with pytest.raises(DataHubError,
                       match=r"typed\.csv: line 32: column 'step': .*int64.*'oops'"):
        ingest(hub, "t", [typed])
    assert _version(hub, "t") == 0 and _rows(hub, "t").num_rows == 30


def test_missing_or_unreadable_inputs_write_nothing(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    pq.write_table(_episodes(10), tmp_path / "a.parquet")
    with pytest.raises(DataHubError, match="nope.parquet does not exist"):
        ingest(hub, "t", [tmp_path / "a.parquet", tmp_path / "nope.parquet"])
    assert not (hub / "t" / "_delta_log").exists()
    ingest(hub, "t", [tmp_path / "a.parquet"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataHubError, match=r"no known format: .*notes\.txt"):
        ingest(hub, "t", [tmp_path])
    pq.write_table(_episodes(10).drop_columns(["robot"]), tmp_path / "b.parquet")
    with pytest.raises(DataHubError, match=r"b\.parquet does not have the columns of .*a\.parquet"
                                           r": missing column 'robot'"):
        ingest(hub, "t", [tmp_path / "a.parquet", tmp_path / "b.parquet"])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataHubError, match=r"broken\.parquet: not a readable parquet file"):
        ingest(hub, "t", [tmp_path / "broken.parquet"])
    assert _version(hub, "t") == 0 and _rows(hub, "t").num_rows == 10


def _open_inputs(pid: int, inputs: list[Path]) -> set[Path]:
    opened = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            opened.add(Path(os.readlink(fd)))
        except OSError:
            continue
    return opened & set(inputs)


def test_ingest_killed_mid_write_leaves_previous_version(tmp_path: Path) -> None:
    hub, data = tmp_path / "hub", tmp_path / "in"
    data.mkdir()
    base = _episodes(50)
    ingest(hub, "t", [_write(base, tmp_path / "base.parquet")])
    # The last input is large and in small row groups, so it stays open long enough (hundreds
    # of milliseconds, read batch by batch) to be seen: a 100,000-row last file was open for
    # a few milliseconds only, and on a quiet machine the poll could miss it.
    sizes = [100_000, 100_000, 100_000, 1_000_000]
    inputs = [_write(_episodes(n, 10**7 * (i + 1)), data / f"{i}.parquet", row_group_size=10_000)
              for i, n in enumerate(sizes)]
    proc = subprocess.Popen([sys.executable, "-m", "arf_trainer.cli", "datahub", "ingest",
                             "--hub", str(hub), "t", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    # The commit comes after the last input is read: with the last of four files open, the
    # first three have been handed to the Delta writer and nothing is committed yet.
    while not _open_inputs(proc.pid, inputs[3:]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert _version(hub, "t") == 0
    assert _rows(hub, "t").equals(base)
    again = ingest(hub, "t", [data])
    assert (again.version, again.rows) == (1, sum(sizes))
    assert _rows(hub, "t").num_rows == sum(sizes) + 50


def _write(table: pa.Table, path: Path, **options: Any) -> Path:
    pq.write_table(table, path, **options)
    return path


def test_array_columns_round_trip(tmp_path: Path) -> None:
    hub, arrays = tmp_path / "hub", _arrays(12)
    with pa.OSFile(str(tmp_path / "a.feather"), "wb") as sink:
        with pa.ipc.new_file(sink, arrays.schema) as writer:
            writer.write_table(arrays)
    ingest(hub, "frames", [_write(arrays, tmp_path / "a.parquet")])
    ingest(hub, "frames", [tmp_path / "a.feather"])
    back = open_table(hub, "frames").dataset
    assert back.schema.field("joints").type == pa.list_(pa.float32(), 7)
    assert back.schema.field("image").type == arrays.schema.field("image").type
    assert back.to_table().select(arrays.column_names).equals(
        pa.concat_tables([arrays, arrays]))
    types = duckdb.sql("SELECT DISTINCT typeof(joints), typeof(image) FROM back").fetchall()
    assert types == [("FLOAT[7]", "UTINYINT[3][4][4]")]
    brightest = duckdb.sql("SELECT max(image[1][1][1]) FROM back").fetchall()[0][0]
    assert brightest == max(row[0][0][0] for row in arrays.column("image").to_pylist()) > 127
    info = describe_table(hub, "frames")
    assert {c["name"]: c["type"] for c in info["columns"]} == {
        "episode_id": "int64", "joints": "float[7]", "image": "uint8[4][4][3]"}


def test_partition_by(tmp_path: Path) -> None:
    hub, table = tmp_path / "hub", _episodes(30)
    path = _write(table, tmp_path / "a.parquet")
    with pytest.raises(DataHubError, match="--partition-by 'robt' is not a column"):
        ingest(hub, "t", [path], partition_by=["robt"])
    ingest(hub, "t", [path], partition_by=["robot"])
    assert sorted(p.name for p in (hub / "t").glob("robot=*")) == ["robot=arm0", "robot=arm1",
                                                                   "robot=arm2"]
    assert ingest(hub, "t", [path]).version == 1  # the table's partitioning is kept
    with pytest.raises(DataHubError, match="partitioned by \\['robot'\\] with --partition-by"):
        ingest(hub, "t", [path], partition_by=["step"])
    assert _rows(hub, "t").select(table.column_names).equals(
        pa.concat_tables([table, table]).sort_by([("episode_id", "ascending"),
                                                  ("step", "ascending")]))
    assert describe_table(hub, "t")["partition_columns"] == ["robot"]
    # Prepare's stream (query._bounded_scan) reads a partitioned table with its partition
    # values, and filters on them, as the plain dataset does.
    from arf_trainer.datahub.query import _sandbox

    sql = "SELECT robot, episode_id, step FROM t WHERE robot <> 'arm1' ORDER BY ALL"
    results = []
    for bounded in (False, True):
        con = _sandbox({"t": open_table(hub, "t")}, "64MiB", 1, bounded_scan=bounded)
        results.append(con.execute(sql).fetchall())
        con.close()
    assert results[0] == results[1] and {r[0] for r in results[1]} == {"arm0", "arm2"}


def test_trainer_cli_ingest_tables_describe(tmp_path: Path, capsys) -> None:
    hub = tmp_path / "hub"
    path = _write(_arrays(5), tmp_path / "a.parquet")
    assert trainer_main(["datahub", "tables", "--hub", str(hub)]) == 0
    assert "no tables in the data hub" in capsys.readouterr().out
    assert trainer_main(["datahub", "ingest", "--hub", str(hub), "frames", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "frames: version 0 (append, 5 rows from 1 file)"
    assert trainer_main(["datahub", "ingest", "--hub", str(hub), "frames", str(path),
                         "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert trainer_main(["datahub", "tables", "--hub", str(hub), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"table": "frames", "version": 1, "rows": 10, "columns": 3}]
    assert trainer_main(["datahub", "describe", "--hub", str(hub), "frames", "--version",
                         "0"]) == 0
    text = capsys.readouterr().out
    assert "version 0 (latest 1; versions 0-1)" in text and "rows 5 " in text
    assert "joints      float[7]" in text and "image       uint8[4][4][3]" in text
    assert f"WRITE append  +5 rows  (ingest)  from {path}" in text
    assert trainer_main(["datahub", "describe", "--hub", str(hub), "frames", "--version",
                         "7"]) == 2
    assert "has no version 7; versions available: 0, 1" in capsys.readouterr().err
    assert list_summaries(tmp_path / "nothing") == []


def test_arf_cli_runs_the_container_side(tmp_path: Path, monkeypatch, capfd) -> None:
    from arf_training.cli import main as arf_main

    hub = tmp_path / "hub"
    monkeypatch.setenv("ARF_DATAHUB_URI", str(hub))
    monkeypatch.chdir(tmp_path)
    _write(_episodes(7), tmp_path / "e.parquet")
    # Two runs of the container side (a process each): the arguments and exit codes pass through.
    assert arf_main(["datahub", "ingest", "eps", "e.parquet", "--partition-by", "robot"]) == 0
    assert "eps: version 0 (append, 7 rows from 1 file)" in capfd.readouterr().out
    assert DeltaTable(str(hub / "eps")).metadata().partition_columns == ["robot"]
    assert arf_main(["datahub", "describe", "eps", "--version", "3"]) == 2
    assert "'eps' has no version 3; versions available: 0" in capfd.readouterr().err


def test_arf_cli_seed_passes_collected_at(tmp_path: Path, monkeypatch, capfd) -> None:
    from arf_training.cli import main as arf_main

    hub = tmp_path / "hub"
    monkeypatch.setenv("ARF_DATAHUB_URI", str(hub))
    when = "2026-11-26T01:00:00+00:00"
    assert arf_main(["datahub", "seed", "--episodes", "1", "--collected-at", when]) == 0
    times = _rows(hub, "reach_demos")["collected_at"].to_pylist()
    assert {t.isoformat() for t in times} == {when}
    assert arf_main(["datahub", "seed", "--force", "--episodes", "1",
                     "--collected-at", "2026-11-26"]) == 2
    assert "'2026-11-26' has no time zone" in capfd.readouterr().err
    assert _version(hub, "reach_demos") == 0  # the refused seeding wrote nothing


def test_trainer_cli_seed_sites_names_bad_arguments(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        trainer_main(["datahub", "seed-sites", "--site", "north", "--site", "b=x"])
    assert exit_.value.code == 2
    assert "'north': give NAME=HUB" in capsys.readouterr().err
    sites = ["--site", f"a={tmp_path / 'a'}", "--site", f"a={tmp_path / 'b'}"]
    assert trainer_main(["datahub", "seed-sites", *sites]) == 2
    assert "--site names must be unique, got ['a', 'a']" in capsys.readouterr().err
    sites[-1] = f"b={tmp_path / 'b'}"
    assert trainer_main(["datahub", "seed-sites", *sites, "--episodes", "1"]) == 2
    assert "episodes=1 must be an integer >= the number of sites (2)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing written
