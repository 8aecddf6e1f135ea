"""`dataset.decode`: a BLOB column of PNG/JPEG bytes decoded by prepare into uint8 [H][W][C]
arrays (exact pixels in the shards, the manifest's record, bc_pixels training on them) and
each bad input refused with a message naming the column and the row."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_prepare import _manifest, step_env

from arf_trainer.cli import main as trainer_main
from arf_trainer.datahub.decode import Decoders, image_type
from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.seed_pixels import image_column
from arf_trainer.datahub.tables import write_table
from arf_trainer.errors import DecodeError, SpecError

SIDE, EPISODES, STEPS = 8, 4, 10
STATE = ["cos_q0", "cos_q1", "sin_q0", "sin_q1", "qdot_0", "qdot_1"]
QUERY = ("SELECT episode, step, image, cos_q0, cos_q1, sin_q0, sin_q1, qdot_0, qdot_1, "
         "act_0, act_1 FROM frames")
DECODE = {"image": {"format": "png", "shape": [SIDE, SIDE, 3]}}


def encode(frame: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format=fmt)
    return buffer.getvalue()


def frames_table(images: list[bytes | None] | None = None) -> tuple[pa.Table, np.ndarray]:
    """EPISODES x STEPS rows of random 8x8 RGB frames stored as PNG bytes (or `images`)."""
    rng = np.random.default_rng(0)
    n = EPISODES * STEPS
    frames = rng.integers(0, 256, size=(n, SIDE, SIDE, 3), dtype=np.uint8)
    state = rng.normal(size=(n, len(STATE))).astype(np.float32)
    columns: dict[str, Any] = {
        "episode": pa.array(np.repeat(np.arange(EPISODES, dtype=np.int64), STEPS)),
        "step": pa.array(np.tile(np.arange(STEPS, dtype=np.int32), EPISODES)),
        "image": pa.array(images if images is not None else [encode(f) for f in frames],
                          type=pa.binary()),
    }
    columns.update({name: pa.array(state[:, j]) for j, name in enumerate(STATE)})
    columns.update({f"act_{j}": pa.array(np.tanh(state[:, j] + state[:, j + 2]))
                    for j in range(2)})
    return pa.table(columns), frames


def _prepare(tmp_path: Path, table: pa.Table, **dataset: Any) -> Path:
    """`table` ingested as users bring their data (a Parquet file through `arf-trainer datahub
    ingest`), then prepared with reach_pixels_bc's dataset section and `dataset`."""
    hub, workspace = tmp_path / "hub", tmp_path / "ws"
    pq.write_table(table, tmp_path / "frames.parquet")
    assert trainer_main(["datahub", "ingest", "--hub", str(hub), "frames",
                         str(tmp_path / "frames.parquet")]) == 0
    # The exact row split: validation rows whatever the episode hash gives 4 episodes.
    dataset = {"query": QUERY, "decode": DECODE, "split_by": None, **dataset}
    run_prepare(step_env(workspace, hub, "reach_pixels_bc", dataset=dataset))
    return workspace


def _shard_rows(workspace: Path) -> pa.Table:
    manifest = _manifest(workspace)
    return pa.concat_tables([pq.read_table(workspace / "prepare" / s["path"])
                             for split in ("train", "val") for s in manifest["shards"][split]])


def test_png_column_decodes_to_the_exact_pixels_and_bc_pixels_trains_on_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer_testkit import fresh_tracking_uri, make_env, make_spec

    from arf_trainer.trainer.run import run_train

    table, frames = frames_table()
    workspace = _prepare(tmp_path, table)
    manifest = _manifest(workspace)
    image = next(c for c in manifest["columns"] if c["name"] == "image")
    # The type DuckDB gives a UTINYINT[8][8][3] column: what the trainer already reads.
    assert image == {"name": "image", "type": str(image_type(SIDE, SIDE, 3)), "dtype": "uint8",
                     "shape": [SIDE, SIDE, 3]}
    assert image["type"] == ("fixed_size_list<: fixed_size_list<: fixed_size_list<: uint8>[3]>"
                             "[8]>[8]")
    assert manifest["decode"] == DECODE
    assert set(manifest["created_with"]) == {"duckdb", "pyarrow", "pillow"}
    assert manifest["rows"] == EPISODES * STEPS and manifest["features"][0] == "image"
    assert manifest["val_rows"] == 4

    rows = _shard_rows(workspace)
    assert rows.schema.field("image").type == image_type(SIDE, SIDE, 3)
    position = rows["episode"].to_numpy() * STEPS + rows["step"].to_numpy()
    stored = np.asarray(rows["image"].to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(stored, frames[position])  # PNG is lossless: exact pixels

    # The same frames stored as a UTINYINT[8][8][3] array column give byte-identical shards:
    # the same fingerprint.
    arrays = table.set_column(table.schema.get_field_index("image"), "image",
                              image_column(frames))
    write_table(tmp_path / "hub", "arrays", arrays)
    same = run_prepare(step_env(tmp_path / "ws2", tmp_path / "hub", "reach_pixels_bc",
                                dataset={"query": QUERY.replace("frames", "arrays"),
                                         "split_by": None, "decode": None}))
    assert same["fingerprint"] == manifest["fingerprint"]

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    spec = make_spec("reach_pixels_bc", hyperparameters={"epochs": 1, "batch_size": 8,
                                                         "hidden_size": 64})
    uri = fresh_tracking_uri(tmp_path / "mlflow")
    result = run_train(make_env(spec, workspace, uri, tmp_path / "artifacts"))
    assert result["recipe"] == "bc_pixels" and np.isfinite(result["metrics"]["val_loss"])
    assert result["steps"] == -(-manifest["train_rows"] // 8)


def test_jpeg_grayscale_and_the_replay_path_decode(tmp_path: Path) -> None:
    table, frames = frames_table()
    jpegs = [encode(f, "JPEG") for f in frames]
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(jpegs, type=pa.binary()))
    decode = {"image": {"format": "jpeg", "shape": [SIDE, SIDE, 1]}}
    workspace = _prepare(tmp_path, table, decode=decode, replay={"query": QUERY, "ratio": 0.5})
    manifest = _manifest(workspace)
    assert manifest["replay"]["rows"] == EPISODES * STEPS // 2
    assert manifest["rows"] == EPISODES * STEPS * 3 // 2
    import simplejpeg  # it decides which JPEGs pass (damaged ones do not): recorded

    assert manifest["created_with"]["simplejpeg"] == simplejpeg.__version__
    rows = _shard_rows(workspace)
    position = rows["episode"].to_numpy() * STEPS + rows["step"].to_numpy()
    stored = np.asarray(rows["image"].to_pylist(), dtype=np.uint8)
    # JPEG is lossy: the shards hold what Pillow decodes, converted to one channel.
    expected = np.stack([np.asarray(Image.open(io.BytesIO(jpegs[p])).convert("L"))[..., None]
                         for p in position])
    np.testing.assert_array_equal(stored, expected)


def _jpeg(frame: np.ndarray) -> bytes:
    return encode(frame, "JPEG")


def _other_size(frame: np.ndarray) -> bytes:
    return encode(frame[:, :7])


def _truncated(frame: np.ndarray) -> bytes:
    return encode(frame)[:40]


def _sixteen_bit(frame: np.ndarray) -> bytes:
    return encode(frame[..., 0].astype(np.uint16) * 257)


def _rgba(frame: np.ndarray, transparent_rows: int = 0) -> np.ndarray:
    """`frame` with an alpha band: opaque, but 0 in its first `transparent_rows` rows."""
    alpha = np.full((*frame.shape[:2], 1), 255, dtype=np.uint8)
    alpha[:transparent_rows] = 0
    return np.concatenate([frame, alpha], axis=-1)


def _half_transparent(frame: np.ndarray) -> bytes:
    return encode(_rgba(frame, SIDE // 2))


def _one_translucent_pixel(frame: np.ndarray) -> bytes:
    rgba = _rgba(frame)
    rgba[3, 5, 3] = 254  # nearly opaque is not opaque: the colour beneath still shows
    return encode(rgba)


def _transparent_palette(frame: np.ndarray) -> bytes:
    """A P-mode PNG of four colours whose index 0 is transparent (a tRNS entry)."""
    indices = (frame[..., 0] % 4).astype(np.uint8)
    indices[0, 0] = 0  # at least one transparent pixel, whatever the frame
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    return buffer.getvalue()


BAD_VALUES = [
    pytest.param(lambda f: None, ["a null value"], id="null"),
    pytest.param(lambda f: b"not an image", ["12 bytes that are not a PNG image",
                                             "b'not an i'"], id="not-an-image"),
    pytest.param(_jpeg, ["JPEG bytes, not PNG"], id="wrong-format"),
    pytest.param(_other_size, ["a 7x8 image (width x height), not 8x8",
                               "never resized"], id="wrong-size"),
    pytest.param(_truncated, ["with a PNG signature that do not decode",
                              "do not decode as PNG"], id="truncated"),
    pytest.param(_sixteen_bit, ["not 8 bits per channel"], id="16-bit"),
    # Alpha that a column of 3 channels would drop (the colour beneath would be trained on).
    pytest.param(_half_transparent, [
        "holds an RGBA image with transparent pixels (32 of 64, 50.0%, alpha below 255)",
        "the column declares 3 channels", "Declare 4 channels to keep the alpha "
        "(dataset.decode.image.shape [8, 8, 4])", "flatten the images onto a background",
        "before ingest"], id="transparent-rgba"),
    pytest.param(_one_translucent_pixel, [
        "an RGBA image with transparent pixels (1 of 64, 1.6%", "declares 3 channels"],
        id="one-translucent-pixel"),
    pytest.param(_transparent_palette, [
        "holds a P image (transparency entry) with transparent pixels",
        "declares 3 channels", "dataset.decode.image.shape [8, 8, 4]"],
        id="transparent-palette"),
]


@pytest.mark.parametrize("make_bad, fragments", BAD_VALUES)
def test_a_bad_value_fails_prepare_naming_column_and_row(
        tmp_path: Path, make_bad: Any, fragments: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Row groups (and so the stream's batches) of 7 decoded rows: the bad row is in the 4th
    # batch, and its position counts across batches.
    monkeypatch.setattr("arf_trainer.datahub.shards.GROUP_BYTES", 7 * 236)
    _, frames = frames_table()
    images: list[bytes | None] = [encode(f) for f in frames]
    images[23] = make_bad(frames[23])  # episode 2, step 3
    table, _ = frames_table(images)
    with pytest.raises(DecodeError) as info:
        _prepare(tmp_path, table)
    message = str(info.value)
    assert "dataset.decode.image (format png, shape [8, 8, 3])" in message
    assert "row 23 of dataset.query's result (episode=2, step=3)" in message
    for fragment in fragments:
        assert fragment in message, message
    # Complete-or-absent: nothing is written as prepared.
    assert not (tmp_path / "ws" / "prepare").exists()
    assert list((tmp_path / "ws").iterdir()) == []


def _cut_short(jpeg: bytes) -> bytes:
    """The first half of the entropy-coded data, then the end-of-image marker (a copy or an
    upload that stopped early, closed by a tool that 'repairs' files)."""
    scan = jpeg.index(b"\xff\xda")
    return jpeg[:scan + (len(jpeg) - scan) // 2] + b"\xff\xd9"


def _altered(jpeg: bytes) -> bytes:
    """Two bytes of the entropy-coded data altered (bad storage, a broken transfer)."""
    scan = jpeg.index(b"\xff\xda")
    middle = scan + (len(jpeg) - scan) // 2
    return jpeg[:middle] + bytes(b ^ 0x55 for b in jpeg[middle:middle + 2]) + jpeg[middle + 2:]


@pytest.mark.parametrize("damage, warning", [
    pytest.param(_cut_short, "premature end of data segment", id="cut-short"),
    pytest.param(_altered, "Corrupt JPEG data", id="altered"),
])
def test_a_damaged_jpeg_is_refused_not_decoded_with_grey(tmp_path: Path, damage: Any,
                                                         warning: str) -> None:
    """Pillow decodes both, filling the damage with grey (asserted first); libjpeg warns, and
    prepare refuses the row by its warning."""
    _, frames = frames_table()
    jpegs = [encode(f, "JPEG") for f in frames]
    damaged = damage(jpegs[23])
    with Image.open(io.BytesIO(damaged)) as img:  # what the check is for
        assert np.asarray(img.convert("RGB")).shape == (SIDE, SIDE, 3)
    table, _ = frames_table([*jpegs[:23], damaged, *jpegs[24:]])
    with pytest.raises(DecodeError) as info:
        _prepare(tmp_path, table, decode={"image": {"format": "jpeg", "shape": [SIDE, SIDE, 3]}})
    message = str(info.value)
    assert "row 23 of dataset.query's result (episode=2, step=3)" in message
    assert f"{len(damaged)} bytes of a damaged JPEG (libjpeg: " in message
    assert warning in message and "fill the damaged part with grey" in message
    assert "filter such rows out in the query" in message
    assert list((tmp_path / "ws").iterdir()) == []


def test_opaque_rgba_pngs_decode_as_their_rgb_version(tmp_path: Path) -> None:
    # RGBA with alpha 255 everywhere (as screenshots are often saved) loses nothing in RGB.
    _, frames = frames_table()
    table, _ = frames_table([encode(_rgba(f)) for f in frames])
    rows = _shard_rows(_prepare(tmp_path, table))
    position = rows["episode"].to_numpy() * STEPS + rows["step"].to_numpy()
    stored = np.asarray(rows["image"].to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(stored, frames[position])


def test_transparent_images_are_refused_in_rgb_and_keep_their_alpha_in_four_channels(
        tmp_path: Path) -> None:
    _, frames = frames_table()
    images = [encode(_rgba(f, SIDE // 2)) for f in frames]
    images[7] = _transparent_palette(frames[7])
    table, _ = frames_table(images)
    (tmp_path / "rgb").mkdir()
    (tmp_path / "rgba").mkdir()
    with pytest.raises(DecodeError, match=r"row 0 of dataset.query's result \(episode=0, "
                                          r"step=0\) holds an RGBA image with transparent "
                                          r"pixels") as info:
        _prepare(tmp_path / "rgb", table)
    assert "shape [8, 8, 4]" in str(info.value)

    # The fix the message names: 4 channels keep every pixel's alpha, palette entries too.
    decode = {"image": {"format": "png", "shape": [SIDE, SIDE, 4]}}
    rows = _shard_rows(_prepare(tmp_path / "rgba", table, decode=decode))
    assert rows.schema.field("image").type == image_type(SIDE, SIDE, 4)
    position = rows["episode"].to_numpy() * STEPS + rows["step"].to_numpy()
    stored = np.asarray(rows["image"].to_pylist(), dtype=np.uint8)
    expected = np.stack([_rgba(frames[p], SIDE // 2) if p != 7 else
                         np.asarray(Image.open(io.BytesIO(images[7])).convert("RGBA"))
                         for p in position])
    np.testing.assert_array_equal(stored, expected)
    assert (stored[:, : SIDE // 2, :, 3] == 0).any() and (stored[..., 3] == 255).any()


def test_a_bad_replay_value_names_the_replay_query(tmp_path: Path) -> None:
    table, frames = frames_table()
    images: list[bytes | None] = [encode(f) for f in frames]
    images[5] = None
    write_table(tmp_path / "hub", "old", frames_table(images)[0])
    replay = {"query": QUERY.replace("frames", "old"), "ratio": 1.0}
    with pytest.raises(DecodeError, match=r"row 5 of dataset.replay.query's result "
                                          r"\(episode=0, step=5\) holds a null value"):
        _prepare(tmp_path, table, replay=replay)


@pytest.mark.parametrize("dataset, fragments", [
    pytest.param({"decode": {"cos_q0": {"format": "png", "shape": [8, 8, 3]}}},
                 ["dataset.decode.cos_q0", "has type float, not binary (BLOB)",
                  "remove the column from dataset.decode"], id="not-binary"),
    pytest.param({"decode": {"camera": {"format": "png", "shape": [8, 8, 3]}}},
                 ["dataset.decode.camera", "no column 'camera' in the query result",
                  "columns: episode, step, image"], id="no-such-column"),
    pytest.param({"decode": {"image": {"format": "gif", "shape": [8, 8, 3]}}},
                 ["dataset.decode.image.format='gif'", "'png', 'jpeg' or 'video'"],
                 id="bad-format"),
    pytest.param({"decode": {"image": {"format": "png", "shape": [8, 8, 2]}}},
                 ["dataset.decode.image.shape=[8, 8, 2]", "C 1, 3 or 4"], id="bad-shape"),
    pytest.param({"decode": None}, ["dataset.features column 'image' has type binary",
                                    "dataset.decode: {image: {format: png"],
                 id="undeclared-blob"),
])
def test_bad_declarations_fail_before_any_row(tmp_path: Path, dataset: dict[str, Any],
                                              fragments: list[str]) -> None:
    table, _ = frames_table()
    with pytest.raises(SpecError) as info:
        _prepare(tmp_path, table, **dataset)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert not (tmp_path / "ws" / "prepare").exists()


def test_without_decode_batches_pass_unchanged() -> None:
    decoders = Decoders(None, None)
    table, _ = frames_table()
    schema = table.schema
    assert decoders.schema(schema) == schema and decoders.manifest() is None
    batch = table.to_batches()[0]
    assert decoders.batch(batch, np.arange(batch.num_rows), schema=schema, what="q") is batch
    assert decoders.versions() == {}
