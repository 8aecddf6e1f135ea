"""`arf-trainer custom-setup` against a real MLflow store: one run per DAG run (found again on a
later start, completed by register), and the base model pinned once per run (a promotion of the
alias mid-run does not change it); `arf training reproduce` uses the recorded version."""

from __future__ import annotations

import json
from pathlib import Path

from trainer_testkit import fresh_tracking_uri, make_spec

from arf_trainer.custom_setup import ENV_FILE, JOB_SPEC_FILE, run_custom_setup
from arf_trainer.spec import StepEnv

REPO = Path(__file__).resolve().parents[2]


def _base_versions(client, tmp_path: Path, n: int) -> None:
    """`n` versions of model `base`, each with the `model` folder a custom command registers."""
    client.create_registered_model("base")
    exp = client.create_experiment("base-training",
                                   artifact_location=str(tmp_path / "artifacts"))
    for i in range(n):
        run = client.create_run(exp)
        folder = tmp_path / f"base-{i}"
        folder.mkdir()
        (folder / "weights.txt").write_text(f"version {i + 1}")
        client.log_artifacts(run.info.run_id, str(folder), "model")
        client.create_model_version("base", f"{run.info.artifact_uri}/model", run.info.run_id)


def _env(tmp_path: Path, uri: str, base: str | None) -> StepEnv:
    spec = make_spec("digits_sklearn", "train")
    if base:
        spec["template"]["model"]["base_model"] = base
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    ws = tmp_path / "ws"
    return StepEnv.from_environ({
        "ARF_JOB_SPEC": str(path), "ARF_WORKSPACE": str(ws), "ARF_TRACKING_URI": uri,
        "ARF_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "ARF_DATAHUB_URI": str(tmp_path),
        "ARF_RESULT_PATH": str(ws / "train" / "result.json")})


def test_setup_finds_its_run_again_and_pins_the_base_version(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = fresh_tracking_uri(tmp_path)
    client = MlflowClient(uri, uri)
    _base_versions(client, tmp_path, 2)
    client.set_registered_model_alias("base", "champion", "1")
    monkeypatch.setenv("ARF_CHECKPOINT_DIR", str(tmp_path / "ws" / "train" / "checkpoints"))
    env = _env(tmp_path, uri, "models:/base@champion")

    first = run_custom_setup(env)
    client.set_registered_model_alias("base", "champion", "2")  # promoted mid-run
    again = run_custom_setup(env)  # a resume after preemption, or an Airflow retry

    assert again["run_id"] == first["run_id"]
    assert again["base_model"]["version"] == first["base_model"]["version"] == "1"
    base_dir = Path(first["base_model"]["dir"])
    assert (base_dir / "weights.txt").read_text() == "version 1"
    text = (tmp_path / "ws" / "train" / ENV_FILE).read_text()
    assert f"MLFLOW_RUN_ID={first['run_id']}" in text and "ARF_BASE_MODEL_VERSION=1" in text
    run = client.get_run(first["run_id"])
    assert run.data.tags["arf.template"] == "digits_sklearn"
    assert run.data.params["seed"] == "0"  # logged once: a second setup does not fail on it
    # The job spec the command reads names the base model's URI and the pinned version, and
    # the environment points every backend's command at that file (a pod has the spec inline).
    spec = json.loads((tmp_path / "ws" / "train" / JOB_SPEC_FILE).read_text())
    assert spec["base_model"]["uri"] == "models:/base@champion"
    assert spec["base_model"]["version"] == "1" and spec["base_model"]["dir"] == str(base_dir)
    assert spec["hyperparameters"] == env.spec.hyperparameters
    assert f"export ARF_JOB_SPEC={tmp_path / 'ws' / 'train' / JOB_SPEC_FILE}" in text
    assert "unset ARF_JOB_SPEC_JSON" in text


def test_register_records_the_pinned_version_and_reproduce_reads_it_back(tmp_path, monkeypatch):
    """The chain behind "reproduce uses the recorded version": custom-setup pins v1, the alias
    moves to v2 mid-run, register's lineage holds v1, `arf-trainer lineage` returns it and
    reproduce's template asks for models:/base/1."""
    from mlflow import MlflowClient

    from arf_trainer.custom import register_custom
    from arf_trainer.lineage import read_lineage
    from arf_training.reproduce import pinned_template

    uri = fresh_tracking_uri(tmp_path)
    client = MlflowClient(uri, uri)
    _base_versions(client, tmp_path, 2)
    client.set_registered_model_alias("base", "champion", "1")
    monkeypatch.setenv("ARF_CHECKPOINT_DIR", str(tmp_path / "ws" / "train" / "checkpoints"))
    env = _env(tmp_path, uri, "models:/base@champion")
    setup = run_custom_setup(env)
    client.set_registered_model_alias("base", "champion", "2")
    ws = tmp_path / "ws"
    (ws / "prepare").mkdir(parents=True)
    (ws / "prepare" / "manifest.json").write_text(json.dumps(
        {"features": ["x"], "targets": ["y"], "tables": {"digits": {"version": 3}},
         "fingerprint": "f" * 64}))
    (ws / "train" / "output").mkdir(parents=True)
    (ws / "train" / "output" / "model.txt").write_text("fine-tuned")
    (ws / "train" / "result.json").write_text('{"metrics": {"acc": 0.5}}')

    registered = register_custom(env)

    assert registered["training_run_id"] == setup["run_id"]
    version = client.get_model_version(env.spec.model["name"], registered["model_version"])
    assert version.tags["arf.base_model"] == "models:/base@champion"
    assert version.tags["arf.base_model_version"] == "1"
    lineage = read_lineage(uri, setup["run_id"])
    assert lineage["base_model_version"] == "1" and lineage["data_tables"] == {"digits": 3}
    assert pinned_template(lineage).template.model.base_model == "models:/base/1"


def test_reproduce_pins_the_recorded_base_version_not_the_alias():
    from arf_training.reproduce import pinned_template
    from arf_training.templates import load_template

    loaded = load_template(REPO / "config_templates" / "reach_bc_failure_finetune.yaml")
    assert loaded.template.model.base_model.endswith("@champion")
    lineage = {"template": loaded.template.model_dump(mode="json", by_alias=True),
               "data_tables": {}, "run_id": "r1", "base_model_version": "7"}
    name = loaded.template.model.base_model[len("models:/"):].split("@")[0]
    assert pinned_template(lineage).template.model.base_model == f"models:/{name}/7"
