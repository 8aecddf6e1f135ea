"""`arf-trainer lineage` (what `arf training reproduce` reads) on a run whose record was edited:
a named error (exit 2), never a Python traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_testkit import fresh_tracking_uri, make_env, make_spec, prepare_digits

from arf_trainer.errors import SpecError
from arf_trainer.lineage import read_lineage
from arf_trainer.trainer.run import run_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("lineage")
    uri = fresh_tracking_uri(root)
    prepare_digits(root / "ws", rows=300)
    spec = make_spec("digits_smoke", hyperparameters={"epochs": 1, "hidden_size": 8})
    result = run_train(make_env(spec, root / "ws", uri, root / "artifacts"))
    return uri, result["mlflow_run_id"]


def test_an_untouched_record_reads(trained: tuple[str, str]) -> None:
    uri, run_id = trained
    lineage = read_lineage(uri, run_id)
    assert lineage["world_size"] == 1 and isinstance(lineage["conf"], dict)


@pytest.mark.parametrize("tag, value, fragment", [
    ("arf.world_size", "abc", "arf.world_size='abc'"),
    ("arf.world_size", "0", "not a positive whole number"),
    ("arf.conf", "{not json", "arf.conf='{not json'"),
    ("arf.conf", "[1, 2]", "not a JSON object"),
    ("arf.data_tables", "null", "arf.data_tables='null'"),
])
def test_an_edited_tag_is_named(trained: tuple[str, str], tag: str, value: str,
                                fragment: str) -> None:
    from mlflow import MlflowClient

    uri, run_id = trained
    client = MlflowClient(uri)
    before = client.get_run(run_id).data.tags[tag]
    client.set_tag(run_id, tag, value)
    try:
        with pytest.raises(SpecError, match="restore the tag") as caught:
            read_lineage(uri, run_id)
        assert fragment in str(caught.value) and run_id in str(caught.value)
    finally:
        client.set_tag(run_id, tag, before)


def test_a_missing_resolved_config_is_named(trained: tuple[str, str], tmp_path: Path) -> None:
    import shutil

    from mlflow import MlflowClient

    uri, run_id = trained
    artifacts = Path(MlflowClient(uri).get_run(run_id).info.artifact_uri.removeprefix("file://"))
    target = artifacts / "arf" / "resolved_config.json"
    shutil.move(target, tmp_path / "saved.json")
    try:
        with pytest.raises(SpecError, match="arf/resolved_config.json cannot be read"):
            read_lineage(uri, run_id)
    finally:
        shutil.move(tmp_path / "saved.json", target)
