"""arrow_types.unsliced: a sliced nested fixed-size list read right by take and filter."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from arf_trainer.datahub.arrow_types import unsliced, unsliced_batch


def _frames(n: int) -> pa.Array:
    image = (np.arange(n)[:, None] + np.arange(48)[None, :]).astype(np.uint8)
    inner = pa.FixedSizeListArray.from_arrays(image.reshape(-1), 3)
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(inner, 4), 4)


def test_take_and_filter_of_a_sliced_frame_column_read_the_right_rows() -> None:
    sliced = _frames(20).slice(8)
    fixed = unsliced(sliced)
    assert fixed.type == sliced.type and fixed.offset == 0
    assert fixed.to_pylist() == sliced.to_pylist()
    want = _frames(20).take(pa.array([8, 10])).to_pylist()
    assert fixed.take(pa.array([0, 2])).to_pylist() == want
    assert unsliced_batch(pa.record_batch([sliced], names=["f"])).filter(
        pa.array([i in (0, 2) for i in range(12)])).column(0).to_pylist() == want


def test_nulls_and_other_types_are_kept() -> None:
    pairs = pa.array([[1, 2], None, [3, 4]], pa.list_(pa.int32(), 2)).slice(1)
    assert unsliced(pairs).to_pylist() == [None, [3, 4]]
    plain = pa.array([1.0, 2.0, 3.0]).slice(1)
    assert unsliced(plain) is plain
