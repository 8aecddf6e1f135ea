"""Frames of a video file fetched by timestamp, as a LeRobot dataset's rows name them.

A LeRobot dataset keeps its camera streams as MP4 files (AV1 by default, H.264 in older ones)
and each row of its data names the frame by time: `timestamp` in the episode's own video
(v2.x) or `from_timestamp + timestamp` in a file of many episodes (v3.0). `VideoFrames` decodes
with PyAV (FFmpeg; dav1d for AV1) and returns, for each time asked, the frame whose
presentation time is nearest, if it is within `tolerance_s` (LeRobot's own rule and default,
1e-4 s: a row with no frame that close is an error, not a neighbouring frame).

Rows ask in increasing time, so the decoder runs forward and decodes each frame once; a time
behind the last one, or more than `SEEK_AHEAD_S` ahead of it, seeks to the key frame before
it first.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from arf_trainer.datahub.workers import worker_threads
from arf_trainer.errors import DataHubError

SEEK_AHEAD_S = 2.0
TOLERANCE_S = 1e-4  # LeRobotDataset's default tolerance_s
_FORMATS = {3: "rgb24", 1: "gray"}


class VideoFrames:
    """One video file's frames [H, W, C] uint8, by presentation time (see the module doc)."""

    def __init__(self, path: Path, shape: tuple[int, int, int], tolerance_s: float):
        import av

        if shape[2] not in _FORMATS:
            raise DataHubError(f"{path}: frames of {shape[2]} channels cannot be decoded; "
                               "LeRobot video features hold 3 (RGB) or 1 (grey)")
        self.path, self.shape, self.tolerance_s = path, shape, tolerance_s
        self._errors = av.FFmpegError
        try:
            self._container = av.open(str(path))
        except (av.FFmpegError, OSError) as exc:
            raise _unreadable(path, str(exc)) from exc
        # A cut-short MP4 often still opens, with no video stream (or no codec for it) left in
        # what was read.
        streams = self._container.streams.video
        if not streams or streams[0].codec_context is None:
            self._container.close()
            raise _unreadable(path, "no decodable video stream in it")
        self._stream = streams[0]
        # The step's CPU budget (`workers`), not every core FFmpeg can see; the decoded
        # frames are the same for any number of threads.
        self._stream.thread_type = "AUTO"
        self._stream.codec_context.thread_count = worker_threads()
        self._base: Fraction = self._stream.time_base
        self._frames: Any = None  # the decoding generator, from the last seek
        self._held: list[tuple[float, Any]] = []  # decoded, not yet passed: (time, frame)

    def close(self) -> None:
        self._container.close()

    def frame(self, time_s: float) -> np.ndarray:
        """The frame presented nearest `time_s` (seconds from the file's start)."""
        tolerance = self.tolerance_s
        if self._frames is None or not self._held or time_s < self._held[0][0] - tolerance \
                or time_s > self._held[-1][0] + SEEK_AHEAD_S:
            self._seek(time_s)
        while not self._held or self._held[-1][0] < time_s + tolerance:
            try:
                decoded = next(self._frames, None)
            except self._errors as exc:
                raise DataHubError(f"{self.path}: the video does not decode near {time_s:.4f} s "
                                   f"({exc}); the file is damaged: fetch it again") from exc
            if decoded is None:
                break
            if decoded.pts is None:
                continue
            self._held.append((float(decoded.pts * self._base), decoded))
            # Of the frames before the window only the last can be the nearest: a key frame
            # interval of them is never held.
            while len(self._held) > 1 and self._held[1][0] < time_s - tolerance:
                self._held.pop(0)
        if not self._held:
            raise DataHubError(f"{self.path}: no frame at or after {time_s:.4f} s; the video "
                               "ends before the rows that name it")
        best_time, best = min(self._held, key=lambda item: abs(item[0] - time_s))
        if abs(best_time - time_s) > tolerance:
            raise DataHubError(
                f"{self.path}: no frame within {tolerance:g} s of {time_s:.6f} s (the nearest "
                f"is at {best_time:.6f} s): the rows' timestamps and the video's frames do not "
                "line up (LeRobot refuses such a row too). Fix the rows' timestamps or "
                "re-encode the video")
        # Rows ask in time order: the frames before this one are not asked for again.
        self._held = [item for item in self._held if item[0] >= best_time]
        return self._pixels(best)

    def _seek(self, time_s: float) -> None:
        target = max(0, int((time_s - self.tolerance_s) / self._base))
        try:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        except self._errors as exc:
            raise DataHubError(f"{self.path}: the video cannot seek to {time_s:.4f} s ({exc}); "
                               "the file is damaged or truncated: download it again") from exc
        self._frames = self._container.decode(self._stream)
        self._held = []

    def _pixels(self, frame: Any) -> np.ndarray:
        height, width, channels = self.shape
        if (frame.height, frame.width) != (height, width):
            raise DataHubError(
                f"{self.path}: frames are {frame.width}x{frame.height} (width x height), but "
                f"meta/info.json gives this camera shape {list(self.shape)}; fix info.json")
        pixels = frame.to_ndarray(format=_FORMATS[channels])
        return pixels.reshape(height, width, channels)


def _unreadable(path: Path, reason: str) -> DataHubError:
    """Why `path` cannot be opened: not there (the dataset's layout), or there but damaged."""
    if path.is_file():
        return DataHubError(
            f"{path}: not a readable video ({reason}): the file is there but damaged or "
            "truncated (an interrupted download?); download it again")
    return DataHubError(f"{path}: not a readable video ({reason}); the dataset's video files "
                        "must be where meta/info.json's video_path puts them")
