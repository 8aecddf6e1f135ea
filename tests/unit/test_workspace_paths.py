"""A run's workspace folder is `<workspace root>/<dag_id>/<run_id>`: one folder per run, inside
the root, whatever run id Airflow accepted (`allowed_run_id_pattern`: `[A-Za-z0-9_.~:+-]+`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from arf_training.settings import ArfSettings
from arf_training.stepspec import workspace_for


@pytest.fixture
def settings(tmp_path: Path) -> ArfSettings:
    return ArfSettings(home=tmp_path, tracking_uri="sqlite:///x.db", datahub_uri=str(tmp_path),
                       artifact_root=str(tmp_path))


@pytest.mark.parametrize("run_id", [".", "..", "...", "a..b", "~", "%2E%2E"])
def test_every_run_id_names_a_folder_inside_its_dags(settings: ArfSettings, run_id: str) -> None:
    """`.` and `..` are valid run ids: as folder names they were the DAG's own folder and the
    workspace root, so a run's checkpoints and results mixed with other runs'."""
    workspace = workspace_for(settings, "digits_smoke", run_id)
    dag_folder = settings.workspace_root / "digits_smoke"
    assert workspace.parent == dag_folder and workspace.name not in (".", "..")
    assert workspace.resolve().parent == dag_folder.resolve()


def test_distinct_run_ids_get_distinct_folders(settings: ArfSettings) -> None:
    """`~` was written as `_`: runs `a~b` and `a_b` shared a workspace (and so resumed from
    each other's checkpoints)."""
    ids = ["a~b", "a_b", "a%7Eb", "..", "%2E%2E", ".", "%2E", "manual__2026-12-05T03:56:32+00:00"]
    folders = [workspace_for(settings, "d", run_id).name for run_id in ids]
    assert len(set(folders)) == len(ids)


def test_usual_run_ids_keep_their_folder_names(settings: ArfSettings) -> None:
    for run_id in ("manual__2026-12-05T03:56:32.123456+00:00", "arf__20261205T035632-1a2b",
                   "scheduled__2026-12-05T02:00:00+00:00", "backfill__x:y=z"):
        assert workspace_for(settings, "reach_bc", run_id).name == run_id
