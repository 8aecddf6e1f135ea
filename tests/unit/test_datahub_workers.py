"""Per-row image work on threads (arf_trainer.datahub.workers): as many as the step's CPU
budget, and the same pixels and the same first error whatever their number."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
from test_prepare_decode import encode

from arf_trainer.datahub import workers
from arf_trainer.datahub.decode import ImageDecoder
from arf_trainer.errors import DecodeError


@pytest.mark.parametrize("budget, expected", [("3", 3), ("1", 1), ("64", workers.MAX_THREADS)])
def test_threads_follow_the_steps_cpu_budget(monkeypatch, budget, expected) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", budget)
    assert workers.worker_threads() == expected


def test_without_a_budget_the_usable_cores_count(monkeypatch) -> None:
    import os

    for value in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert workers.worker_threads() == min(workers.MAX_THREADS,
                                               len(os.sched_getaffinity(0)))


def test_any_number_of_threads_decodes_the_same_and_names_the_first_bad_row(
        monkeypatch) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(64, 16, 16, 3), dtype=np.uint8)
    good = [encode(f) for f in frames]
    decoder = ImageDecoder("image", "png", (16, 16, 3))
    results, errors = [], []
    for threads in (1, 4):
        monkeypatch.setattr(workers, "_pool", ThreadPoolExecutor(threads))
        results.append(decoder.decode(pa.array(good, pa.binary()), where=str).to_pylist())
        bad = list(good)
        bad[9], bad[40] = b"not an image", None  # the later one is the quicker to refuse
        with pytest.raises(DecodeError) as info:
            decoder.decode(pa.array(bad, pa.binary()), where=lambda i: f"row {i}")
        errors.append(str(info.value))
    assert results[0] == results[1]
    assert np.array_equal(np.asarray(results[0], dtype=np.uint8), frames)
    assert errors[0] == errors[1] and "row 9 holds 12 bytes that are not a PNG" in errors[0]
