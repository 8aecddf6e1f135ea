"""A run id names one DagRun at a time: a run deleted and triggered again under its id starts
afresh (workspace, MLflow run, Optuna study), while retries and clears of one DagRun continue.

Real folders, a real MLflow store (sqlite) and the session's Optuna storage; the DagRuns are
told apart by `run_after`, as Airflow's task context gives it.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_hpo import DAG_ID, hpo_template
from trainer_testkit import fresh_tracking_uri

from arf_trainer import tracking
from arf_trainer.dag_run_dir import ASIDE, LOCK, MARKER, claim, owner
from arf_trainer.errors import WorkspaceError

FIRST, SECOND = "2026-12-01T10:00:00+00:00", "2026-12-05T09:30:00.123456+00:00"


def test_the_first_step_marks_the_folder_and_the_dag_runs_own_steps_keep_it(tmp_path: Path):
    folder = tmp_path / "digits_smoke" / "ci-1"
    assert claim(folder, FIRST, dag_id="digits_smoke", run_id="ci-1") is None
    assert owner(folder) == FIRST
    (folder / "prepare").mkdir()
    # A retry, a clear, a trial or another rank of the same DagRun: nothing moves.
    assert claim(folder, FIRST) is None
    assert (folder / "prepare").is_dir()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ci-1", f"ci-1{LOCK}"]


def test_a_folder_made_before_markers_is_adopted(tmp_path: Path):
    folder = tmp_path / "ci-1"
    (folder / "train" / "checkpoints").mkdir(parents=True)
    assert claim(folder, FIRST) is None
    assert owner(folder) == FIRST and (folder / "train" / "checkpoints").is_dir()


def test_another_dag_run_of_the_run_id_moves_the_folder_aside_whole(tmp_path: Path):
    folder = tmp_path / "ci-1"
    claim(folder, FIRST)
    (folder / "prepare").mkdir()
    (folder / "prepare" / "manifest.json").write_text("{}")
    aside = claim(folder, SECOND, run_id="ci-1")
    assert aside == tmp_path / f"ci-1{ASIDE}20261201T1000000000"
    assert json.loads((aside / MARKER).read_text())["run_after"] == FIRST
    assert (aside / "prepare" / "manifest.json").exists()
    assert sorted(p.name for p in folder.iterdir()) == [MARKER]
    assert owner(folder) == SECOND
    # A third DagRun: the second's files go aside too, next to the first's.
    (folder / "prepare").mkdir()
    third = claim(folder, "2026-12-06T00:00:00+00:00")
    assert third is not None and third != aside and (third / "prepare").is_dir()
    assert owner(aside) == FIRST and owner(third) == SECOND


def test_a_folder_that_cannot_be_written_is_named_with_the_fix(tmp_path: Path):
    (tmp_path / "not-a-folder").write_text("")
    folder = tmp_path / "not-a-folder" / "digits_smoke" / "ci-1"
    with pytest.raises(WorkspaceError, match=rf"cannot claim the run's workspace folder "
                       rf"{folder} for this DagRun: .*Not a directory.*must be a writable"):
        claim(folder, FIRST)


def test_a_job_spec_without_run_after_claims_nothing(tmp_path: Path):
    assert claim(tmp_path / "ci-1", None) is None
    assert not (tmp_path / "ci-1").exists()


def _claim_in_process(folder: str, run_after: str, start, out) -> None:
    start.wait()
    out.put(str(claim(Path(folder), run_after)))


def test_steps_of_one_new_dag_run_starting_together_agree(tmp_path: Path):
    """The parallel first tasks (mapped trials, a job's pods) of a re-triggered run, three
    DagRuns in turn: each time one step moves the old folder aside, and none moves the folder
    of its own DagRun (which another step may have just made)."""
    folder = tmp_path / "ci-1"
    claim(folder, FIRST)
    ctx = multiprocessing.get_context("spawn")
    for n, run_after in enumerate((SECOND, "2026-12-06T00:00:00+00:00",
                                   "2026-12-07T00:00:00+00:00")):
        (folder / f"written-by-{n}").mkdir()
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_claim_in_process, args=(str(folder), run_after, start, out))
                 for _ in range(6)]
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        moved = [r for r in results if r != "None"]
        assert len(moved) == 1, results
        assert (Path(moved[0]) / f"written-by-{n}").is_dir()
        assert owner(folder) == run_after and not list(folder.glob("written-by-*"))
    assert len([p for p in tmp_path.iterdir() if ASIDE in p.name]) == 3


def _run_tags(run_after: str | None) -> dict[str, str]:
    run = SimpleNamespace(dag_id="digits_smoke", run_id="ci-1", run_after=run_after)
    return {**tracking.dag_run_tags(run), "arf.template": "digits_smoke"}


def test_the_mlflow_run_of_a_deleted_dag_run_is_kept_and_not_continued(tmp_path: Path):
    client = tracking.configure(fresh_tracking_uri(tmp_path))
    experiment = tracking.get_or_create_experiment(client, "digits_smoke",
                                                   str(tmp_path / "artifacts"))

    def run_of(run_after: str | None) -> tuple[str, bool]:
        return tracking.find_or_create_run(client, experiment, "digits_smoke", "ci-1",
                                           _run_tags(run_after))

    first, existed = run_of(FIRST)
    assert not existed
    assert run_of(FIRST) == (first, True)  # a retry of the same DagRun continues it
    second, existed = run_of(SECOND)
    assert not existed and second != first
    kept = client.get_run(first).data.tags
    assert kept[tracking.DAG_RUN_TAG] == f"digits_smoke/ci-1 (DagRun {FIRST})"
    assert run_of(SECOND) == (second, True)
    assert client.get_run(second).data.tags[tracking.RUN_AFTER_TAG] == SECOND


def test_an_mlflow_run_from_before_run_after_was_recorded_is_adopted(tmp_path: Path):
    client = tracking.configure(fresh_tracking_uri(tmp_path))
    experiment = tracking.get_or_create_experiment(client, "digits_smoke",
                                                   str(tmp_path / "artifacts"))
    old, _ = tracking.find_or_create_run(client, experiment, "digits_smoke", "ci-1",
                                         _run_tags(None))
    assert tracking.RUN_AFTER_TAG not in client.get_run(old).data.tags
    assert tracking.find_or_create_run(client, experiment, "digits_smoke", "ci-1",
                                       _run_tags(FIRST)) == (old, True)
    assert client.get_run(old).data.tags[tracking.RUN_AFTER_TAG] == FIRST


@pytest.fixture
def optuna_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from arf_training.settings import ArfSettings

    monkeypatch.setenv("ARF_OPTUNA_STORAGE", ArfSettings.from_env().database_uri("optuna"))
    return tmp_path


def test_the_study_of_a_deleted_dag_run_is_kept_aside_and_a_new_one_starts(optuna_home, request):
    from arf_training import hpo

    loaded = hpo_template()
    run_id = f"rerun-{request.node.name}-{dt.datetime.now().timestamp()}"

    def context(run_after: str) -> dict:
        return {"ti": SimpleNamespace(dag_id=DAG_ID), "dag_run": SimpleNamespace(
            run_id=run_id, run_after=dt.datetime.fromisoformat(run_after))}

    hpo.create_study(loaded, context(FIRST))
    first = hpo.open_study(loaded.template, DAG_ID, run_id)
    first.tell(first.ask(), 0.5)
    hpo.create_study(loaded, context(FIRST))  # a retry keeps its trials
    assert len(hpo.open_study(loaded.template, DAG_ID, run_id).trials) == 1

    hpo.create_study(loaded, context(SECOND))
    fresh = hpo.open_study(loaded.template, DAG_ID, run_id)
    assert fresh.trials == [] and fresh.user_attrs[hpo.RUN_AFTER_ATTR] == SECOND
    import optuna

    kept = optuna.load_study(study_name=f"{DAG_ID}/{run_id} (DagRun {FIRST})",
                             storage=os.environ["ARF_OPTUNA_STORAGE"])
    assert [t.value for t in kept.trials] == [0.5]


def test_the_step_container_claims_the_folder_before_it_prepares(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """On Kubernetes only the pods see the workspace volume: `arf-trainer <step>` claims the
    run's folder itself. The deleted DagRun's prepared rows are not taken for this one's."""
    from test_prepare import load_template

    from arf_trainer.cli import main as cli_main
    from arf_trainer.datahub.seed import seed_demo

    hub = tmp_path / "hub"
    seed_demo(hub, episodes=2, seed=0, force=False)
    folder = tmp_path / "workspace" / "arf_reach_bc" / "ci-1"
    claim(folder, FIRST)
    (folder / "prepare").mkdir()
    (folder / "prepare" / "manifest.json").write_text('{"left": "by the deleted run"}')
    spec = {"spec_version": 1, "step": "prepare", "template": load_template("reach_bc"),
            "template_sha256": "0" * 64, "conf": {}, "hyperparameters": {}, "seed": 0,
            "run": {"dag_id": "arf_reach_bc", "run_id": "ci-1", "task_id": "prepare_data",
                    "try_number": 1, "run_after": SECOND}}
    for name, value in {"ARF_JOB_SPEC_JSON": json.dumps(spec), "ARF_WORKSPACE": str(folder),
                        "ARF_DAG_RUN_DIR": str(folder), "ARF_DATAHUB_URI": hub.as_uri(),
                        "ARF_TRACKING_URI": f"sqlite:///{tmp_path}/unused.db",
                        "ARF_RESULT_PATH": str(folder / "prepare" / "result.json")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ARF_JOB_SPEC", raising=False)
    assert cli_main(["prepare"]) == 0
    [aside] = [p for p in folder.parent.iterdir() if ASIDE in p.name]
    assert json.loads((aside / "prepare" / "manifest.json").read_text()) == {
        "left": "by the deleted run"}
    assert owner(folder) == SECOND
    assert json.loads((folder / "prepare" / "manifest.json").read_text())["rows"]
