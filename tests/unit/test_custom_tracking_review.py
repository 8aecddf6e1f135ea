"""Review of the custom-command contract and tracking: the registered output is exactly what is
hashed (no host file through a symlink), bad inputs get clear errors, a register retry ends the
run, a damaged spool is refused instead of breaking exactly-once, and two processes creating the
run of one DAG run settle on one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from trainer_testkit import fresh_tracking_uri, make_spec

from arf_trainer import tracking
from arf_trainer.custom import folder_sha256, register_custom
from arf_trainer.errors import RegistryError, SpoolError
from arf_trainer.spec import StepEnv
from arf_trainer.spool_file import ACKED_FILE, SPOOL_FILE, Spool


def _env(tmp_path: Path, uri: str = "sqlite:////nonexistent/never-used.db") -> StepEnv:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(make_spec("digits_sklearn", "train")))
    ws = tmp_path / "ws"
    (ws / "prepare").mkdir(parents=True)
    (ws / "prepare" / "manifest.json").write_text(json.dumps(
        {"features": ["x"], "targets": ["y"], "tables": {}, "fingerprint": "f" * 64}))
    (ws / "train" / "output").mkdir(parents=True)
    (ws / "train" / "result.json").write_text('{"metrics": {"acc": 0.5}}')
    return StepEnv.from_environ({
        "ARF_JOB_SPEC": str(path), "ARF_WORKSPACE": str(ws), "ARF_TRACKING_URI": uri,
        "ARF_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "ARF_DATAHUB_URI": str(tmp_path),
        "ARF_RESULT_PATH": str(ws / "train" / "result.json")})


@pytest.mark.parametrize("link", ["outside_file", "directory", "dangling"])
def test_a_symlink_that_would_log_other_content_than_hashed_is_refused(tmp_path, link):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("m")
    secret = tmp_path / "host"
    if link == "outside_file":
        secret.write_text("host secret")
    elif link == "directory":
        secret.mkdir()
        (secret / "x").write_text("host secret")
    (out / "link").symlink_to(secret)
    with pytest.raises(RegistryError, match="symbolic link"):
        folder_sha256(out)


def test_a_symlink_inside_the_output_and_a_non_utf8_name_are_hashed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("m")
    (out / "alias.txt").symlink_to(out / "model.txt")
    with open(os.fsencode(out) + b"/\xff.bin", "wb") as fh:
        fh.write(b"x")
    assert len(folder_sha256(out)) == 64


def test_an_output_with_only_empty_folders_is_no_model(tmp_path):
    env = _env(tmp_path)
    (env.workspace / "train" / "output" / "checkpoints").mkdir()
    with pytest.raises(RegistryError, match="no files in"):
        register_custom(env)


@pytest.mark.parametrize("result", ['{"metrics": {"acc": "high"}}', "[1]",
                                    '{"metrics": [0.5]}', '{"metrics": {"acc": true}}'])
def test_a_malformed_result_gets_a_clear_error(tmp_path, result):
    env = _env(tmp_path)
    (env.workspace / "train" / "output" / "model.txt").write_text("m")
    (env.workspace / "train" / "result.json").write_text(result)
    with pytest.raises(RegistryError, match="must be a JSON object"):
        register_custom(env)


def test_a_register_retry_ends_the_run_a_crash_left_running(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = fresh_tracking_uri(tmp_path)
    monkeypatch.setenv("ARF_CHECKPOINT_DIR", str(tmp_path / "ws" / "train" / "checkpoints"))
    env = _env(tmp_path, uri)
    (env.workspace / "train" / "output" / "model.txt").write_text("m")
    first = register_custom(env)
    client = MlflowClient(uri, uri)
    client.update_run(first["training_run_id"], status="RUNNING")  # crashed before the end
    again = register_custom(env)
    assert again["model_version"] == first["model_version"]
    assert client.get_run(first["training_run_id"]).info.status == "FINISHED"


def _records(*seqs: int) -> str:
    return "".join(json.dumps({"seq": s, "kind": "tag", "key": "k", "value": "v"}) + "\n"
                   for s in seqs)


@pytest.mark.parametrize("seqs", [(1, 3, 2), (1, 2, 2), ("1",)])
def test_a_spool_with_seqs_out_of_order_is_refused(tmp_path, seqs):
    (tmp_path / SPOOL_FILE).write_text(_records(*seqs) if seqs != ("1",) else
                                       '{"seq": "1", "kind": "tag"}\n')
    with pytest.raises(SpoolError, match="not a spool record"):
        Spool.open(tmp_path, lock_timeout=1)


@pytest.mark.parametrize("state", [
    '{"acked": 5, "attempted": 1, "run_id": null, "experiment_id": null}',
    '{"acked": 2, "attempted": 2, "run_id": null, "experiment_id": null}',
    '{"acked": 0, "attempted": 0, "future": 1}', '{"acked": "0"}', "[]"])
def test_a_damaged_ack_state_is_refused(tmp_path, state):
    (tmp_path / SPOOL_FILE).write_text(_records(1, 2))
    (tmp_path / ACKED_FILE).write_text(state)
    with pytest.raises(SpoolError, match="spool state|no delivery leaves"):
        Spool.open(tmp_path, lock_timeout=1)


def test_find_or_create_run_settles_on_one_run_when_another_process_raced(tmp_path):
    uri = fresh_tracking_uri(tmp_path)
    client = tracking.configure(uri)
    experiment = tracking.get_or_create_experiment(client, "e", str(tmp_path / "art"))
    other = client.create_run(experiment, start_time=1,
                              tags={tracking.DAG_RUN_TAG: "dag/run"}).info.run_id
    search, calls = client.search_runs, []

    def racing_search(*args, **kwargs):  # the other process created it just after our look
        calls.append(1)
        return [] if len(calls) == 1 else search(*args, **kwargs)

    client.search_runs = racing_search
    run_id, existed = tracking.find_or_create_run(client, experiment, "dag", "run", {})
    client.search_runs = search
    assert (run_id, existed) == (other, True)
    assert [r.info.run_id for r in client.search_runs([experiment])] == [other]
