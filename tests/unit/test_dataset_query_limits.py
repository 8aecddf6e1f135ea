"""What prepare gives DuckDB and Arrow from the template's `training.resources`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from arf_trainer.datahub.dataset_query import QUERY_MEMORY_LIMIT, _memory_limits, cpu_threads


def _env(**resources: object) -> SimpleNamespace:
    return SimpleNamespace(spec=SimpleNamespace(training={"resources": resources}))


@pytest.mark.parametrize(("memory", "duckdb"), [
    ("8Gi", "1024MiB"),      # an eighth
    ("1Gi", "128MiB"),       # an eighth, which is also the small-ceiling floor
    ("512Mi", "128MiB"),     # the floor: min(half, 128 MiB)
    ("128Mi", "64MiB"),      # half of a small ceiling
    ("2000000000", "238MiB"),  # plain bytes
    ("1.5G", "178MiB"),      # decimal unit with a fraction
    ("64Ki", "1MiB"),        # binary kilo parses (it fell back to the default); 1 MiB at least
    ("64Gi", "1907MiB"),     # capped at 2 GB
])
def test_duckdb_gets_an_eighth_of_the_step_memory(memory: str, duckdb: str) -> None:
    assert _memory_limits(_env(memory=memory)) == (duckdb, f"resources.memory: {memory}")


def test_no_or_unreadable_memory_keeps_the_default() -> None:
    assert _memory_limits(_env()) == (QUERY_MEMORY_LIMIT, None)
    assert _memory_limits(_env(memory="lots")) == (QUERY_MEMORY_LIMIT, "resources.memory: lots")


@pytest.mark.parametrize(("cpu", "threads"), [(2, 2), ("500m", 1), ("1500m", 2), ("3", 3),
                                              (None, None), ("x", None)])
def test_threads_follow_resources_cpu(cpu: object, threads: int | None) -> None:
    assert cpu_threads(_env(**({} if cpu is None else {"cpu": cpu}))) == threads
