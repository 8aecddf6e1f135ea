"""A LeRobot dataset's metadata, read and checked before a row is converted.

`read_meta` reads `meta/info.json` (codebase version, features, `video_path`, `chunks_size`,
the `total_*` counts), the tasks (`meta/tasks.parquet` or `tasks.jsonl`) and, for a v3.0
dataset with videos, where each episode's frames are (`meta/episodes/`). `data_files` lists
the data files and checks their rows against info.json's `total_frames`. `is_dataset` tells a
LeRobot dataset (with or without its info.json) from a folder of loose data files.

Everything here fails early, naming the file, the field and the fix: an info.json that is not
a JSON object, a count written as a string or a `chunks_size` of 0, a missing info.json or
data file, a partly downloaded dataset. Left unchecked, each would fail later, deep inside the
frame conversion (`arf_trainer.datahub.lerobot`), or ingest a silently short table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from arf_trainer.errors import DataHubError

INFO = Path("meta") / "info.json"
VERSIONS = ("v2.0", "v2.1", "v3.0")
# info.json's counts (lerobot writes each as a JSON number): a count of another type is an
# error, never read as absent, since total_frames feeds the completeness check.
COUNTS = ("total_episodes", "total_frames", "total_tasks", "total_videos", "total_chunks")
DEFAULT_CHUNKS_SIZE = 1000  # lerobot's, when info.json gives none
# meta/ files that only a LeRobot dataset holds (v2.x and v3.0): with them, or a videos/ or
# data/chunk-* folder, a folder without meta/info.json is a LeRobot dataset missing it.
_META_FILES = ("tasks.jsonl", "tasks.parquet", "episodes.jsonl", "episodes", "stats.json",
               "episodes_stats.jsonl")


@dataclass(frozen=True)
class LeRobotMeta:
    """What meta/ says about a dataset: its features, videos, tasks and episodes."""

    root: Path
    version: str
    features: dict[str, dict[str, Any]]
    video_path: str | None
    chunks_size: int
    tasks: dict[int, str]
    # v3.0: episode -> {video key: (chunk_index, file_index, from_timestamp)}
    episodes: dict[int, dict[str, tuple[int, int, float]]]
    total_frames: int | None = None  # what info.json says the dataset holds
    # --frames video: the table folder whose video store keeps the MP4s (None: PNG frames)
    video_store: Path | None = None

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "image"]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.features[key].get("shape") or ())


def is_dataset(path: Path) -> bool:
    """A folder with meta/info.json, or laid out as a LeRobot dataset without it (for which
    `read_meta` says that info.json is missing, not that its MP4s are of no known format)."""
    return path.is_dir() and ((path / INFO).is_file() or bool(_layout(path)))


def _layout(path: Path) -> list[str]:
    """What marks `path` as a LeRobot dataset besides meta/info.json (empty: nothing)."""
    marks = [f"meta/{name}" for name in _META_FILES if (path / "meta" / name).exists()]
    if (path / "videos").is_dir() and any((path / "videos").rglob("*.mp4")):
        marks.append("videos/")
    marks += [f"data/{p.name}/" for p in sorted((path / "data").glob("chunk-*")) if p.is_dir()]
    return marks[:4]


def read_meta(root: Path) -> LeRobotMeta:
    """The dataset's metadata, checked; errors name the file and the field."""
    info_path = root / INFO
    if not info_path.exists():
        raise DataHubError(
            f"{root}: looks like a LeRobot dataset ({', '.join(_layout(root))}) but has no "
            "meta/info.json, which says its version, features and where its videos are; "
            "download the dataset's meta folder too (or, if it is not a LeRobot dataset, "
            "pass its data files one by one)")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataHubError(f"{info_path}: not a readable JSON file ({exc}); a LeRobot "
                           "dataset's meta/info.json is written by lerobot") from exc
    if not isinstance(info, dict):
        raise DataHubError(
            f"{info_path}: holds a JSON {_json_type(info)}, but info.json must be a JSON "
            "object ({\"codebase_version\": ..., \"features\": {...}, ...}) as lerobot "
            "writes it; download the dataset's meta folder again")
    version = info.get("codebase_version")
    if version not in VERSIONS:
        raise DataHubError(
            f"{info_path}: codebase_version {version!r} is not one this ingest reads "
            f"({', '.join(VERSIONS)}); convert the dataset with lerobot's converter "
            "(e.g. lerobot.datasets.v30.convert_dataset_v21_to_v30) first")
    counts = {field: _count(info_path, info, field) for field in COUNTS}
    chunks_size = _count(info_path, info, "chunks_size", minimum=1)
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise DataHubError(f"{info_path}: 'features' must map column names to "
                           f"{{dtype, shape}}; found {features!r}")
    for key, feature in features.items():
        if not isinstance(feature, dict) or "dtype" not in feature:
            raise DataHubError(f"{info_path}: features.{key} has no dtype: {feature!r}")
    videos = [k for k, f in features.items() if f["dtype"] == "video"]
    if videos and not isinstance(info.get("video_path"), str):
        raise DataHubError(f"{info_path}: features {', '.join(videos)} are videos, but "
                           "'video_path' (where their MP4 files are) is missing")
    for key in videos:
        shape = features[key].get("shape")
        if not (isinstance(shape, list) and len(shape) == 3 and shape[2] in (1, 3)):
            raise DataHubError(f"{info_path}: features.{key}.shape {shape!r} must be "
                               "[height, width, channels] with 1 or 3 channels")
    episodes = _episode_videos(root, videos) if version == "v3.0" and videos else {}
    return LeRobotMeta(root=root, version=version, features=features,
                       video_path=info.get("video_path"),
                       chunks_size=DEFAULT_CHUNKS_SIZE if chunks_size is None else chunks_size,
                       tasks=_tasks(root), episodes=episodes,
                       total_frames=counts["total_frames"])


def _count(info_path: Path, info: dict[str, Any], field: str, minimum: int = 0) -> int | None:
    """info.json's whole number `field`, at least `minimum`; None when absent (a dataset
    without total_frames is not checked for completeness). Present, anything else is an error."""
    if field not in info:
        return None
    value = info[field]
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    text = value.strip() if isinstance(value, str) else ""
    if text.isdigit() and int(text) >= minimum:
        fix = f'write it as a JSON number, "{field}": {int(text)}'
    elif field == "chunks_size":
        fix = f'write lerobot\'s default, "chunks_size": {DEFAULT_CHUNKS_SIZE}'
    else:
        fix = "write the dataset's real count as a JSON number"
    raise DataHubError(
        f"{info_path}: {field} is {json.dumps(value)}, but it must be a whole number "
        f">= {minimum}; {fix}, or download the dataset's meta folder again")


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _tasks(root: Path) -> dict[int, str]:
    """task_index -> task text, from meta/tasks.parquet (v3.0) or meta/tasks.jsonl (v2.x)."""
    parquet, lines = root / "meta" / "tasks.parquet", root / "meta" / "tasks.jsonl"
    if parquet.is_file():
        table = pq.read_table(parquet)
        # lerobot writes a pandas frame indexed by the task text: its index is a column
        # ("task" when named so, else what pandas' metadata names).
        index = [c for c in (table.schema.pandas_metadata or {}).get("index_columns", [])
                 if isinstance(c, str)]
        text = next((c for c in ("task", *index) if c in table.column_names), None)
        if text is None or "task_index" not in table.column_names:
            raise DataHubError(f"{parquet}: expected columns task_index and task (or the "
                               f"task text as the index); found {table.column_names}")
        return dict(zip(table["task_index"].to_pylist(), table[text].to_pylist(), strict=True))
    if lines.is_file():
        tasks = {}
        for number, line in enumerate(lines.read_text().splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                    tasks[int(entry["task_index"])] = str(entry["task"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataHubError(f"{lines}:{number}: not a {{task_index, task}} "
                                       f"line ({exc})") from exc
        return tasks
    return {}


def _episode_videos(root: Path, videos: list[str]) -> dict[int, dict[str, tuple[int, int, float]]]:
    """v3.0: where each episode's frames are: (chunk, file, from_timestamp) per camera."""
    files = sorted((root / "meta" / "episodes").rglob("*.parquet"))
    if not files:
        raise DataHubError(f"{root / 'meta' / 'episodes'}: no episode metadata (Parquet), "
                           "which a v3.0 dataset with videos needs to find each episode's frames")
    wanted = ["episode_index"] + [f"videos/{key}/{part}" for key in videos
                                  for part in ("chunk_index", "file_index", "from_timestamp")]
    out: dict[int, dict[str, tuple[int, int, float]]] = {}
    for path in files:
        names = pq.read_schema(path).names
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataHubError(f"{path}: episode metadata lacks {', '.join(missing)}")
        table = pq.read_table(path, columns=wanted).to_pydict()
        for i, episode in enumerate(table["episode_index"]):
            out[int(episode)] = {key: (int(table[f"videos/{key}/chunk_index"][i]),
                                       int(table[f"videos/{key}/file_index"][i]),
                                       float(table[f"videos/{key}/from_timestamp"][i]))
                                 for key in videos}
    return out


def data_files(meta: LeRobotMeta) -> list[Path]:
    """The data files, sorted; all of them: their rows must add up to info.json's
    total_frames (a partly downloaded dataset would otherwise train on a part, silently)."""
    root = meta.root
    files = sorted(p for p in (root / "data").rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))
    if not files:
        raise DataHubError(f"{root}: a LeRobot dataset (meta/info.json) with no data/**.parquet "
                           "files; download its data folder too")
    rows = 0
    for path in files:  # every footer, so that a damaged file fails before anything is written
        try:
            rows += pq.read_metadata(path).num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataHubError(f"{path}: this data file of the LeRobot dataset is not readable "
                               f"Parquet ({exc}); it is damaged or partly downloaded: download "
                               "it again") from exc
    if meta.total_frames is not None and rows != meta.total_frames:
        raise DataHubError(
            f"{root}: data/ holds {rows:,} frames in {len(files)} files, but "
            f"meta/info.json's total_frames is {meta.total_frames:,}: the dataset is "
            "incomplete or mixed; download it whole (or fix total_frames if the data "
            "was trimmed on purpose)")
    return files
