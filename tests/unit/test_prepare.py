"""The demo seeder and the prepare step, end to end on a real (small) seeded data hub."""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from arf_trainer.cli import main as cli_main
from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.seed import seed_demo
from arf_trainer.datahub.tables import open_table
from arf_trainer.errors import DataHubError, QueryError, SpecError
from arf_trainer.spec import StepEnv

REPO = Path(__file__).resolve().parents[2]
EPISODES = 12


def load_template(name: str) -> dict[str, Any]:
    """A template as the Airflow side hands it over: the YAML with defaults filled."""
    template = yaml.safe_load((REPO / "config_templates" / f"{name}.yaml").read_text())
    template["dataset"].setdefault("tables", {})
    template["dataset"].setdefault("allow_query_override", False)
    template["model"].setdefault("base_model", None)
    return template


def step_env(workspace: Path, hub: Path, template_name: str = "reach_bc", *,
             dataset: dict[str, Any] | None = None, conf: dict[str, Any] | None = None,
             seed: int = 0) -> StepEnv:
    """A StepEnv built the way `arf-trainer prepare` builds it: ARF_* variables + spec JSON."""
    template = copy.deepcopy(load_template(template_name))
    template["dataset"].update(dataset or {})
    spec = {
        "spec_version": 1, "step": "prepare", "template": template, "template_sha256": "0" * 64,
        "conf": conf or {}, "hyperparameters": {}, "seed": seed,
        "run": {"dag_id": f"arf_{template_name}", "run_id": "manual__1", "task_id": "prepare",
                "try_number": 1},
    }
    return StepEnv.from_environ({
        "ARF_JOB_SPEC_JSON": json.dumps(spec), "ARF_WORKSPACE": str(workspace),
        "ARF_TRACKING_URI": f"sqlite:///{workspace}/unused.db",
        "ARF_DATAHUB_URI": hub.as_uri(), "ARF_DAG_ID": spec["run"]["dag_id"],
        "ARF_RUN_ID": "manual__1",
    })


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    seed_demo(root, episodes=EPISODES, seed=0, force=False)
    return root


# --- seed -------------------------------------------------------------------------------------


def test_seed_tables_schema_and_content(hub: Path) -> None:
    reach = open_table(hub, "reach_demos").dataset.to_table()
    assert reach.num_rows == EPISODES * 50
    schema = reach.schema
    assert schema.field("episode").type == pa.int64()
    assert schema.field("step").type == pa.int32()
    assert [schema.field(f"obs_{i}").type for i in range(10)] == [pa.float32()] * 10
    assert schema.field("act_0").type == pa.float32() and schema.field("success").type == pa.bool_()
    assert schema.field("seed").type == pa.int64()
    assert schema.field("collected_at").type == pa.timestamp("us", tz="UTC")
    assert sorted(set(reach["episode"].to_pylist())) == list(range(EPISODES))
    assert 0.5 < sum(reach["success"].to_pylist()) / reach.num_rows <= 1.0
    digits = open_table(hub, "digits").dataset.to_table()
    assert digits.num_rows == 1797
    assert digits.schema.field("pixel_63").type == pa.float32()
    assert digits.schema.field("label").type == pa.int64()
    assert min(digits["pixel_10"].to_pylist()) >= 0.0 and max(digits["pixel_10"].to_pylist()) <= 1


def test_seed_is_idempotent_deterministic_and_force_appends(tmp_path: Path, hub: Path) -> None:
    root = tmp_path / "hub"
    first = seed_demo(root, episodes=3, seed=0, force=False)
    assert first == {"reach_demos": {"rows": 150, "version": 0, "action": "created"},
                     "digits": {"rows": 1797, "version": 0, "action": "created"},
                     "corrections": {"rows": 0, "version": 0, "action": "created"}}
    again = seed_demo(root, episodes=3, seed=0, force=False)
    assert {t: e["action"] for t, e in again.items()} == {"reach_demos": "unchanged",
                                                          "digits": "unchanged",
                                                          "corrections": "unchanged"}
    # Same seed, same episodes: the same rows as the first 3 episodes of the shared hub.
    columns = [f"obs_{i}" for i in range(10)] + ["act_0", "act_1", "success"]
    mine = open_table(root, "reach_demos").dataset.to_table(columns=columns)
    shared = open_table(hub, "reach_demos").dataset.to_table(columns=columns).slice(0, 150)
    assert mine.equals(shared)

    forced = seed_demo(root, episodes=2, seed=1, force=True)
    assert forced["reach_demos"] == {"rows": 250, "version": 1, "action": "appended"}
    assert forced["digits"] == {"rows": 1797, "version": 1, "action": "overwritten"}
    episodes = open_table(root, "reach_demos").dataset.to_table(columns=["episode"])
    assert sorted(set(episodes["episode"].to_pylist())) == [0, 1, 2, 3, 4]
    with pytest.raises(DataHubError, match="episodes=0"):
        seed_demo(root, episodes=0, seed=0, force=False)


def test_seed_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["datahub", "seed", "--hub", str(tmp_path / "h"), "--episodes", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reach_demos"]["rows"] == 100
    when = "2026-11-26T01:00:00+00:00"
    assert cli_main(["datahub", "seed", "--hub", str(tmp_path / "t"), "--episodes", "1",
                     "--collected-at", when]) == 0
    times = open_table(tmp_path / "t", "reach_demos").dataset.to_table()["collected_at"]
    assert {t.isoformat() for t in times.to_pylist()} == {when}
    with pytest.raises(DataHubError, match="time zone"):
        seed_demo(tmp_path / "n", episodes=1, collected_at=dt.datetime(2026, 1, 1))


def test_two_seedings_prepare_the_same_fingerprint(tmp_path: Path, hub: Path) -> None:
    """The demo's `SELECT *` reads collected_at too: seeded at the wall-clock time, each seeding
    (each machine) had other rows and so another dataset fingerprint."""
    again = tmp_path / "again"
    seed_demo(again, episodes=EPISODES, seed=0, force=False)
    assert run_prepare(step_env(tmp_path / "a", hub))["fingerprint"] \
        == run_prepare(step_env(tmp_path / "b", again))["fingerprint"]


# --- prepare ----------------------------------------------------------------------------------


def _manifest(workspace: Path) -> dict[str, Any]:
    return json.loads((workspace / "prepare" / "manifest.json").read_text())


def test_prepare_writes_shards_and_manifest(tmp_path: Path, hub: Path) -> None:
    workspace = tmp_path / "ws"
    # The row split (the template's episode split: test_prepare_stream.py).
    result = run_prepare(step_env(workspace, hub, dataset={"split_by": None}))
    manifest = _manifest(workspace)
    successful = open_table(hub, "reach_demos").dataset.to_table(
        filter=pc.field("success")).num_rows

    assert result == {
        "rows": successful, "train_rows": manifest["train_rows"],
        "val_rows": manifest["val_rows"], "tables": manifest["tables"],
        "fingerprint": manifest["fingerprint"],
        "manifest": str(workspace / "prepare" / "manifest.json"), "reused": False,
    }
    assert manifest["query"].strip() == "SELECT * FROM reach_demos WHERE success"
    assert manifest["rows"] == manifest["train_rows"] + manifest["val_rows"] == successful
    assert manifest["val_rows"] == int(successful * 0.1)
    assert manifest["features"] == [f"obs_{i}" for i in range(10)]
    assert manifest["targets"] == ["act_0", "act_1"]
    assert manifest["columns"][0] == {"name": "episode", "type": "int64", "dtype": "int64",
                                      "shape": []}
    assert manifest["tables"] == {"reach_demos": {"version": 0,
                                                  "uri": (hub / "reach_demos").as_uri()}}
    assert manifest["validation_split"] == 0.1 and manifest["seed"] == 0
    assert set(manifest["created_with"]) == {"duckdb", "pyarrow"}
    assert [s["path"] for s in manifest["shards"]["train"]] == ["train/shard-00000.parquet"]
    rows = 0
    for split in ("train", "val"):
        for shard in manifest["shards"][split]:
            table = pq.read_table(workspace / "prepare" / shard["path"])
            assert table.num_rows == shard["rows"]
            rows += shard["rows"]
    assert rows == manifest["rows"]
    assert [p.name for p in workspace.iterdir()] == ["prepare"]  # no temp folders left


def test_prepare_is_deterministic_and_seed_dependent(tmp_path: Path, hub: Path) -> None:
    one = run_prepare(step_env(tmp_path / "a", hub))
    two = run_prepare(step_env(tmp_path / "b", hub))
    other_seed = run_prepare(step_env(tmp_path / "c", hub, seed=1))
    assert one["fingerprint"] == two["fingerprint"]
    assert other_seed["fingerprint"] != one["fingerprint"]
    assert other_seed["rows"] == one["rows"]


def test_a_split_that_leaves_no_training_rows_is_refused(tmp_path: Path) -> None:
    """One episode, split by episode: it goes wholly to one side, and for some seeds that is
    validation. Prepare succeeded with train_rows 0, and training failed later."""
    root = tmp_path / "hub"
    seed_demo(root, episodes=1, seed=0, force=False)
    dataset = {"validation_split": 0.5, "query": "SELECT * FROM reach_demos"}
    outcomes = {}
    for seed in range(6):
        workspace = tmp_path / f"ws{seed}"
        try:
            outcomes[seed] = run_prepare(step_env(workspace, root, dataset=dataset,
                                                  seed=seed))["train_rows"]
        except DataHubError as exc:
            assert "the split left no training rows: all 50 rows went to validation" in str(exc)
            assert "lower dataset.validation_split" in str(exc)
            assert not (workspace / "prepare").exists()  # nothing half-written
            outcomes[seed] = None
    assert None in outcomes.values() and 50 in outcomes.values(), outcomes


def test_retry_reuses_the_manifest_without_querying(tmp_path: Path, hub: Path) -> None:
    workspace = tmp_path / "ws"
    first = run_prepare(step_env(workspace, hub))
    # Point the retry at a hub that does not exist: reusing must not query at all.
    retry = run_prepare(step_env(workspace, tmp_path / "no-hub"))
    assert retry == {**first, "reused": True}

    shard = workspace / "prepare" / "train" / "shard-00000.parquet"
    shard.write_bytes(b"tampered")
    with pytest.raises(DataHubError, match="does not match its sha256"):
        run_prepare(step_env(workspace, hub))


def test_a_prepared_folder_of_another_request_is_set_aside_not_reused(tmp_path: Path,
                                                                        hub: Path) -> None:
    """The same workspace (one run id) asked for other rows: a template edited between two
    tries, or a DagRun deleted and triggered again under its run id with another conf. The
    earlier rows were reused whatever the request; now they are kept aside and prepared anew."""
    workspace = tmp_path / "ws"
    first = run_prepare(step_env(workspace, hub))
    other = run_prepare(step_env(workspace, hub, seed=1))
    assert other["reused"] is False and other["fingerprint"] != first["fingerprint"]
    kept = [p.name for p in workspace.iterdir() if p.name.startswith("prepare.request-")]
    assert len(kept) == 1
    aside = json.loads((workspace / kept[0] / "manifest.json").read_text())
    assert aside["fingerprint"] == first["fingerprint"]
    narrower = {"query": "SELECT * FROM reach_demos WHERE success AND episode < 6"}
    third = run_prepare(step_env(workspace, hub, seed=1, dataset=narrower))
    assert third["reused"] is False and third["rows"] < other["rows"]
    assert run_prepare(step_env(workspace, hub, seed=1, dataset=narrower))["reused"] is True

    # A manifest written before requests were recorded is reused as it was.
    manifest_path = workspace / "prepare" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["request_sha256"]
    manifest_path.write_text(json.dumps(manifest))
    assert run_prepare(step_env(workspace, hub, seed=5))["reused"] is True


def test_pinned_version_and_globs(tmp_path: Path, hub: Path) -> None:
    local_hub = tmp_path / "hub"
    shutil.copytree(hub, local_hub)
    seed_demo(local_hub, episodes=2, seed=5, force=True)  # reach_demos v1 has 2 more episodes
    pinned = run_prepare(step_env(tmp_path / "pinned", local_hub,
                                  dataset={"tables": {"reach_demos": 0},
                                           "query": "SELECT * FROM reach_demos",
                                           "features": ["obs_[0-3]", "obs_*"],
                                           "targets": ["act_?"]}))
    assert pinned["rows"] == EPISODES * 50
    assert pinned["tables"]["reach_demos"]["version"] == 0
    manifest = _manifest(tmp_path / "pinned")
    # Patterns in order, each one's matches in result-column order, no repeats.
    assert manifest["features"] == [f"obs_{i}" for i in range(10)]
    latest = run_prepare(step_env(tmp_path / "latest", local_hub,
                                  dataset={"query": "SELECT * FROM reach_demos"}))
    assert latest["rows"] == (EPISODES + 2) * 50
    assert latest["tables"]["reach_demos"]["version"] == 1


@pytest.mark.parametrize(("allow", "conf", "expected"), [
    pytest.param(True, {"dataset_query": "SELECT * FROM reach_demos WHERE step < 10"}, "override",
                 id="allowed"),
    pytest.param(False, {"dataset_query": ""}, "template", id="empty-is-no-override"),
    pytest.param(False, {"dataset_query": "SELECT * FROM reach_demos WHERE success\n"},
                 "template", id="same-as-template"),
    pytest.param(False, {}, "template", id="absent"),
])
def test_query_override(tmp_path: Path, hub: Path, allow: bool, conf: dict[str, Any],
                        expected: str) -> None:
    env = step_env(tmp_path / "ws", hub, dataset={"allow_query_override": allow}, conf=conf)
    run_prepare(env)
    query = _manifest(tmp_path / "ws")["query"]
    if expected == "override":
        assert query == conf["dataset_query"]
    else:
        assert query == env.spec.dataset["query"]


@pytest.mark.parametrize(("override", "fragment"), [
    # Invalid SQL past the cap: the length is reported, so nothing parsed it.
    pytest.param("SELECT 1 " + "?" * 40_000, "dataset.query is 40,009 characters long, over the "
                 "limit of 32,768", id="oversized-text"),
    pytest.param(["SELECT 1"] * 100_000, "got list ['SELECT 1', ", id="huge-non-string"),
])
def test_oversized_override_is_refused_quoting_a_prefix(tmp_path: Path, hub: Path, override: Any,
                                                        fragment: str) -> None:
    env = step_env(tmp_path / "ws", hub, dataset={"allow_query_override": True},
                   conf={"dataset_query": override})
    with pytest.raises((QueryError, SpecError)) as info:
        run_prepare(env)
    assert fragment in str(info.value)
    assert len(str(info.value)) < 700
    assert not (tmp_path / "ws" / "prepare").exists()


def test_query_override_refused_when_not_allowed(tmp_path: Path, hub: Path) -> None:
    env = step_env(tmp_path / "ws", hub,
                   conf={"dataset_query": "SELECT * FROM reach_demos WHERE step < 10"})
    with pytest.raises(SpecError, match="allow_query_override"):
        run_prepare(env)
    assert not (tmp_path / "ws" / "prepare").exists()


@pytest.mark.parametrize(("dataset", "error", "fragment"), [
    pytest.param({"features": ["state_*"]}, SpecError, "matches no column of the query result; "
                 "columns: episode, step, obs_0", id="glob-matches-nothing"),
    pytest.param({"targets": ["obs_0"]}, SpecError, "both in dataset.features and", id="overlap"),
    pytest.param({"query": "SELECT * FROM reach_demos WHERE step > 1000"}, QueryError,
                 "returned 0 rows", id="no-rows"),
    pytest.param({"query": "COPY reach_demos TO 'x.csv'"}, QueryError, "COPY statement",
                 id="bad-query"),
    pytest.param({"tables": {"reach_demos": 42}}, DataHubError, "has no version 42",
                 id="missing-version"),
    pytest.param({"hub": "lake"}, SpecError, "dataset.hub is 'lake'", id="other-hub"),
])
def test_prepare_errors_leave_no_output(tmp_path: Path, hub: Path, dataset: dict[str, Any],
                                        error: type[Exception], fragment: str) -> None:
    workspace = tmp_path / "ws"
    with pytest.raises(error, match=fragment):
        run_prepare(step_env(workspace, hub, dataset=dataset))
    assert list(workspace.iterdir()) == []


def test_digits_template(tmp_path: Path, hub: Path) -> None:
    result = run_prepare(step_env(tmp_path / "ws", hub, "digits_smoke"))
    manifest = _manifest(tmp_path / "ws")
    assert result["rows"] == 1797 and result["val_rows"] == int(1797 * 0.2)
    assert manifest["features"] == [f"pixel_{i}" for i in range(64)]
    assert manifest["targets"] == ["label"]
