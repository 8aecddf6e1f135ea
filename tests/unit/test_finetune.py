"""Failure learning, container side, for real: the nightly fine-tune's prepare (data-interval
parameters, skip_if_empty, replay) on a real Delta hub, and its train step (base model from the
MLflow registry, frozen layers, lineage) with torch and MLflow on sqlite."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from trainer_testkit import REPO, fresh_tracking_uri, make_env, make_spec, prepare_reach

from arf_trainer.cli import main as cli_main
from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.tables import write_table
from arf_trainer.errors import SKIP_EXIT, NothingToDo, SpecError
from arf_trainer.publisher import run_register
from arf_trainer.spec import JobSpec, StepEnv
from arf_trainer.trainer import base_model
from arf_trainer.trainer.checkpoint import load_weights
from arf_trainer.trainer.run import run_train
from arf_training.templates import parse_template

UTC = dt.UTC
START = dt.datetime(2026, 11, 25, 2, tzinfo=UTC)
END = dt.datetime(2026, 11, 26, 2, tzinfo=UTC)
FINETUNE = "reach_bc_failure_finetune"
STEPS = 5  # time steps per synthetic episode


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def _rows(episodes: list[int], *, collected_at: list[dt.datetime] | None = None,
          success: bool = True) -> pa.Table:
    """Episodes of STEPS rows in the reach step layout (corrections / reach_demos columns)."""
    n = len(episodes) * STEPS
    rng = np.random.default_rng(len(episodes))
    columns: dict[str, Any] = {
        "episode": pa.array(np.repeat(np.array(episodes, dtype=np.int64), STEPS)),
        "step": pa.array(np.tile(np.arange(STEPS, dtype=np.int32), len(episodes))),
    }
    columns.update({f"obs_{j}": pa.array(rng.normal(size=n).astype(np.float32))
                    for j in range(10)})
    columns.update({f"act_{j}": pa.array(rng.normal(size=n).astype(np.float32))
                    for j in range(2)})
    columns["success"] = pa.array(np.full(n, success))
    if collected_at is not None:
        columns["collected_at"] = pa.array(np.repeat(collected_at, STEPS).tolist(),
                                           type=pa.timestamp("us", tz="UTC"))
    return pa.table(columns)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """corrections: one episode per boundary case around [START, END); reach_demos: 40."""
    root = tmp_path_factory.mktemp("hub")
    micro = dt.timedelta(microseconds=1)
    times = [START - micro, START, START + dt.timedelta(hours=5), END - micro, END]
    write_table(root, "corrections", _rows([-1, -2, -3, -4, -5], collected_at=times))
    write_table(root, "reach_demos", _rows(list(range(40))))
    return root


def finetune_template(**dataset: Any) -> dict[str, Any]:
    """The shipped fine-tune template as the Airflow side hands it over (macros rewritten)."""
    text = (REPO / "config_templates" / f"{FINETUNE}.yaml").read_text()
    template = parse_template(text).model_dump(mode="json", by_alias=True)
    template["dataset"].update(dataset)
    return template


def prepare_env(workspace: Path, hub: Path, template: dict[str, Any], *,
                start: dt.datetime | None = START, end: dt.datetime | None = END,
                seed: int = 0) -> StepEnv:
    spec = {
        "spec_version": 1, "step": "prepare", "template": template, "template_sha256": "0" * 64,
        "conf": {}, "hyperparameters": {}, "seed": seed,
        "run": {"dag_id": FINETUNE, "run_id": "scheduled__1", "task_id": "prepare_data",
                "try_number": 1, "logical_date": end and end.isoformat(),
                "data_interval_start": start and start.isoformat(),
                "data_interval_end": end and end.isoformat()},
    }
    return StepEnv(workspace=workspace, result_path=workspace / "prepare" / "result.json",
                   tracking_uri="sqlite:///unused.db", artifact_root=None, datahub=hub,
                   spec=JobSpec.from_dict(spec))


def _manifest(workspace: Path) -> dict[str, Any]:
    return json.loads((workspace / "prepare" / "manifest.json").read_text())


# --- prepare: the data interval ----------------------------------------------------------------


def test_interval_query_selects_exactly_the_corrections_inside(tmp_path: Path, hub: Path) -> None:
    template = finetune_template(replay=None, validation_split=0.0)
    summary = run_prepare(prepare_env(tmp_path, hub, template))
    manifest = _manifest(tmp_path)
    # START is inside, END is not; a microsecond before START is not.
    assert summary["rows"] == 3 * STEPS and manifest["new_rows"] == 3 * STEPS
    import pyarrow.parquet as pq

    episodes = pq.read_table(tmp_path / "prepare" / manifest["shards"]["train"][0]["path"],
                             columns=["episode"])["episode"].to_pylist()
    assert sorted(set(episodes)) == [-4, -3, -2]
    assert manifest["parameters"] == {"data_interval_start": START.isoformat(),
                                      "data_interval_end": END.isoformat(),
                                      "logical_date": END.isoformat()}
    assert manifest["tables"]["corrections"]["version"] == 0
    assert "$data_interval_start" in manifest["query"] and "{{" not in manifest["query"]


def test_empty_interval_skips_with_exit_99(tmp_path: Path, hub: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    later = END + dt.timedelta(days=3)
    env = prepare_env(tmp_path, hub, finetune_template(), start=later,
                      end=later + dt.timedelta(days=1))
    with pytest.raises(NothingToDo, match="no new rows between 2026-11-29T02:00:00"):
        run_prepare(env)
    assert not (tmp_path / "prepare").exists()  # nothing half-written for a retry to reuse

    # Through the CLI, as a backend runs it: exit code 99 and the reason on the last line.
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(env.spec.raw))
    for key, value in {"ARF_JOB_SPEC": str(spec_path), "ARF_WORKSPACE": str(tmp_path / "w"),
                       "ARF_TRACKING_URI": "sqlite:///unused.db",
                       "ARF_DATAHUB_URI": str(hub)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ARF_JOB_SPEC_JSON", raising=False)
    assert cli_main(["prepare"]) == SKIP_EXIT == 99
    assert "skipped: no new rows between" in capsys.readouterr().err


def test_empty_result_without_skip_if_empty_is_still_an_error(tmp_path: Path, hub: Path) -> None:
    later = END + dt.timedelta(days=3)
    env = prepare_env(tmp_path, hub, finetune_template(skip_if_empty=False), start=later,
                      end=later + dt.timedelta(days=1))
    with pytest.raises(Exception, match="returned 0 rows.*skip_if_empty") as info:
        run_prepare(env)
    assert not isinstance(info.value, NothingToDo) and info.value.exit_code == 2


def test_run_without_data_interval_is_bad_input(tmp_path: Path, hub: Path) -> None:
    env = prepare_env(tmp_path, hub, finetune_template(), start=None, end=None)
    with pytest.raises(SpecError, match=r"uses \$data_interval_end, \$data_interval_start.*"
                                        r"no data interval.*logical date"):
        run_prepare(env)


# --- prepare: replay -------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,expected", [
    pytest.param(1.0, 15, id="one-to-one"),
    pytest.param(2.5, 38, id="round-2.5x15"),   # round(37.5) = 38 (banker's: 38)
    pytest.param(100.0, 205, id="capped-at-all-rows"),
])
def test_replay_ratio_is_honoured(tmp_path: Path, hub: Path, ratio: float,
                                  expected: int) -> None:
    template = finetune_template(replay={**finetune_template()["dataset"]["replay"],
                                         "ratio": ratio})
    run_prepare(prepare_env(tmp_path, hub, template))
    manifest = _manifest(tmp_path)
    assert manifest["new_rows"] == 15
    assert manifest["replay"]["rows_requested"] == round(ratio * 15)
    assert manifest["replay"]["rows"] == expected and manifest["rows"] == 15 + expected
    # The demonstrations and the one correction episode collected before the interval (the
    # earlier nights'); none of tonight's or later ones.
    assert manifest["replay"]["rows_available"] == 40 * STEPS + STEPS
    # Lineage covers both queries' tables.
    assert set(manifest["tables"]) == {"corrections", "reach_demos"}


def test_replay_sample_is_reproducible_with_the_seed(tmp_path: Path, hub: Path) -> None:
    template = finetune_template()
    prints = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_prepare(prepare_env(tmp_path / name, hub, template, seed=seed))
        prints.append(_manifest(tmp_path / name)["fingerprint"])
    assert prints[0] == prints[1] != prints[2]


def test_replay_with_other_columns_names_them(tmp_path: Path, hub: Path) -> None:
    template = finetune_template(replay={"query": "SELECT * FROM reach_demos", "ratio": 1.0})
    with pytest.raises(SpecError, match=r"same columns.*extra: \['success'\]"):
        run_prepare(prepare_env(tmp_path, hub, template))


# --- train: the base model -------------------------------------------------------------------

BASE_HP = {"epochs": 2, "hidden_size": 16, "num_layers": 2, "batch_size": 64}


def _register_base(tmp: Path, uri: str, name: str) -> str:
    """Train + register a reach_bc version (synthetic data); return its version."""
    ws = tmp / name
    prepare_reach(ws)
    spec = make_spec("reach_bc", run_id=name, hyperparameters=BASE_HP)
    assert run_train(make_env(spec, ws, uri, tmp / "artifacts")) is not None
    spec = make_spec("reach_bc", "register", run_id=name, hyperparameters=BASE_HP)
    return run_register(make_env(spec, ws, uri, tmp / "artifacts"))["model_version"]


def _finetune_spec(step: str = "train", **training: Any) -> dict[str, Any]:
    spec = make_spec(FINETUNE, step, run_id="scheduled__ft",
                     hyperparameters={"epochs": 2, "batch_size": 64}, training=training)
    spec["template"] = copy.deepcopy(finetune_template())
    spec["template"]["training"].update(training)
    return spec


def test_missing_champion_is_a_clear_bad_input_error(tmp_path: Path) -> None:
    uri = fresh_tracking_uri(tmp_path)
    _register_base(tmp_path, uri, "base")
    ws = tmp_path / "ft"
    prepare_reach(ws)
    with pytest.raises(SpecError) as info:
        run_train(make_env(_finetune_spec(), ws, uri, tmp_path / "artifacts"))
    message = str(info.value)
    assert "has no alias 'champion'" in message and "versions: 1" in message
    assert "set_registered_model_alias('reach_bc_policy', 'champion'" in message
    assert info.value.exit_code == 2


def test_finetune_from_champion_freezes_layers_and_records_lineage(tmp_path: Path) -> None:
    import mlflow

    uri = fresh_tracking_uri(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = _register_base(tmp_path, uri, "base1")
    client.set_registered_model_alias("reach_bc_policy", "champion", first)
    base_weights = load_weights(tmp_path / "base1" / "train" / "model.pt")

    ws = tmp_path / "ft"
    prepare_reach(ws, rows=300)
    spec = _finetune_spec(freeze_layers=1)
    result = run_train(make_env(spec, ws, uri, tmp_path / "artifacts"))
    assert result is not None and result["steps"] > 0
    tuned = load_weights(ws / "train" / "model.pt")

    # The base's architecture and normalization; frozen first hidden layer; the rest trained.
    assert set(tuned) == set(base_weights)
    for key in ("input_mean", "input_std", "output_mean", "output_std", "net.0.weight",
                "net.0.bias"):
        assert torch.equal(tuned[key], base_weights[key]), key
    for key in ("net.2.weight", "net.4.weight", "net.4.bias"):
        assert not torch.equal(tuned[key], base_weights[key]), key

    # Lineage on the training run and, through register, on the candidate version.
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["arf.base_model"] == "models:/reach_bc_policy@champion"
    assert run.data.tags["arf.base_model_version"] == first
    registered = run_register(make_env(_finetune_spec("register"), ws, uri,
                                       tmp_path / "artifacts"))
    version = client.get_model_version("reach_bc_policy", registered["model_version"])
    assert registered["model_version"] == "2"
    assert version.tags["arf.base_model"] == "models:/reach_bc_policy@champion"
    assert version.tags["arf.base_model_version"] == first
    assert json.loads(version.tags["arf.data_tables"]) == {"test": 3}


def test_alias_is_resolved_once_per_training(tmp_path: Path) -> None:
    """A retry pins the version the first try resolved, even after the champion moved."""
    import mlflow

    uri = fresh_tracking_uri(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = _register_base(tmp_path, uri, "base1")
    second = _register_base(tmp_path, uri, "base2")
    client.set_registered_model_alias("reach_bc_policy", "champion", first)
    folder = tmp_path / "ws" / "train" / base_model.FOLDER
    pinned = base_model.pin("models:/reach_bc_policy@champion", folder, uri)
    client.set_registered_model_alias("reach_bc_policy", "champion", second)
    again = base_model.pin("models:/reach_bc_policy@champion", folder, uri)
    assert pinned == again and again["version"] == first
    loaded = base_model.load(again, folder)
    assert loaded.info.hidden_size == 16 and loaded.tags["arf.base_model_version"] == first
    fresh = base_model.pin("models:/reach_bc_policy@champion", tmp_path / "other", uri)
    assert fresh["version"] == second


def test_freezing_more_layers_than_the_base_has_says_so(tmp_path: Path) -> None:
    import mlflow

    uri = fresh_tracking_uri(tmp_path)
    version = _register_base(tmp_path, uri, "base1")
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        "reach_bc_policy", "champion", version)
    ws = tmp_path / "ft"
    prepare_reach(ws)
    with pytest.raises(SpecError, match="freeze_layers=3, but the base model has 2 hidden"):
        run_train(make_env(_finetune_spec(freeze_layers=3), ws, uri, tmp_path / "artifacts"))


@pytest.mark.parametrize(("base_shape", "data_shape", "fragment"), [
    pytest.param({"arrays": {"frame": [16, 16, 3]}, "input_width": 4},
                 {"arrays": {"frame": [24, 24, 3]}, "input_width": 4},
                 "its array columns have per-row shapes {'frame': [16, 16, 3]}, this dataset's "
                 "{'frame': [24, 24, 3]}", id="frame-size"),
    pytest.param({"input_width": 10}, {"input_width": 12},
                 "it takes 10 input values per row, this dataset gives 12", id="array-width"),
])
def test_a_base_of_other_input_shapes_is_refused_before_training(base_shape, data_shape,
                                                                  fragment) -> None:
    """A bc_pixels fine-tune on frames of another size (or an MLP on array columns of another
    width) passed the name checks and failed in the first forward pass, with torch's message."""
    from arf_trainer.trainer.recipes import ModelInfo

    def info(shape: dict[str, Any]) -> ModelInfo:
        return ModelInfo(recipe="bc_pixels" if "arrays" in shape else "bc",
                         features=["frame", "q"], targets=["a"], hidden_size=8, num_layers=1,
                         n_outputs=2, **shape)

    base = base_model.BaseModel(uri="models:/m@champion", name="m", version="3", run_id="r",
                                weights_sha256="0" * 64, info=info(base_shape), weights={})
    data = info(data_shape)
    with pytest.raises(SpecError, match="does not fit") as caught:
        base_model.check_compatible(base, data.recipe, data.features, data.targets, {},
                                    data=data)
    assert fragment in str(caught.value)
    base_model.check_compatible(base, data.recipe, data.features, data.targets, {},
                                data=info(base_shape))
