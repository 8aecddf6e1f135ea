"""Federated template -> DAG: prepare mapped over sites -> federate -> register; site isolation.

The isolation tests run the real prepare step (DuckDB sandbox, Delta tables) with the StepSpec
the Airflow side builds for each site: a site sees its own hub only and writes only into its
own folder of the run workspace.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arf_training.factory import build_training_dag
from arf_training.federation import federate_spec, site_spec
from arf_training.settings import ArfSettings
from arf_training.stepspec import RunIdentity, build_step_spec
from arf_training.templates import load_template

REPO = Path(__file__).resolve().parents[2]
SITES = ["north", "south", "west"]


@pytest.fixture(scope="module")
def loaded():
    return load_template(REPO / "config_templates" / "reach_bc_federated.yaml")


def _settings(home: Path) -> ArfSettings:
    return ArfSettings(home=home, tracking_uri=f"sqlite:///{home}/mlflow.db",
                       datahub_uri=str(home / "datahub"), artifact_root=str(home / "art"))


def _spec(loaded, step: str, home: Path, run_id: str = "manual__1"):
    run = RunIdentity(dag_id=loaded.name, run_id=run_id, task_id=step)
    return build_step_spec(loaded, step, run, {}, _settings(home))


def test_dag_maps_prepare_over_sites_then_federates_then_registers(loaded):
    dag = build_training_dag(loaded, "local")
    assert set(dag.task_ids) == {"prepare_data", "federate", "register_model"}
    prepare = dag.get_task("prepare_data")
    assert prepare.expand_input.value == {"site": SITES}  # one mapped instance per site
    assert dag.get_task("federate").upstream_task_ids == {"prepare_data"}
    assert dag.get_task("register_model").upstream_task_ids == {"federate"}
    assert [o.uri.rstrip("/") for o in dag.get_task("register_model").outlets] == [
        "arf-model://reach_bc_federated_policy"]


def test_each_site_spec_names_only_its_own_hub_and_folder(loaded, tmp_path):
    base = _spec(loaded, "prepare", tmp_path)
    for name in SITES:
        spec = site_spec(base, loaded.template, name, _settings(tmp_path))
        assert spec.env["ARF_DATAHUB_URI"] == str(tmp_path / "sites" / name / "datahub")
        assert spec.workspace == base.workspace / "sites" / name
        assert spec.result_path == spec.workspace / "prepare" / "result.json"
        others = [s for s in SITES if s != name]
        text = json.dumps([spec.env, spec.job_spec])
        assert not any(f"sites/{o}" in text for o in others), text
        assert tmp_path / "datahub" != Path(spec.env["ARF_DATAHUB_URI"])


def test_federate_spec_lists_site_folders_and_reads_no_hub(loaded, tmp_path, monkeypatch):
    venv = tmp_path / "fedvenv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "arf-trainer").write_text("#!/bin/sh\n")
    monkeypatch.setenv("ARF_FEDERATION_VENV", str(venv))
    spec = federate_spec(_spec(loaded, "federate", tmp_path), loaded.template, local=True)
    assert spec.command == [str(venv / "bin" / "arf-trainer"), "federate"]
    assert [s["data_dir"] for s in spec.job_spec["inputs"]["sites"]] == [
        str(spec.workspace / "sites" / n / "prepare") for n in SITES]
    assert "sites/" not in spec.env["ARF_DATAHUB_URI"]


def test_federate_without_the_flower_venv_says_how_to_make_it(loaded, tmp_path, monkeypatch):
    from arf_training.errors import ArfError

    monkeypatch.setenv("ARF_FEDERATION_VENV", str(tmp_path / "missing"))
    with pytest.raises(ArfError, match="make federation-venv"):
        federate_spec(_spec(loaded, "federate", tmp_path), loaded.template, local=True)


@pytest.fixture(scope="module")
def site_home(tmp_path_factory):
    from arf_trainer.datahub.seed_sites import seed_sites

    home = tmp_path_factory.mktemp("home")
    summary = seed_sites({n: home / "sites" / n / "datahub" for n in SITES}, episodes=9)
    return home, summary


def _prepare(spec, query: str | None = None):
    from arf_trainer.datahub.prepare import run_prepare
    from arf_trainer.spec import StepEnv

    job = dict(spec.job_spec)
    if query is not None:
        job["template"] = {**job["template"], "dataset": {**job["template"]["dataset"],
                                                          "query": query}}
    return run_prepare(StepEnv.from_environ({**spec.env, "ARF_JOB_SPEC_JSON": json.dumps(job)}))


def test_site_prepare_reads_its_hub_and_writes_its_folder_only(loaded, site_home):
    home, summary = site_home
    assert sum(s["episodes"] for s in summary.values()) == 9  # every episode at one site
    base = _spec(loaded, "prepare", home)
    north = site_spec(base, loaded.template, "north", _settings(home))
    result = _prepare(north)
    from arf_trainer.datahub.tables import open_table

    table = open_table(home / "sites" / "north" / "datahub", "reach_demos").dataset.to_table()
    assert result["rows"] == sum(table["success"].to_pylist())
    written = {p.relative_to(base.workspace).parts[:2] for p in base.workspace.rglob("*.parquet")}
    assert written == {("sites", "north")}


@pytest.mark.parametrize("reader", ["delta_scan('{hub}/reach_demos')",
                                    "read_parquet('{hub}/reach_demos/*.parquet')"])
def test_site_prepare_cannot_open_another_sites_hub(loaded, site_home, reader):
    from arf_trainer.errors import QueryError

    home, _ = site_home
    base = _spec(loaded, "prepare", home, run_id=f"isolation_{reader[:4]}")
    north = site_spec(base, loaded.template, "north", _settings(home))
    south_hub = home / "sites" / "south" / "datahub"
    with pytest.raises(QueryError):
        _prepare(north, "SELECT * FROM " + reader.format(hub=south_hub))


def test_site_prepare_cannot_open_another_sites_shards(loaded, site_home):
    """South's prepared shards lie in the same run workspace (locally): north's query still
    cannot read them, by any file reader (the sandbox reads hub tables only)."""
    from arf_trainer.errors import QueryError

    home, _ = site_home
    base = _spec(loaded, "prepare", home, run_id="isolation_shards")
    _prepare(site_spec(base, loaded.template, "south", _settings(home)))
    shards = sorted((base.workspace / "sites" / "south").rglob("*.parquet"))
    assert shards
    north = site_spec(base, loaded.template, "north", _settings(home))
    for reader in (f"read_parquet('{shards[0]}')", f"read_parquet('{shards[0].parent}/*')",
                   f"read_csv('{shards[0]}')"):
        with pytest.raises(QueryError):
            _prepare(north, f"SELECT * FROM {reader}")
    assert not (base.workspace / "sites" / "north" / "prepare" / "manifest.json").exists()


def test_kubernetes_backend_builds_federated_templates(monkeypatch):
    from arf_training.factory import build_dags, template_issues

    monkeypatch.setenv("ARF_BACKEND", "kubernetes")
    monkeypatch.setenv("ARF_K8S_NAMESPACE", "arf")
    monkeypatch.setenv("ARF_OPTUNA_STORAGE", "postgresql+psycopg://optuna@postgres.arf.svc/optuna")
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                       json.dumps({"conn_type": "kubernetes", "extra": {"in_cluster": False}}))
    issues = [i for i in template_issues(REPO / "config_templates")
              if "reach_bc_federated" in i.file]
    assert issues == []
    dag = build_dags(REPO / "config_templates")["reach_bc_federated"]
    assert dag.get_task("prepare_data").expand_input.value == {"site": SITES}
    assert dag.get_task("federate").upstream_task_ids == {"prepare_data"}
