"""The tracking spool's delivery rules, against a small fake MLflow that appends like MLflow.

The fake's `log_batch` appends every metric point it is given (no de-duplication), so a point
sent twice shows up twice: exactly-once must come from the spool, not from the store.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from arf_trainer.tracking_spool import (
    ACKED_FILE,
    SPOOL_FILE,
    Spool,
    TrackingSpool,
    deliver,
    replay,
)

RUN_TAGS = {"arf.template": "digits_smoke"}


class Crash(BaseException):
    """The process dies here (nothing after it runs, nothing catches it)."""


class FakeMlflow:
    """Just the MlflowClient calls the spool makes, kept in memory."""

    def __init__(self) -> None:
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.down = False
        self.hang_s = 0.0
        self.after_apply: BaseException | None = None
        """Raised once after a log_batch with metrics was applied: its answer is lost."""

    def _call(self) -> None:
        if self.hang_s:
            time.sleep(self.hang_s)
        if self.down:
            raise MlflowException("API request failed: Connection refused")

    def get_experiment_by_name(self, name: str) -> Any:
        self._call()
        if name not in self.experiments:
            return None
        return SimpleNamespace(experiment_id=self.experiments[name], lifecycle_stage="active")

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str:
        self._call()
        self.experiments[name] = str(len(self.experiments) + 1)
        return self.experiments[name]

    def search_runs(self, experiment_ids: list[str], filter_string: str, **_: Any) -> list:
        self._call()
        key, value = re.fullmatch(r"tags\.`(.+)` = '(.+)'", filter_string).groups()
        return [SimpleNamespace(info=SimpleNamespace(run_id=run_id))
                for run_id, run in self.runs.items()
                if run["experiment_id"] in experiment_ids and run["tags"].get(key) == value]

    def create_run(self, experiment_id: str, start_time: int | None = None,
                   tags: dict[str, str] | None = None, run_name: str | None = None) -> Any:
        self._call()
        run_id = f"run{len(self.runs) + 1}"
        self.runs[run_id] = {"experiment_id": experiment_id, "start_time": start_time,
                             "tags": dict(tags or {}), "params": {}, "metrics": [],
                             "status": "RUNNING", "artifacts": {}, "inputs": []}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._call()
        run = self.runs[run_id]
        run["metrics"] += [(m.key, m.step, m.timestamp, m.value) for m in metrics]
        run["params"].update({p.key: p.value for p in params})
        run["tags"].update({t.key: t.value for t in tags})
        if self.after_apply is not None and metrics:
            exc, self.after_apply = self.after_apply, None
            raise exc

    def get_metric_history(self, run_id: str, key: str) -> list:
        self._call()
        return [SimpleNamespace(key=k, step=s, timestamp=t, value=v)
                for k, s, t, v in self.runs[run_id]["metrics"] if k == key]

    def log_dict(self, run_id: str, dictionary: dict, artifact_file: str) -> None:
        self._call()
        self.runs[run_id]["artifacts"][artifact_file] = dictionary

    def log_inputs(self, run_id: str, datasets: list) -> None:
        self._call()
        self.runs[run_id]["inputs"] = [d.dataset.name for d in datasets]

    def update_run(self, run_id: str, status: str) -> None:
        self._call()
        self.runs[run_id]["status"] = status

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> None:
        self._call()
        self.runs[run_id]["status"] = status


def record_training(spool: Spool, epochs: range) -> None:
    """What start_mlflow_run and the epoch loop write, without the sender."""
    tracker = TrackingSpool(spool, "fake://")
    if epochs.start == 0:
        tracker.start_run("digits_smoke", "/art", "arf_digits_smoke", "manual__1", RUN_TAGS)
        tracker.set_tags(RUN_TAGS)
        tracker.log_params({"lr": 0.01, "seed": 0})
        tracker.log_dict({"seed": 0}, "arf/resolved_config.json")
        tracker.log_input({"name": "digits_smoke-train", "digest": "abc", "source": "{}",
                           "source_type": "local"}, context="training")
    for epoch in epochs:
        tracker.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_loss": float("nan")},
                            step=23 * (epoch + 1))


def spooled_points(folder: Path) -> list[tuple]:
    records = [json.loads(line) for line in (folder / SPOOL_FILE).read_text().splitlines()]
    return [(r["key"], r["step"], r["ts"], r["value"]) for r in records if r["kind"] == "metric"]


def same_points(a: list[tuple], b: list[tuple]) -> bool:
    """Equal as multisets, with NaN equal to NaN."""
    def norm(points: list[tuple]) -> list[tuple]:
        return sorted((k, s, t, "nan" if v != v else v) for k, s, t, v in points)
    return norm(a) == norm(b)


@pytest.mark.parametrize("failure", [
    pytest.param(MlflowException("Read timed out"), id="timeout-after-server-applied"),
    pytest.param(Crash(), id="crash-between-send-and-ack"),
])
def test_replay_after_ambiguous_send_logs_each_point_once(tmp_path: Path,
                                                          failure: BaseException) -> None:
    fake = FakeMlflow()
    spool = Spool.open(tmp_path)
    record_training(spool, range(0, 3))
    fake.after_apply = failure  # the first batch of metric points lands in MLflow...
    with pytest.raises(type(failure)):
        deliver(spool, fake)  # ...but its answer, or the process, is lost before the ack
    state = json.loads((tmp_path / ACKED_FILE).read_text())
    assert state["acked"] < state["attempted"]  # the batch is ambiguous
    if isinstance(failure, Crash):
        spool.close()  # a new process picks the spool up from disk
        spool = Spool.open(tmp_path)
        record_training(spool, range(3, 5))  # the retried step goes on appending
    assert deliver(spool, fake)
    spool.close()

    (run,) = fake.runs.values()
    assert same_points(run["metrics"], spooled_points(tmp_path))
    assert len(run["metrics"]) == len(set((k, s) for k, s, _, _ in run["metrics"]))
    assert run["params"] == {"lr": "0.01", "seed": "0"} and run["tags"]["arf.template"]
    assert run["artifacts"] == {"arf/resolved_config.json": {"seed": 0}}
    assert run["inputs"] == ["digits_smoke-train"]
    # Replaying a fully sent spool sends nothing more.
    before = list(run["metrics"])
    assert replay(tmp_path, fake, "fake://").run_id == "run1"
    assert run["metrics"] == before


def test_run_created_late_and_torn_line_dropped(tmp_path: Path) -> None:
    fake = FakeMlflow()
    fake.down = True
    spool = Spool.open(tmp_path)
    record_training(spool, range(0, 2))
    with pytest.raises(MlflowException):
        deliver(spool, fake)
    assert spool.state.run_id is None and not fake.runs
    start_ts = spool.sync()[0]["ts"]
    spool.close()
    with open(tmp_path / SPOOL_FILE, "ab") as fh:  # died in the middle of a line
        fh.write(b'{"seq":99,"kind":"metric","key":"tra')

    fake.down = False
    state = replay(tmp_path, fake, "fake://")
    assert state is not None and state.run_id == "run1" and state.experiment_id == "1"
    run = fake.runs["run1"]
    assert run["start_time"] == start_ts  # dated when training started, not when created
    assert run["tags"]["arf.dag_run"] == "arf_digits_smoke/manual__1"
    assert same_points(run["metrics"], spooled_points(tmp_path))
    assert (tmp_path / SPOOL_FILE).read_bytes().endswith(b"\n")


def test_sender_never_blocks_the_training_loop(tmp_path: Path) -> None:
    fake = FakeMlflow()
    fake.hang_s = 0.5  # every MLflow call hangs
    tracker = TrackingSpool.open(tmp_path, "fake://", client=fake)
    record_training(tracker.spool, range(0, 1))
    tracker.start(wait_s=0)
    t0 = time.perf_counter()
    for epoch in range(1, 200):
        tracker.log_metrics({"train_loss": 1.0 / epoch}, step=epoch)
    assert time.perf_counter() - t0 < 0.25
    tracker.end_run("FINISHED")
    fake.hang_s = 0.0
    state = tracker.close()
    assert state.run_id == "run1" and tracker.spool.pending_count == 0
    assert same_points(fake.runs["run1"]["metrics"], spooled_points(tmp_path))
    assert fake.runs["run1"]["status"] == "FINISHED"
