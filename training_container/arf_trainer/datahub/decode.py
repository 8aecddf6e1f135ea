"""Columns of encoded image bytes (`dataset.decode`), decoded by prepare as the rows stream.

A template may declare that a column of the query's result holds one encoded image per row (a
BLOB of PNG or JPEG bytes) and how to read it, e.g. ``{image: {format: png, shape: [64, 64,
3]}}``. Prepare decodes it before the shards are written, so the shards, the trainer and the
fingerprint see a plain uint8 [H][W][C] array column, of exactly the Arrow type DuckDB gives a
`UTINYINT[H][W][C]` column: every recipe that takes frames (bc_pixels) reads it unchanged, and
the fingerprint covers the decoded pixels (were two JPEG decoders to disagree, the
fingerprints would differ, not silently the training data). Format ``video`` decodes frame
references to the hub's stored videos instead (`decode_video`); the checks below are those of
png and jpeg.

What is checked, in order, each failure naming the column and how to fix it:
1. The column is in the result and binary (DuckDB BLOB) — before any row is read.
2. Every value, as it streams: not null; opened by Pillow's decoder for the declared format
   only (no other of Pillow's parsers sees the bytes, and a value in another format is named
   by its signature); `img.format` is the declared one; a JPEG libjpeg warns about (cut short
   or altered: Pillow would decode it with grey where the damage is) is refused; exactly
   W x H pixels (nothing is resized; `downscale` makes the stored frame smaller afterwards);
   8 bits per channel; for C = 1 or 3, no transparent pixel (an alpha band or a transparency
   entry whose alpha is below 255 anywhere: the conversion would drop the alpha and the policy
   would train on the colour beneath, which nobody saw; fully opaque alpha, as in RGBA
   screenshots, passes); converted to L, RGB or RGBA for C = 1, 3 or 4. The first bad
   value stops prepare, naming its row (position in the query's sorted result, and its
   `order_by` key when the template declares one).

Memory: one batch at a time; prepare sizes its batches from the decoded row width
(`arf_trainer.datahub.shards.layout`), and each batch's pixels are written into one array
allocated up front. Speed: a batch's rows decode on one thread per core of the step's budget
(`arf_trainer.datahub.workers`); the pixels are the same for any number of threads.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from arf_trainer.datahub import workers
from arf_trainer.downscale import block_mean, check_factor
from arf_trainer.errors import DecodeError, SpecError

# The Airflow side's bound (arf_training.template_dataset.MAX_IMAGE_SIDE), checked again here
# because a job spec may be written by hand.
MAX_IMAGE_SIDE = 4096
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_MODE = {1: "L", 3: "RGB", 4: "RGBA"}
# Source modes of 8 bits per channel; 16-bit and float images (I;16, I, F) would be clipped.
_EIGHT_BIT = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
# Source modes with an alpha band; any other mode carries alpha only as a PNG transparency
# entry (a transparent palette index, or a grey/RGB colour key) in `img.info`.
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF",
               b"BM": "BMP", b"RIFF": "RIFF (WebP?)", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def image_type(height: int, width: int, channels: int) -> pa.DataType:
    """Arrow's type of a uint8 [height][width][channels] array column, as DuckDB returns a
    `UTINYINT[height][width][channels]` column (nested fixed-size lists, unnamed children)."""
    arrow_type: pa.DataType = pa.uint8()
    for size in (channels, width, height):
        arrow_type = pa.list_(pa.field("", arrow_type), size)
    return arrow_type


def nested(pixels: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """`pixels` [N, H, W, C] uint8 as a column of `arrow_type` (`image_type`), without a copy
    per row."""
    array: pa.Array = pa.array(pixels.reshape(-1))
    for size_type in reversed(_levels(arrow_type)):
        array = pa.FixedSizeListArray.from_arrays(array, type=size_type)
    return array


def stored_shape(shape: tuple[int, int, int], downscale: int) -> tuple[int, int, int]:
    """The shards' frame shape of decoded `shape` made `downscale` times smaller a side."""
    return shape[0] // downscale, shape[1] // downscale, shape[2]


@dataclass(frozen=True)
class ImageDecoder:
    """One `dataset.decode.<column>` entry."""

    column: str
    format: str
    shape: tuple[int, int, int]
    downscale: int = 1  # `arf_trainer.downscale`: the shards hold shape / downscale a side

    @property
    def field(self) -> str:
        return f"dataset.decode.{self.column}"

    def close(self) -> None:
        """Nothing is held open between batches (format video's decoder holds its videos)."""

    def decode(self, values: pa.Array, where: Any) -> pa.Array:
        """The decoded column of one batch; `where(i)` names the batch's row i in errors."""
        height, width, channels = self.shape
        out = np.empty((len(values), height, width, channels), dtype=np.uint8)
        items = values.to_pylist()

        def run(rows: range) -> tuple[int, str] | None:
            for i in rows:
                data = items[i]
                problem = "a null value" if data is None else self._decode_into(data, out[i])
                if problem:
                    return i, problem
            return None

        # Runs of rows decode side by side (`workers`), each into its own slice of `out`; the
        # first bad row in order is the one named, whatever finished first.
        found = next((f for f in workers.pool().map(run, workers.runs(len(items))) if f), None)
        if found:
            i, problem = found
            raise DecodeError(
                f"{self.field} (format {self.format}, shape {list(self.shape)}): "
                f"{where(i)} holds {problem}. Fix the data (every row must hold one "
                f"{self.format} image of {width}x{height} pixels), filter such rows out "
                "in the query, or correct the declared format/shape")
        return nested(block_mean(out, self.downscale),
                      image_type(*stored_shape(self.shape, self.downscale)))

    def _decode_into(self, data: bytes, out: np.ndarray) -> str | None:
        """Decode `data` into `out` ([H, W, C] uint8); what was wrong with it, or None."""
        from PIL import Image, UnidentifiedImageError

        expected = _PIL_FORMAT[self.format]
        height, width, channels = self.shape
        try:
            with Image.open(io.BytesIO(data), formats=[expected]) as img:
                if img.format != expected:
                    return f"a {img.format} image, not {expected}"
                if img.size != (width, height):
                    return (f"a {img.size[0]}x{img.size[1]} image (width x height), not "
                            f"{width}x{height} (images are never resized)")
                if img.mode not in _EIGHT_BIT:
                    return (f"a {img.mode} image (not 8 bits per channel); store 8-bit "
                            "images")
                if channels != 4 and (img.mode in _ALPHA or "transparency" in img.info):
                    problem = self._transparent(img)
                    if problem:
                        return problem
                if expected == "JPEG":
                    problem = _damaged_jpeg(data)
                    if problem:
                        return problem
                pixels = np.asarray(img.convert(_MODE[channels]))
        except UnidentifiedImageError:
            return _not_the_format(data, expected)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            return f"{len(data)} bytes that do not decode as {expected} ({exc})"
        out[...] = pixels.reshape(height, width, channels)
        return None

    def _transparent(self, img: Any) -> str | None:
        """Why `img` (which carries alpha) cannot go into this column of 1 or 3 channels, or
        None when its alpha is 255 everywhere (then converting it loses nothing)."""
        kind = f"{'an' if img.mode[0] in 'LR' else 'a'} {img.mode} image"
        if img.mode in _ALPHA:
            alpha = np.asarray(img.getchannel("A"))
        else:  # a transparency entry: Pillow's RGBA conversion applies it
            alpha = np.asarray(img.convert("RGBA").getchannel("A"))
            kind += " (transparency entry)"
        count = int(np.count_nonzero(alpha != 255))
        if not count:
            return None
        height, width, channels = self.shape
        share = count / alpha.size
        return (f"{kind} with transparent pixels ({count} of {alpha.size}, {share:.1%}, alpha "
                f"below 255) while the column declares {channels} "
                f"channel{'s' if channels > 1 else ''}: converting would drop the alpha and "
                "keep the colour beneath each transparent pixel. Declare 4 channels to keep "
                f"the alpha ({self.field}.shape [{height}, {width}, 4]), or flatten the images "
                "onto a background (composite them) before ingest")


# The check decodes the source's own colour space at 1/8 scale: libjpeg still reads every
# entropy-coded byte, where damage shows. It adds ~17 % to decoding (bench/jpeg_check.py).
_CHECK_AS = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}


def _damaged_jpeg(data: bytes) -> str | None:
    """libjpeg's warning about `data`, or None. A cut-short or altered JPEG makes libjpeg warn
    ("Corrupt JPEG data: premature end of data segment", "... extraneous bytes before marker")
    and go on, filling what it could not read with grey; Pillow drops the warning, so such a
    frame would train silently. simplejpeg's strict mode turns it into an error. Damage that
    still decodes to valid codes (some single bit flips) leaves no trace in any decoder."""
    import simplejpeg

    try:
        colour = _CHECK_AS.get(simplejpeg.decode_jpeg_header(data)[2], "RGB")
        simplejpeg.decode_jpeg(data, colorspace=colour, strict=True, min_height=1, min_width=1)
    except ValueError as exc:
        return (f"{len(data)} bytes of a damaged JPEG (libjpeg: {exc}): the image is cut short "
                "or altered, and decoding it would fill the damaged part with grey")
    return None


def _levels(arrow_type: pa.DataType) -> list[pa.DataType]:
    """The fixed-size list types of a nested one, outermost first."""
    levels = []
    while pa.types.is_fixed_size_list(arrow_type):
        levels.append(arrow_type)
        arrow_type = arrow_type.value_type
    return levels


def _not_the_format(data: bytes, expected: str) -> str:
    found = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
    if found == expected:  # the right signature, but the decoder refused the rest
        return f"{len(data)} bytes with a {expected} signature that do not decode as {expected}"
    return (f"{found} bytes, not {expected}" if found else
            f"{len(data)} bytes that are not a {expected} image (they start {data[:8]!r})")


def _decoder(column: Any, entry: Any, hub: Path | None) -> Any:
    field = f"dataset.decode.{column}"
    if not isinstance(column, str) or not column or not isinstance(entry, dict) \
            or not {"format", "shape"} <= set(entry) <= {"format", "shape", "downscale"}:
        raise SpecError(f"{field}={entry!r} must be {{format: png|jpeg|video, shape: "
                        "[H, W, C]} and optionally downscale: k")
    fmt, shape = entry["format"], entry["shape"]
    if fmt not in (*_PIL_FORMAT, "video"):
        raise SpecError(f"{field}.format={fmt!r} must be 'png', 'jpeg' or 'video'")
    channels = (1, 3) if fmt == "video" else tuple(_MODE)
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
            or not (1 <= shape[0] <= MAX_IMAGE_SIDE and 1 <= shape[1] <= MAX_IMAGE_SIDE)
            or shape[2] not in channels):
        raise SpecError(f"{field}.shape={shape!r} must be [H, W, C] with H and W in "
                        f"1..{MAX_IMAGE_SIDE} and C {'1 or 3' if fmt == 'video' else '1, 3 or 4'} "
                        f"(format {fmt}), e.g. [64, 64, 3]")
    try:
        factor = check_factor(shape[0], shape[1], entry.get("downscale", 1), f"{field}.downscale")
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    if fmt == "video":
        from arf_trainer.datahub.decode_video import VideoDecoder

        return VideoDecoder(column, (shape[0], shape[1], shape[2]), hub, downscale=factor)
    return ImageDecoder(column, fmt, (shape[0], shape[1], shape[2]), factor)


class Decoders:
    """Every `dataset.decode` column of one prepare run (none: batches pass unchanged)."""

    def __init__(self, decode: Any, order_by: list[str] | None, hub: Path | None = None):
        if decode is not None and not isinstance(decode, dict):
            raise SpecError(f"dataset.decode={decode!r} must map column names to "
                            "{format, shape}, e.g. {image: {format: png, shape: [64, 64, 3]}}")
        # `hub`: where format video finds the stored videos (`video_store`).
        self.decoders = [_decoder(column, entry, hub) for column, entry in (decode or {}).items()]
        self.keys = list(order_by or [])

    def schema(self, schema: pa.Schema, stored: bool = True) -> pa.Schema:
        """The shards' schema for the query's `schema`: each decoded column's type replaced;
        with `stored` False, the frames as decoded, before any downscale (what a batch holds
        in memory while it decodes)."""
        for decoder in self.decoders:
            if decoder.column not in schema.names:
                raise SpecError(
                    f"{decoder.field}: no column {decoder.column!r} in the query result; "
                    f"columns: {', '.join(schema.names)}. Select it in dataset.query or fix "
                    "the name (case-sensitive)")
            found = schema.field(decoder.column).type
            if decoder.format == "video":
                decoder.check_type(found)
            elif not (pa.types.is_binary(found) or pa.types.is_large_binary(found)
                    or pa.types.is_binary_view(found) or pa.types.is_fixed_size_binary(found)):
                raise SpecError(
                    f"{decoder.field}: column {decoder.column!r} has type {found}, not binary "
                    "(BLOB) bytes to decode. Store encoded images as BLOB, or remove the "
                    f"column from dataset.decode (an array column such as UTINYINT"
                    f"{''.join(f'[{s}]' for s in decoder.shape)} needs no decoding)")
            index = schema.get_field_index(decoder.column)
            shape = stored_shape(decoder.shape, decoder.downscale) if stored else decoder.shape
            schema = schema.set(index, pa.field(decoder.column, image_type(*shape)))
        return schema

    def batch(self, batch: pa.RecordBatch, rows: np.ndarray, *, schema: pa.Schema,
              what: str) -> pa.RecordBatch:
        """`batch` with its image columns decoded (`schema` from `schema()`); `rows` holds each
        row's position in `what`'s sorted result, for the errors."""
        if not self.decoders:
            return batch

        def where(i: int) -> str:
            key = ""
            if self.keys and all(k in batch.schema.names for k in self.keys):
                values = batch.slice(i, 1).select(self.keys).to_pylist()[0]
                key = " (" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")"
            return f"row {int(rows[i])} of {what}'s result{key}"

        columns = list(batch.columns)
        for decoder in self.decoders:
            index = batch.schema.get_field_index(decoder.column)
            columns[index] = decoder.decode(columns[index], where)
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    def manifest(self) -> dict[str, Any] | None:
        """The manifest's "decode" entry: {column: {"format", "shape"[, "downscale"]}} (the
        shape decoded; the shards' is the columns' shape), or None."""
        return {d.column: {"format": d.format, "shape": list(d.shape),
                           **({"downscale": d.downscale} if d.downscale > 1 else {})}
                for d in self.decoders} or None

    def versions(self) -> dict[str, str]:
        """The decoder's version for the manifest's "created_with" (none without decoding)."""
        if not self.decoders:
            return {}
        import PIL

        versions = {"pillow": PIL.__version__}
        if any(d.format == "jpeg" for d in self.decoders):  # it decides which frames pass
            import simplejpeg

            versions["simplejpeg"] = simplejpeg.__version__
        if any(d.format == "video" for d in self.decoders):  # PyAV and the FFmpeg it ships
            import av

            versions["av"] = av.__version__
            versions["libavcodec"] = ".".join(map(str, av.library_versions["libavcodec"]))
        return versions

    def close(self) -> None:
        """Close the videos format video holds open."""
        for decoder in self.decoders:
            decoder.close()
