"""The federate step's site manifests: from the job spec (what each site's prepare reported,
Kubernetes) or from each site's manifest.json (local), with the same plan and lineage.

Real prepares of two sites' hubs (different queries: different rows, fingerprints and versions);
the federate step's planning (`manifests.plan`, `lineage`) runs without Flower, so in this venv.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
from test_prepare import load_template

from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.prepare_result import SITE_METADATA_KEY
from arf_trainer.datahub.seed import seed_demo
from arf_trainer.datahub.tables import open_table
from arf_trainer.errors import TrainingError
from arf_trainer.federated.launch import site_dirs
from arf_trainer.federated.manifests import lineage, plan, site_manifest
from arf_trainer.spec import StepEnv

TEMPLATE = "reach_bc_federated"
# Different queries, so that the two sites differ in everything the lineage records.
QUERIES = {"north": "SELECT * FROM reach_demos WHERE success AND episode % 2 = 0",
           "south": "SELECT * FROM reach_demos WHERE success AND episode % 2 = 1"}


def _env(workspace: Path, step: str, template: dict[str, Any], inputs: dict[str, Any],
         hub: Path) -> StepEnv:
    hp = {k: v["default"] for k, v in template["training"]["hyperparameters"].items()}
    spec = {"spec_version": 1, "step": step, "template": template, "template_sha256": "0" * 64,
            "conf": {}, "hyperparameters": {**hp, "hidden_size": 32}, "seed": 3,
            "run": {"dag_id": TEMPLATE, "run_id": "manual__1", "task_id": step,
                    "try_number": 1},
            "inputs": inputs}
    return StepEnv.from_environ({
        "ARF_JOB_SPEC_JSON": json.dumps(spec), "ARF_WORKSPACE": str(workspace),
        "ARF_TRACKING_URI": f"sqlite:///{workspace}/unused.db",
        "ARF_DATAHUB_URI": hub.as_uri()})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run workspace whose two sites were prepared as a federated DAG prepares them: each in
    `<run>/sites/<site>/` from its own hub, its job spec naming itself in `inputs.site`."""
    root = tmp_path_factory.mktemp("federated")
    workspace = root / "run"
    results = {}
    for index, (site, query) in enumerate(QUERIES.items()):
        hub = root / f"hub-{site}"
        seed_demo(hub, episodes=6, seed=index, force=False)
        for _ in range(index):  # south's table at a later version than north's
            seed_demo(hub, episodes=2, seed=9, force=True)
        template = load_template(TEMPLATE)
        template["dataset"]["query"] = query
        template["federated"]["sites"] = [s for s in template["federated"]["sites"]
                                          if s["name"] == site]
        env = _env(workspace / "sites" / site, "prepare", template, {"site": site}, hub)
        results[site] = run_prepare(env)
    return {"workspace": workspace, "results": results, "hub": root / "hub-north"}


def _federate(run: dict[str, Any], workspace: Path, sites: list[dict[str, Any]]) -> StepEnv:
    template = load_template(TEMPLATE)
    template["federated"]["sites"] = [s for s in template["federated"]["sites"]
                                      if s["name"] in QUERIES]
    return _env(workspace, "federate", template, {"sites": sites}, run["hub"])


def _from_files(run: dict[str, Any]) -> StepEnv:
    """The local backend's federate job spec: each site's folder (federation.federate_spec)."""
    return _federate(run, run["workspace"], [
        {"name": s, "data_dir": str(run["workspace"] / "sites" / s / "prepare")}
        for s in QUERIES])


def _from_metadata(run: dict[str, Any], workspace: Path,
                   metadata: dict[str, Any] | None = None) -> StepEnv:
    """The Kubernetes federate job spec: each site's reported metadata, no folder; run in an
    empty workspace, so that reading any site's file would fail."""
    metadata = metadata or {s: r[SITE_METADATA_KEY] for s, r in run["results"].items()}
    return _federate(run, workspace, [{"name": s, "manifest": m} for s, m in metadata.items()])


def test_a_site_prepare_reports_its_manifest_metadata_only(run):
    for site, result in run["results"].items():
        manifest = json.loads(Path(result["manifest"]).read_text())
        meta = result[SITE_METADATA_KEY]
        assert meta["features"] == manifest["features"] == [f"obs_{i}" for i in range(10)]
        assert meta["targets"] == manifest["targets"]
        for key in ("rows", "train_rows", "val_rows", "fingerprint"):
            assert meta[key] == manifest[key] == result[key]
        assert meta["tables"] == {n: {"version": t["version"]}
                                  for n, t in manifest["tables"].items()}
        assert [c["name"] for c in meta["columns"]] == [
            c["name"] for c in manifest["columns"]
            if c["name"] in manifest["features"] + manifest["targets"]]
        assert all(c["dtype"] == "float32" and c["shape"] == [] for c in meta["columns"])
        # No rows, shards, query or site paths (the hub URI, the folder) in what crosses.
        text = json.dumps(meta)
        for leak in ("shards", "query", "parquet", "file://", str(run["workspace"])):
            assert leak not in text, (site, leak)
        assert len(text) < 2048
    north, south = (run["results"][s][SITE_METADATA_KEY] for s in QUERIES)
    assert north["fingerprint"] != south["fingerprint"]
    assert north["tables"]["reach_demos"]["version"] < south["tables"]["reach_demos"]["version"]


def test_plan_and_lineage_from_metadata_equal_those_from_the_files(run, tmp_path):
    files = _from_files(run)
    given = _from_metadata(run, tmp_path / "superlink")
    assert not (tmp_path / "superlink").exists()
    file_sites, meta_sites = site_dirs(files), site_dirs(given)
    assert [s["manifest"] for s in file_sites] == [None, None]  # the local path, as before
    assert all(s["manifest"] is not None for s in meta_sites)

    assert plan(given, meta_sites)[0] == plan(files, file_sites)[0]
    assert lineage(meta_sites) == lineage(file_sites)
    record = lineage(meta_sites)
    for site, result in run["results"].items():
        assert record[site]["fingerprint"] == result["fingerprint"]
        assert record[site]["train_rows"] == result["train_rows"]
    manifest = site_manifest(meta_sites[0])
    assert manifest.rows("train") == run["results"]["north"]["train_rows"]
    with pytest.raises(TrainingError, match="lists no shards"):
        manifest.shards("train")  # nothing here may read a site's rows


def _metadata(run: dict[str, Any], site: str, **changes: Any) -> dict[str, Any]:
    metadata = {s: dict(r[SITE_METADATA_KEY]) for s, r in run["results"].items()}
    metadata[site].update(changes)
    for key, value in changes.items():
        if value is None:
            del metadata[site][key]
    return metadata


@pytest.mark.parametrize("changes, error", [
    ({"fingerprint": None}, r"inputs.sites\[south\].manifest lacks the field 'fingerprint'"),
    ({"train_rows": "12"}, r"sites\[south\].manifest lacks the field 'train_rows'"),
    ({"train_rows": 0}, r"sites\[south\].*training split has no rows"),
    ({"targets": []}, r"sites\[south\].*both must be non-empty"),
    ({"targets": ["act_1", "act_0"]}, "site 'south' prepared features .* same columns"),
])
def test_metadata_is_checked_as_the_files_are(run, tmp_path, changes, error):
    env = _from_metadata(run, tmp_path, _metadata(run, "south", **changes))
    with pytest.raises(TrainingError, match=error):
        plan(env, site_dirs(env))


def test_metadata_that_is_not_an_object_names_its_site(run, tmp_path):
    metadata = {"north": run["results"]["north"][SITE_METADATA_KEY], "south": ["rows"]}
    env = _from_metadata(run, tmp_path, metadata)
    with pytest.raises(TrainingError, match=r"sites\[south\].manifest is list.*prepare_data"):
        lineage(site_dirs(env))


def test_a_prepare_that_is_not_a_sites_reports_no_metadata(run, tmp_path):
    template = load_template("reach_bc")
    env = _env(tmp_path / "ws", "prepare", template, {}, run["hub"])
    result = run_prepare(env)
    # A plain run's result is as before: its train step reads the manifest from the workspace.
    assert set(result) == {"rows", "train_rows", "val_rows", "tables", "fingerprint",
                           "manifest", "reused"}
    successful = open_table(run["hub"], "reach_demos").dataset.count_rows(
        filter=pc.field("success"))
    assert result["rows"] == successful > 0  # reach_bc's query: WHERE success
