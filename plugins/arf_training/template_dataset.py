"""The dataset section's layout fields: how prepare splits, orders and decodes the query result.

`templates.Dataset` inherits them (kept here so that the shared schema module stays small). Only
pydantic is imported: this runs on every DAG parse. Whether the named columns exist is known
only once the query runs, so the prepare step checks that and names the columns it found.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, field_validator, model_serializer,
                      model_validator)

# Largest decoded side: a 4096x4096x4 frame is 64 MiB, already past one shard row group
# (`arf_trainer.datahub.shards.GROUP_BYTES`); larger images are not camera frames for a policy.
MAX_IMAGE_SIDE = 4096


class ImageDecode(BaseModel):
    """`dataset.decode.<column>`: the column holds encoded image bytes (a BLOB per row), or
    references to frames of the hub's stored videos, that prepare decodes into a fixed-shape
    uint8 array [H, W, C] before writing the shards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["png", "jpeg", "video"] = Field(
        description="Encoding of every value: png (lossless) or jpeg bytes, or video: a frame "
                    "reference {video, timestamp} of a camera ingested with `arf datahub "
                    "ingest TABLE LEROBOT_FOLDER --frames video` (channels 3 or 1). A value in "
                    "another format fails prepare.")
    shape: tuple[int, int, int] = Field(
        description="[H, W, C] of every decoded image: height and width in pixels (each image "
                    "must have exactly this size; nothing is resized) and channels, 1 "
                    "(grayscale), 3 (RGB) or 4 (RGBA), which the image is converted to. An "
                    "image with transparent pixels is refused unless C is 4.")

    downscale: int = Field(
        default=1, ge=1,
        description="Store each frame this many times smaller a side: the mean of each k x k "
                    "block, in integers (e.g. 5 makes a 480x640 camera 96x128 in the shards). "
                    "Must divide height and width. A bc_pixels model then takes the full "
                    "frames when served and averages the blocks itself, the same way.")

    @field_validator("shape", mode="before")
    @classmethod
    def _three_sizes(cls, shape: object) -> object:
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise ValueError(f"shape={shape!r} must be [height, width, channels], e.g. "
                             "[64, 64, 3] for RGB or [64, 64, 1] for grayscale")
        return shape

    @field_validator("shape")
    @classmethod
    def _shape_bounds(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        height, width, channels = shape
        if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
            raise ValueError(
                f"shape={list(shape)!r}: height and width must be 1..{MAX_IMAGE_SIDE} pixels; "
                "write the stored images' size, e.g. [64, 64, 3]")
        if channels not in (1, 3, 4):
            raise ValueError(
                f"shape={list(shape)!r}: channels must be 1 (grayscale), 3 (RGB) or 4 (RGBA), "
                f"got {channels}; e.g. [64, 64, 3]")
        return shape

    @model_validator(mode="after")
    def _fits_the_shape(self) -> ImageDecode:
        if self.format == "video" and self.shape[2] not in (1, 3):
            raise ValueError(f"shape={list(self.shape)!r}: format video decodes frames to RGB "
                             "(3 channels) or grey (1); e.g. [480, 640, 3]")
        height, width, _ = self.shape
        if height % self.downscale or width % self.downscale:
            fitting = [k for k in range(2, min(height, width) + 1)
                       if height % k == 0 and width % k == 0][:6]
            raise ValueError(f"downscale={self.downscale} must divide the frame's height and "
                             f"width ({height}x{width}) so that every block is whole; factors "
                             f"that fit: {fitting or 'none but 1'}")
        return self

    @model_serializer(mode="wrap")
    def _without_default_downscale(self, handler: Any) -> Any:
        # The job spec of a template without downscale stays as it was (prepare's request,
        # and so its reuse of prepared data, does not change under an upgrade).
        data = handler(self)
        if isinstance(data, dict) and data.get("downscale") == 1:
            del data["downscale"]
        return data


class DatasetLayout(BaseModel):
    """`dataset.split_by`, `dataset.order_by` and `dataset.decode`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split_by: str | None = Field(
        None, min_length=1, max_length=255,
        description="Split train/validation by this column's groups instead of by rows, e.g. "
                    "episode: every row of a group goes to the same side, chosen by a seeded "
                    "hash of the group's value (stable when rows are appended; about "
                    "validation_split of the groups go to validation). Without it, rows are "
                    "split one by one (tabular data).")
    order_by: list[str] | None = Field(
        None, min_length=1,
        description="Columns that order the result uniquely, e.g. [episode, step]: prepare sorts "
                    "by them (spilling to disk, never the whole result in memory) so that shards "
                    "and their fingerprint are reproducible. Without it the result is sorted by "
                    "all its columns, which is slower on wide or large results.")
    decode: dict[str, ImageDecode] | None = Field(
        None,
        description="Columns of encoded image bytes (BLOB) to decode in prepare, e.g. {image: "
                    "{format: png, shape: [64, 64, 3]}}: the shards and the trainer see a "
                    "uint8 [H][W][C] array column (like UTINYINT[64][64][3]) and the "
                    "fingerprint covers the decoded pixels. A null, undecodable, damaged "
                    "(a JPEG libjpeg warns about), other-format or other-size value fails "
                    "prepare.")

    @field_validator("order_by")
    @classmethod
    def _distinct_names(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        blank = [n for n in names if not n.strip()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if blank or repeated:
            raise ValueError(
                f"dataset.order_by={names!r} must list distinct column names "
                f"({'an empty name' if blank else 'repeated: ' + ', '.join(repeated)}); "
                "write each column once, e.g. [episode, step]")
        return names

    @field_validator("decode")
    @classmethod
    def _decode_columns(cls, decode: dict[str, ImageDecode] | None
                        ) -> dict[str, ImageDecode] | None:
        if decode is None:
            return None
        bad = [n for n in decode if not n.strip() or len(n) > 255]
        if not decode or bad:
            named = f"; bad name(s): {bad!r}" if bad else ""
            raise ValueError(
                f"dataset.decode={ {n: '...' for n in decode}!r} must map one or more column "
                f"names (1..255 characters) to a decoder{named}, e.g. {{image: {{format: png, "
                "shape: [64, 64, 3]}}; or leave decode out")
        return decode


# bc_pixels' smallest stored frame side (arf_trainer.trainer.recipes_vision.MIN_FRAME_SIDE,
# which this side may not import; a test holds the two equal).
MIN_FRAME_SIDE = 5

# What the reach_pixels camera renders (arf_trainer.sim.reach_pixels: square RGB frames, 8..256
# pixels a side), which this side may not import.
CAMERA_SIDES = (8, 256)


def _decoded_features(template: Any) -> dict[str, Any]:
    """The decoded columns among dataset.features, matched as the prepare step matches them
    (names or fnmatch globs): the ones the model takes."""
    import fnmatch

    patterns = template.dataset.features or []
    return {name: d for name, d in (template.dataset.decode or {}).items()
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def camera_problems(template: Any) -> list[str]:
    """Decoded frames a `reach_pixels` evaluation could never render: found at lint time, not
    after a whole training run (the evaluate step refuses such a model)."""
    evaluation = template.evaluation
    if evaluation is None or evaluation.environment != "reach_pixels":
        return []
    low, high = CAMERA_SIDES
    return [f"dataset.decode.{name}.shape={list(d.shape)}: evaluation.environment reach_pixels "
            f"renders square RGB frames of {low} to {high} pixels a side, so a model trained on "
            f"these could not be evaluated; decode to e.g. [64, 64, 3]"
            for name, d in _decoded_features(template).items()
            if d.shape[0] != d.shape[1] or not low <= d.shape[0] <= high or d.shape[2] != 3]


def pixel_recipe_problems(template: Any) -> list[str]:
    """What the bc_pixels train step would refuse after prepare had decoded every frame, found
    at lint time: a decoded grey or RGBA column among the features (every camera must be RGB),
    and, for a reach_pixels evaluation, a second camera (it renders one view)."""
    if template.training.recipe != "bc_pixels":
        return []
    decoded = _decoded_features(template)
    problems = [f"dataset.decode.{name}.shape={list(d.shape)}: recipe bc_pixels takes RGB "
                f"frames from each camera; decode to shape {[*d.shape[:2], 3]} (prepare "
                "converts grayscale and opaque RGBA to RGB), or leave the column out of "
                "dataset.features" for name, d in decoded.items() if d.shape[2] != 3]
    problems += [f"dataset.decode.{name}: shape {list(d.shape)} with downscale {d.downscale} "
                 f"stores {d.shape[0] // d.downscale}x{d.shape[1] // d.downscale} frames; "
                 f"recipe bc_pixels needs at least {MIN_FRAME_SIDE} pixels a side (its "
                 "encoder would be blind along a shorter one): use a smaller downscale"
                 for name, d in decoded.items()
                 if min(d.shape[0], d.shape[1]) // d.downscale < MIN_FRAME_SIDE]
    cameras = [name for name, d in decoded.items() if d.shape[2] == 3]
    evaluation = template.evaluation
    if len(cameras) > 1 and evaluation is not None and evaluation.environment == "reach_pixels":
        problems.append(
            f"dataset.features take {len(cameras)} cameras ({', '.join(cameras)}), but "
            "evaluation.environment reach_pixels renders one view, so the model could not be "
            "evaluated: keep one camera in dataset.features, or evaluate elsewhere")
    return problems
