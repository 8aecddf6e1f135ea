"""`dataset.decode: {<camera>: {format: video, shape: [H, W, C]}}`: frames decoded by prepare
from the hub's stored videos (`video_store`), for a column of frame references.

The same contract as the image formats (decode.py): the shards, the trainer and the fingerprint
get a uint8 [H][W][C] array column, and the first bad row stops prepare naming its position
(and `order_by` key) and what to fix. Each row's frame is the one nearest its time within
LeRobot's tolerance (`video_frames.VideoFrames`, the rule the ingest checked), converted to RGB
(C = 3) or grey (C = 1); a video of another frame size is refused (nothing is resized).

Speed: rows in time order read each video forward, decoding each frame once; a few videos stay
open (the `OPEN_VIDEOS` most recently used), so rows alternating between two episodes' files,
or an ordering that jumps back, cost seeks, not reopened files. Decoding runs on FFmpeg's
threads; the frames do not depend on their number.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from arf_trainer.datahub.video_frames import TOLERANCE_S, VideoFrames
from arf_trainer.datahub.video_store import FRAME_REF, VideoFiles
from arf_trainer.errors import DataHubError, DecodeError

OPEN_VIDEOS = 4


@dataclass
class VideoDecoder:
    """One `dataset.decode.<column>` entry of format video."""

    column: str
    shape: tuple[int, int, int]
    hub: Path | None
    format: str = "video"
    downscale: int = 1  # `arf_trainer.downscale`: the shards hold shape / downscale a side
    _files: VideoFiles | None = field(default=None, repr=False)
    _open: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def field(self) -> str:
        return f"dataset.decode.{self.column}"

    def check_type(self, found: pa.DataType) -> None:
        """The column must hold frame references ({video, timestamp}), as ingested."""
        from arf_trainer.datahub.video_store import is_frame_ref
        from arf_trainer.errors import SpecError

        if not is_frame_ref(found):
            raise SpecError(
                f"{self.field}: column {self.column!r} has type {found}, not the frame "
                f"references ({FRAME_REF}) that `arf datahub ingest TABLE LEROBOT_FOLDER "
                "--frames video` stores; a column of PNG or JPEG bytes takes format png or "
                "jpeg")

    def decode(self, values: pa.Array, where: Any) -> pa.Array:
        """The decoded column of one batch; `where(i)` names the batch's row i in errors."""
        from arf_trainer.datahub.decode import image_type, nested, stored_shape
        from arf_trainer.downscale import block_mean

        height, width, channels = self.shape
        out = np.empty((len(values), height, width, channels), dtype=np.uint8)
        videos = values.field("video").to_pylist()
        times = values.field("timestamp").to_pylist()
        valid = values.is_valid().to_pylist()
        for i, (sha, time_s) in enumerate(zip(videos, times, strict=True)):
            if not valid[i] or sha is None or time_s is None:
                self._refuse(where(i), "a null frame reference")
            try:
                out[i] = self._frames(sha).frame(float(time_s))
            except DataHubError as exc:
                self._refuse(where(i), f"a frame that cannot be read: {exc}")
        return nested(block_mean(out, self.downscale),
                      image_type(*stored_shape(self.shape, self.downscale)))

    def _refuse(self, row: str, problem: str) -> None:
        raise DecodeError(f"{self.field} (format video, shape {list(self.shape)}): {row} "
                          f"holds {problem}. Fix the data (ingest the dataset again), filter "
                          "such rows out in the query, or correct the declared shape")

    def _frames(self, sha: str) -> VideoFrames:
        frames = self._open.get(sha)
        if frames is not None:
            self._open.move_to_end(sha)
            return frames
        if self._files is None:
            if self.hub is None:
                raise DataHubError("no data hub to read the stored videos from")
            self._files = VideoFiles(self.hub)
        frames = VideoFrames(self._files.path(sha), self.shape, TOLERANCE_S)
        self._open[sha] = frames
        while len(self._open) > OPEN_VIDEOS:
            self._open.popitem(last=False)[1].close()
        return frames

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
