"""Camera videos kept as videos: a table's MP4 files, stored once by content, and the rows that
name their frames (`arf datahub ingest TABLE LEROBOT_FOLDER --frames video`).

A LeRobot dataset's frames stored decoded take ~30x the space of its AV1 videos. Stored this
way, each video file (an episode's, or a v3.0 file of many) is copied unchanged to
``<hub>/<table>/_videos/<sha256>.mp4``, and a camera column holds, per row, the reference
``{video: <sha256>, timestamp: <seconds into that file>}`` (`FRAME_REF`). Prepare's
`dataset.decode: {<camera>: {format: video, shape: [H, W, C]}}` decodes each row's frame from
it with the same rule the ingest checked (the frame nearest the time, within LeRobot's
tolerance: `video_frames.VideoFrames`).

Why by content: a row names its video by the hash of the file's bytes, so whatever version of
the table a template pins, the frames it reads are those bytes, checked when opened (a changed
or cut file is refused, not decoded). Files are never changed by a later ingest, and never
removed by an overwrite, a compaction or a restore: Delta (delta-rs) leaves a table's files
whose names start with `_` alone. `arf datahub vacuum` removes the videos that no row of the
hub names any more (`video_gc`).
Where: any table's `_videos` folder in the hub, as a query may join tables or read a copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa

from arf_trainer.datahub.shards import sha256_file
from arf_trainer.errors import DataHubError

VIDEOS = "_videos"
INCOMING = ".incoming-"  # a copy being written; a stopped ingest's stays until a vacuum
FRAME_REF = pa.struct([pa.field("video", pa.string()), pa.field("timestamp", pa.float64())])
_CHUNK = 1 << 20


def is_frame_ref(dtype: pa.DataType) -> bool:
    return (pa.types.is_struct(dtype) and dtype.num_fields == 2
            and {dtype.field(i).name for i in range(2)} == {"video", "timestamp"})


def store(table_dir: Path, source: Path) -> str:
    """Copy `source` into the table's video store (once: the name is its sha256); its hash."""
    sha = sha256_file(source)
    folder = table_dir / VIDEOS
    target = folder / f"{sha}.mp4"
    if target.exists():
        # Reused: newly in use, so a vacuum running beside this ingest, which spares what was
        # stored inside its retention window (`video_gc`), leaves it for the rows to come.
        os.utime(target)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed: a stopped ingest never leaves a partial
        # file under a hash name (the rename is atomic on one filesystem).
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=INCOMING)
        # mkstemp makes the file 0600: readable as the data hub's other files are, so that a
        # prepare pod of another user can decode it (as custom_setup.write_atomic does).
        os.fchmod(handle, 0o644)
        try:
            with os.fdopen(handle, "wb") as out, open(source, "rb") as data:
                shutil.copyfileobj(data, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return sha


class VideoFiles:
    """The hub's stored videos by hash, each checked against its hash when first found."""

    def __init__(self, hub: Path):
        self.hub = Path(hub)
        self._found: dict[str, Path] = {}

    def path(self, sha: str) -> Path:
        found = self._found.get(sha)
        if found is not None:
            return found
        if len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha):
            raise DataHubError(f"{sha!r} is not a stored video's name (a sha256 in hex); the "
                               "column must hold the references `arf datahub ingest --frames "
                               "video` writes")
        candidates = sorted(self.hub.glob(f"*/{VIDEOS}/{sha}.mp4"))
        if not candidates:
            raise DataHubError(
                f"video {sha[:12]}... is not in the data hub at {self.hub} (no "
                f"<table>/{VIDEOS}/{sha}.mp4): its file was removed or the table was copied "
                f"without its {VIDEOS} folder; ingest the dataset again")
        path = candidates[0]
        actual = sha256_file(path)
        if actual != sha:
            raise DataHubError(
                f"{path}: the stored video's bytes have changed (sha256 {actual[:12]}..., not "
                f"{sha[:12]}...), so the frames the rows name are gone; ingest the dataset "
                "again")
        self._found[sha] = path
        return path
