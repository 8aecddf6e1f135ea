"""A pruned trial under DDP: rank 0 asks Optuna, every rank stops after the same epoch.

Real torchrun (2 processes, gloo), real Optuna (SQLite) and MLflow (sqlite), through the local
backend's runner, as the mapped trial task runs it. If the prune decision reached rank 0 only,
rank 1 would wait in the next epoch's collectives and the step would hang until its timeout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer_testkit import fresh_tracking_uri, prepare_digits

from arf_training.templates import LoadedTemplate, parse_template

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DAG_ID = "hpo_ddp"
TEMPLATE = (REPO / "config_templates" / "digits_smoke.yaml").read_text() \
    .replace("name: digits_smoke", f"name: {DAG_ID}") \
    .replace("name: digits_classifier", "name: hpo_ddp_model") + """
hpo:
  search_space:
    lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
  metric: val_accuracy
  direction: maximize
  trials: 2
  parallel: 1
  sampler: random
  pruner: median
  budget: {epochs: 3}
"""


def test_a_pruned_ddp_trial_stops_on_every_rank(tmp_path, monkeypatch):
    from optuna.trial import TrialState

    from arf_training import hpo
    from arf_training.backends.local import LocalStepRunner
    from arf_training.settings import ArfSettings
    from arf_training.stepspec import RunIdentity, build_step_spec

    monkeypatch.setenv("ARF_OPTUNA_STORAGE", f"sqlite:///{tmp_path}/optuna.db")
    monkeypatch.setenv("ARF_WORKSPACE_ROOT", str(tmp_path / "workspace"))
    monkeypatch.setenv("ARF_TRACKING_URI", fresh_tracking_uri(tmp_path / "mlflow"))
    monkeypatch.setenv("ARF_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    loaded = LoadedTemplate(parse_template(TEMPLATE), Path("hpo_ddp.yaml"), "0" * 64)
    assert loaded.template.training.distributed.world_size == 2
    run_id = "manual__ddp"
    context = {"ti": SimpleNamespace(dag_id=DAG_ID), "dag_run": SimpleNamespace(run_id=run_id)}
    hpo.create_study(loaded, context)
    settings = ArfSettings.from_env()

    def spec_of(round_index: int, lr: float):
        # A good first trial and a hopeless second one (Optuna's enqueue_trial fixes the next
        # ask's params), so that the median pruner (1 completed trial) prunes the second.
        hpo.open_study(loaded.template, DAG_ID, run_id).enqueue_trial({"lr": lr})
        (trial,) = hpo.ask(loaded, round_index, context)
        assert trial["params"] == {"lr": lr}
        spec = build_step_spec(loaded, "train", RunIdentity(DAG_ID, run_id,
                                                            f"round_{round_index + 1}.trials"),
                               {}, settings, trial=trial)
        if not (spec.workspace / "prepare").exists():
            prepare_digits(spec.workspace)
        return spec

    # The first trial in this process (one rank): it only has to complete.
    from arf_trainer.spec import JobSpec, StepEnv
    from arf_trainer.trainer.run import run_train

    spec = spec_of(0, 0.05)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    good = run_train(StepEnv(workspace=spec.workspace, result_path=spec.result_path,
                             tracking_uri=settings.tracking_uri,
                             artifact_root=settings.artifact_root,
                             datahub=Path(settings.datahub_uri),
                             spec=JobSpec.from_dict(spec.job_spec)))
    assert good["hpo"]["state"] == "complete"
    hpo.tell(loaded, 0, context)
    # The second under torchrun, 2 ranks, as the local backend runs a mapped trial task.
    bad = LocalStepRunner(logging.getLogger("test")).run(spec_of(1, 1.0e-5))
    hpo.tell(loaded, 1, context)
    assert bad["world_size"] == 2
    assert bad["hpo"]["state"] == "pruned", bad["hpo"]
    assert bad["steps"] == 23  # stopped after epoch 1 of 3 (23 steps), every rank exited 0
    states = [t.state for t in hpo.open_study(loaded.template, DAG_ID, run_id).trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED]
