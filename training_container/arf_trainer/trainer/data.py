"""The prepare step's shards as the trainer sees them: the manifest, columns as NumPy arrays,
the in-memory loader, and the automatic choice between it and the streaming one (stream.py).

Batch interface (what a recipe receives; the same for both loaders). The data part reads the
manifest's ``features`` and ``targets`` columns and hands them to
``Recipe.columns_to_tensors(info, columns, split)`` as ``columns: dict[str, np.ndarray]``, one
entry per column name, each ``[N, *shape]`` in the dtype it is stored in: a scalar DOUBLE
column is float64 ``[N]``, a DuckDB ``FLOAT[7]`` float32 ``[N, 7]``, a ``UTINYINT[64][64][3]``
image uint8 ``[N, 64, 64, 3]`` (Arrow fixed_size_list, nested for more dimensions). The recipe
returns ``(inputs, targets)``: tensors, or for ``inputs`` a dict of tensors by name (a vision
recipe keeps frames uint8 and normalizes them in the model); the loop moves them to the device
and calls ``net(inputs)`` / ``model(inputs)`` with that one argument. The model's shape comes
from ``Recipe.describe_data(manifest, ...)``, which sees the manifest's column dtypes/shapes.
``columns_to_tensors`` must be row-wise: it is called on a whole split (in memory) or on a
window of rows (streaming), and both must give the same rows. The MLP recipes flatten array columns into their float32 feature vector
(`feature_matrix`).

Loading mode (`training.data_loading`, recorded as the MLflow param ``data_loading``):
``memory`` reads both splits whole, ``stream`` reads windows of rows (stream.py), ``auto``
(default) picks memory when the decoded columns fit a budget of a quarter of
``training.resources.memory`` (1 GiB when unset), else stream.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arf_trainer.datahub.shards import sha256_file
from arf_trainer.errors import DataMismatchError, TrainingError
from arf_trainer.spec import memory_bytes, read_json

EVAL_CHUNK = 4096
DEFAULT_BUDGET = 2**30
"""Decoded data `auto` reads whole when training.resources.memory is unset."""
PROCESS_BYTES = 768 * 2**20
"""What a train step holds besides its data (torch, pyarrow and MLflow loaded, an MLflow run,
the stream's window): measured 0.9 GB peak streaming 620k x 52 float64 rows."""

Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class Manifest:
    """prepare/manifest.json, checked for what training needs (see datahub/prepare.py)."""

    path: Path
    raw: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def features(self) -> list[str]:
        return list(self.raw["features"])

    @property
    def targets(self) -> list[str]:
        return list(self.raw["targets"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self.raw["shards"].get(split, []))

    def rows(self, split: str) -> int:
        return sum(int(s["rows"]) for s in self.shards(split))

    def row_bytes(self) -> int:
        """Decoded bytes of one row of the feature and target columns (an estimate from the
        manifest's "columns": dtype and shape; at least 4 bytes an element, as the MLP
        recipes hold features as float32; 8 when the dtype is not recorded)."""
        wanted = set(self.features + self.targets)
        total = 0
        for column in self.raw.get("columns", []):
            if column.get("name") in wanted:
                try:
                    itemsize = np.dtype(column.get("dtype") or "float64").itemsize
                except TypeError:
                    itemsize = 8
                total += max(itemsize, 4) * math.prod(column.get("shape") or [])
        return max(total, 8 * len(wanted))


class PreparedDataError(TrainingError):
    """The prepared data (manifest, shards) is missing, malformed or changed after prepare:
    a retry of train reads the same files, so it is bad input (exit 2), fixed by rerunning
    prepare."""

    exit_code = 2


def load_manifest(prepare_dir: Path) -> Manifest:
    path = prepare_dir / "manifest.json"
    if not path.is_file():
        raise PreparedDataError(f"no prepared data at {path}; the prepare step must run "
                                "first in the same workspace")
    try:
        manifest = Manifest(path, read_json(path))
    except (OSError, ValueError, RecursionError) as exc:
        raise PreparedDataError(f"manifest {path} cannot be read as JSON ({exc}); rerun "
                                "prepare") from exc
    _check_manifest(manifest)
    if manifest.rows("train") == 0:
        raise PreparedDataError(f"the training split in {path} has no rows; the dataset "
                                "query selected nothing, or validation_split took every row")
    return manifest


def _check_manifest(manifest: Manifest) -> None:
    """The fields training reads, with their types; a shard path stays inside prepare/."""
    raw, path = manifest.raw, manifest.path

    def bad(field: str, value: Any, want: str) -> PreparedDataError:
        return PreparedDataError(f"manifest {path} has {field}={value!r:.100}, expected {want}; "
                                 "rerun prepare with a matching arf-trainer")

    if not isinstance(raw, dict):
        raise bad("(the whole file)", raw, "a JSON object")
    for field in ("features", "targets"):
        names = raw.get(field)
        if not isinstance(names, list) or not names \
                or not all(isinstance(n, str) and n for n in names):
            raise bad(field, names, "a non-empty list of column names "
                      "(dataset.features/targets)")
    shards = raw.get("shards")
    if not isinstance(shards, dict):
        raise bad("shards", shards, "an object of split name -> list of shards")
    for split in ("train", "val"):
        listed = shards.get(split, [])
        if not isinstance(listed, list):
            raise bad(f"shards.{split}", listed, "a list of shards")
        for i, shard in enumerate(listed):
            where = f"shards.{split}[{i}]"
            if not isinstance(shard, dict):
                raise bad(where, shard, "an object with path, rows, sha256")
            rel = shard.get("path")
            if not isinstance(rel, str) or not rel or Path(rel).is_absolute() \
                    or ".." in Path(rel).parts:
                raise bad(f"{where}.path", rel, "a relative path inside prepare/")
            rows = shard.get("rows")
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
                raise bad(f"{where}.rows", rows, "a row count >= 0")
            # Absent: not checked (prepare always writes one; tests' hand-made manifests not).
            digest = shard.get("sha256")
            if digest is not None and not (isinstance(digest, str)
                                           and re.fullmatch(r"[0-9a-f]{64}", digest)):
                raise bad(f"{where}.sha256", digest, "the shard's sha256 (64 hex digits)")


def choose_loading(requested: str, manifest: Manifest, memory: str | None) -> tuple[str, str]:
    """(memory | stream, why): the template's choice, or auto by size against a budget."""
    if requested != "auto":
        return requested, f"training.data_loading: {requested}"
    # Read whole, the data is held about twice (the columns, and the recipe's float32 copy):
    # measured 480 MiB more than streaming for 246 MiB of float64 columns. So half of what the
    # ceiling leaves besides the process itself (a quarter of the ceiling went past 1Gi there).
    ceiling = memory_bytes(memory) if memory else None
    budget = DEFAULT_BUDGET if ceiling is None else max(0, ceiling - PROCESS_BYTES) // 2
    need = (manifest.rows("train") + manifest.rows("val")) * manifest.row_bytes()
    mode = "memory" if need <= budget else "stream"
    return mode, f"auto: ~{need / 2**20:.1f} MiB decoded vs a budget of {budget / 2**20:.0f} MiB"


# -- columns --------------------------------------------------------------------------------

def checked_shard(manifest: Manifest, shard: Mapping[str, Any]) -> Path:
    """The shard's path, after checking it exists, matches its sha256 in the manifest, and
    holds the manifest's row count and the feature and target columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = manifest.folder / shard["path"]
    if not path.is_file():
        raise PreparedDataError(f"shard {path} listed in the manifest is missing; rerun "
                                "prepare")
    if shard.get("sha256") is not None and sha256_file(path) != shard["sha256"]:
        raise PreparedDataError(f"shard {path} does not match its sha256 in the manifest: the "
                                "prepared data changed after prepare ran; rerun prepare")
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise PreparedDataError(f"shard {path} is not a readable Parquet file ({exc}); rerun "
                                "prepare") from exc
    names = meta.schema.to_arrow_schema().names
    missing = [n for n in manifest.features + manifest.targets if n not in names]
    if missing or meta.num_rows != shard["rows"]:
        raise PreparedDataError(
            f"shard {path} does not match the manifest: {meta.num_rows} rows (manifest: "
            f"{shard['rows']}){f', no column(s) {missing}' if missing else ''}; the manifest "
            "was edited after prepare ran: rerun prepare")
    return path


class DataValueError(PreparedDataError):
    """A feature or target value no built-in recipe can train on (null, NaN, infinite): one
    such value makes every loss and weight NaN. Bad input (exit 2), fixed in the dataset
    query."""


Locate = Callable[[int], str]
"""Row i of a column read -> where it is, for a message (its shard, row and order_by key)."""


def column_array(column: Any, name: str, where: str, locate: Locate | None = None) -> np.ndarray:
    """An Arrow (chunked) column as ``[N, *shape]`` NumPy: fixed_size_list (nested) become
    trailing dimensions, in the element's stored dtype. A null, NaN or infinite value (an
    element of an array column too) is refused, naming the row (`locate`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    locate = locate or (lambda i: f"row {i} of {where}")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        row = pc.index(column.is_null(), True).as_py()
        raise DataValueError(
            f"column {name!r} has {column.null_count} null value(s) in {where}, the first at "
            f"{locate(row)}; filter or fill them in the dataset query (e.g. WHERE {name} IS NOT "
            f"NULL, or coalesce({name}, 0)) and rerun prepare")
    shape = []
    while pa.types.is_fixed_size_list(column.type):
        shape.append(column.type.list_size)
        # .values ignores the slice offset; flatten() honours it
        column = column.flatten()
        if column.null_count:
            element = pc.index(column.is_null(), True).as_py()
            raise DataValueError(
                f"column {name!r} has a null array element in {where}, at "
                f"{locate(element // math.prod(shape))}; fill them in the dataset query and "
                "rerun prepare")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        raise DataMismatchError(f"column {name!r} in {where} holds variable-length lists "
                            f"({column.type}); cast it to a fixed-size array in the dataset "
                            "query, e.g. CAST(col AS FLOAT[7])")
    values = column.to_numpy(zero_copy_only=False)
    if not values.flags.writeable:  # a view of Arrow's buffer: torch.from_numpy wants to own it
        values = values.copy()
    values = values.reshape(-1, *shape) if shape else values
    _check_finite(values, name, where, locate)
    return values


def _check_finite(values: np.ndarray, name: str, where: str, locate: Locate) -> None:
    """NaN or +-inf trains silently into NaN weights (measured: exit 0, train_loss nan)."""
    if values.dtype.kind != "f" or np.isfinite(values).all():
        return
    flat = values.reshape(len(values), -1)
    finite = np.isfinite(flat)
    row = int(np.argmin(finite.all(axis=1)))
    value = flat[row][~finite[row]][0]
    raise DataValueError(
        f"column {name!r} holds {value} in {where}, at {locate(row)}; NaN and infinite values "
        f"make every loss and weight NaN: filter them in the dataset query (e.g. WHERE "
        f"isfinite({name})) or replace them, and rerun prepare")


def shard_row(manifest: Manifest, shard: Mapping[str, Any], row: int) -> str:
    """'row R of shard PATH (key=value, ...)': the manifest's order_by key, when it has one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = manifest.folder / shard["path"]
    text = f"row {row} of shard {path}"
    key = manifest.raw.get("order_by") or []
    try:
        values = pq.read_table(path, columns=list(key)).slice(row, 1).to_pylist() if key else []
    except (OSError, KeyError, pa.ArrowException):  # only a detail of the message
        values = []
    if values:
        text += " (" + ", ".join(f"{k}={v!r}" for k, v in values[0].items()) + ")"
    return text


def read_table_columns(table: Any, names: list[str], where: str,
                       locate: Locate | None = None) -> dict[str, np.ndarray]:
    return {name: column_array(table.column(name), name, where, locate) for name in names}


def feature_matrix(columns: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    """float32 ``[N, width]``: the named columns, array columns flattened, in order."""
    parts = []
    for n in names:
        try:
            parts.append(np.asarray(columns[n], dtype=np.float32).reshape(len(columns[n]), -1))
        except (TypeError, ValueError) as exc:
            raise DataMismatchError(f"feature column {n!r} holds {columns[n].dtype} values, not "
                                f"numbers ({exc}); cast it in the dataset query, or leave it "
                                "out of dataset.features") from exc
    return np.concatenate(parts, axis=1) if len(parts) > 1 else np.ascontiguousarray(parts[0])


def target_matrix(columns: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    """``[N, n]`` of the target columns in their dtype (labels may be strings); array target
    columns are flattened (then float32)."""
    if all(columns[n].ndim == 1 for n in names):
        return np.stack([columns[n] for n in names], axis=1)
    return feature_matrix(columns, names)


READ_BYTES = 8 * 2**20
"""Decoded bytes of one Parquet read batch (the trainer reads no more than this at a time)."""


def read_rows(manifest: Manifest) -> int:
    """Rows of a read batch: READ_BYTES of the manifest's estimated decoded row."""
    return max(1, min(65_536, READ_BYTES // manifest.row_bytes()))


def read_split(manifest: Manifest, split: str, names: list[str]) -> dict[str, np.ndarray]:
    """Every shard of a split, whole (sha256-checked): the in-memory loader's read. Batch by
    batch into arrays of the split's size, so the peak is the split once and one batch (the
    shards' Arrow tables, their concatenation and its NumPy copy held it 3x, and Parquet's
    decoding of a whole 176 MB shard of frames took 1.5 GB more)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out: dict[str, np.ndarray] = {}
    total, start, size = manifest.rows(split), 0, read_rows(manifest)
    for shard in manifest.shards(split):
        path, first = checked_shard(manifest, shard), 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=size, columns=names):
                columns = read_table_columns(
                    batch, names, f"the {split} split",
                    lambda i, s=shard, at=first: shard_row(manifest, s, at + i))
                for name, values in columns.items():
                    if name not in out:
                        out[name] = np.empty((total, *values.shape[1:]), dtype=values.dtype)
                    out[name][start:start + len(values)] = values
                start, first = start + batch.num_rows, first + batch.num_rows
        except (pa.ArrowInvalid, KeyError) as exc:
            raise TrainingError(f"cannot read columns {names} from shard {path}: {exc}") from exc
    if not out and manifest.shards(split):  # shards of no rows: empty columns of their types
        path = checked_shard(manifest, manifest.shards(split)[0])
        return read_table_columns(pq.read_table(path, columns=names), names, f"the {split} split")
    return out


# -- pytrees of tensors (inputs may be a dict by column name) -------------------------------

def take(value: Inputs, index: torch.Tensor | slice) -> Inputs:
    if isinstance(value, dict):
        return {k: v[index] for k, v in value.items()}
    return value[index]


def to_device(value: Inputs, device: torch.device) -> Inputs:
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


def concat(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    return torch.cat(values)


def rows_of(value: Inputs) -> int:
    return len(next(iter(value.values()))) if isinstance(value, dict) else len(value)


def chunks(x: Inputs, y: torch.Tensor, size: int = EVAL_CHUNK) -> Iterator[tuple[Inputs, Any]]:
    for start in range(0, len(y), size):
        yield take(x, slice(start, start + size)), y[start:start + size]
