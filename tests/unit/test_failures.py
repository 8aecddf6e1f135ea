"""Failure episodes into the data hub and their expert corrections (real MuJoCo, real Delta)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from arf_trainer.datahub.failures import (
    CORRECTIONS_TABLE, FAILURES_TABLE, correct_failures, record_failures)
from arf_trainer.datahub.maintenance import SMALL_FILES
from arf_trainer.datahub.tables import open_table, write_table
from arf_trainer.errors import DataHubError
from arf_trainer.sim import reach

T0 = dt.datetime(2026, 11, 25, 3, 0, tzinfo=dt.UTC)
SEEDS = range(100_000, 100_006)


def zero_policy(obs: np.ndarray) -> np.ndarray:
    return np.zeros(reach.ACT_DIM, dtype=np.float32)


@pytest.fixture(scope="module")
def episodes() -> dict[str, list[tuple[int, reach.Rollout]]]:
    env = reach.make_env()
    try:
        return {"zero": [(s, reach.rollout(zero_policy, s, env=env)) for s in SEEDS],
                "expert": [(s, reach.rollout(reach.expert_policy, s, env=env)) for s in SEEDS]}
    finally:
        env.close()


def _rows(hub, table):
    return open_table(hub, table).dataset.to_table()


def test_only_failed_episodes_are_recorded_once(tmp_path, episodes):
    zero, expert = episodes["zero"], episodes["expert"]
    failed = [s for s, r in zero + expert if not r.success]
    assert failed and any(r.success for _, r in expert)  # the fixture has both kinds

    first = record_failures(tmp_path, model_name="m", model_version=3, eval_run_id="run-a",
                            episodes=zero + expert, recorded_at=T0)
    assert first["episodes"] == len(failed)
    assert first["rows"] == len(failed) * reach.EPISODE_STEPS
    rows = _rows(tmp_path, FAILURES_TABLE)
    assert sorted(set(rows["seed"].to_pylist())) == sorted(set(failed))
    assert not any(rows["success"].to_pylist())
    # The recorded actions are what the model did (zeros), at the states it visited.
    zero_rows = rows.filter(rows["seed"].to_numpy() == zero[0][0])
    assert np.array_equal(zero_rows["obs_0"].to_numpy(), zero[0][1].observations[:, 0])
    assert not zero_rows["act_0"].to_numpy().any()

    retry = record_failures(tmp_path, model_name="m", model_version=3, eval_run_id="run-b",
                            episodes=zero, recorded_at=T0 + dt.timedelta(hours=1))
    assert retry == {"episodes": 0, "rows": 0, "version": None, "compacted_version": None}
    other = record_failures(tmp_path, model_name="m", model_version=4, eval_run_id="run-c",
                            episodes=zero[:2], recorded_at=T0)
    assert other["episodes"] == 2  # another version's failures are its own


def test_corrections_relabel_with_the_expert_once(tmp_path, episodes):
    zero = episodes["zero"]
    record_failures(tmp_path, model_name="m", model_version=1, eval_run_id="r",
                    episodes=zero, recorded_at=T0)
    night = T0 + dt.timedelta(days=1)
    first = correct_failures(tmp_path, collected_at=night, limit=2)
    assert first["episodes"] == 2 and first["rows"] == 2 * reach.EPISODE_STEPS
    rest = correct_failures(tmp_path, collected_at=night + dt.timedelta(days=1))
    assert rest["episodes"] == len(zero) - 2
    assert correct_failures(tmp_path, collected_at=night)["episodes"] == 0  # each once

    rows = _rows(tmp_path, CORRECTIONS_TABLE)
    obs = np.stack([rows[f"obs_{j}"].to_numpy() for j in range(reach.OBS_DIM)], axis=1)
    act = np.stack([rows[f"act_{j}"].to_numpy() for j in range(reach.ACT_DIM)], axis=1)
    assert np.array_equal(act, reach.expert_action(obs))  # DAgger: the expert's label
    assert act.any()
    episodes_ids = rows["episode"].to_numpy()
    assert (episodes_ids < 0).all() and len(set(episodes_ids)) == len(zero)
    assert sorted(set(rows["seed"].to_pylist())) == [s for s, _ in zero]
    times = set(rows["collected_at"].to_pylist())
    assert times == {night, night + dt.timedelta(days=1)}
    assert set(rows["source_model_version"].to_pylist()) == {1}


def _files(hub, table, version=None):
    from deltalake import DeltaTable

    return len(DeltaTable(str(hub / table), version=version).file_uris())


def _copies(hub, table, rows, column, count):
    """`count` more appends of `rows` (one file each), `column` made distinct per copy."""
    for i in range(1, count + 1):
        values = pa.array(np.asarray(rows[column].to_numpy()) + 1000 * i, rows[column].type)
        write_table(hub, table, rows.set_column(rows.schema.get_field_index(column), column,
                                                values))


def test_failure_loop_appends_compact_at_fifty_small_files(tmp_path, episodes):
    """One small file per evaluation or night: the appends compact the table themselves
    once its latest version reads SMALL_FILES (50) small files; the rows stay the same."""
    zero = episodes["zero"]
    first = record_failures(tmp_path, model_name="m", model_version=0, eval_run_id="r",
                            episodes=zero[:1], recorded_at=T0)
    _copies(tmp_path, FAILURES_TABLE, _rows(tmp_path, FAILURES_TABLE), "model_version",
            SMALL_FILES - 3)
    below = record_failures(tmp_path, model_name="m", model_version=1, eval_run_id="r",
                            episodes=zero[:1], recorded_at=T0)
    assert first["compacted_version"] is below["compacted_version"] is None
    assert _files(tmp_path, FAILURES_TABLE) == SMALL_FILES - 1
    at = record_failures(tmp_path, model_name="m", model_version=2, eval_run_id="r",
                         episodes=zero[:1], recorded_at=T0)
    assert at["compacted_version"] == at["version"] + 1
    assert _files(tmp_path, FAILURES_TABLE, at["version"]) == SMALL_FILES
    assert _files(tmp_path, FAILURES_TABLE) == 1
    key = [("model_version", "ascending"), ("seed", "ascending"), ("step", "ascending")]
    appended = open_table(tmp_path, FAILURES_TABLE, at["version"]).dataset.to_table()
    assert _rows(tmp_path, FAILURES_TABLE).sort_by(key).equals(appended.sort_by(key))
    from deltalake import DeltaTable

    assert DeltaTable(str(tmp_path / FAILURES_TABLE)).history(1)[0]["arf.operation"] \
        == "auto-compact"

    night = T0 + dt.timedelta(days=1)
    correct_failures(tmp_path, collected_at=night, limit=1)
    _copies(tmp_path, CORRECTIONS_TABLE, _rows(tmp_path, CORRECTIONS_TABLE), "episode",
            SMALL_FILES - 2)
    corrected = correct_failures(tmp_path, collected_at=night, limit=1)
    assert corrected["episodes"] == 1
    assert corrected["compacted_version"] == corrected["version"] + 1
    assert _files(tmp_path, CORRECTIONS_TABLE) == 1


def test_model_filter_and_bad_input(tmp_path, episodes):
    record_failures(tmp_path, model_name="a", model_version=1, eval_run_id="r",
                    episodes=episodes["zero"][:1], recorded_at=T0)
    record_failures(tmp_path, model_name="b", model_version=1, eval_run_id="r",
                    episodes=episodes["zero"][:1], recorded_at=T0)
    assert correct_failures(tmp_path, collected_at=T0, model_name="a")["episodes"] == 1
    assert set(_rows(tmp_path, CORRECTIONS_TABLE)["source_model_name"].to_pylist()) == {"a"}
    with pytest.raises(DataHubError, match="time zone"):
        correct_failures(tmp_path, collected_at=dt.datetime(2026, 1, 1))
    with pytest.raises(DataHubError, match="limit"):
        correct_failures(tmp_path, collected_at=T0, limit=0)
    assert correct_failures(tmp_path / "empty", collected_at=T0)["episodes"] == 0


def test_cli_correct(tmp_path, episodes, capsys):
    import json

    from arf_trainer.cli import main

    record_failures(tmp_path, model_name="m", model_version=1, eval_run_id="r",
                    episodes=episodes["zero"][:2], recorded_at=T0)
    assert main(["datahub", "correct", "--hub", str(tmp_path), "--limit", "1",
                 "--collected-at", "2026-11-26T01:00:00+00:00"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 1 and summary["rows"] == reach.EPISODE_STEPS
    times = set(_rows(tmp_path, CORRECTIONS_TABLE)["collected_at"].to_pylist())
    assert times == {dt.datetime(2026, 11, 26, 1, 0, tzinfo=dt.UTC)}
    with pytest.raises(SystemExit) as bad:
        main(["datahub", "correct", "--hub", str(tmp_path), "--collected-at", "2026-11-26T01:00"])
    assert bad.value.code == 2
    assert "has no time zone" in capsys.readouterr().err


def test_corrections_schema_matches_the_task():
    from arf_trainer.datahub import failures

    assert (failures.OBS_DIM, failures.ACT_DIM) == (reach.OBS_DIM, reach.ACT_DIM)


def test_seed_filter_keeps_evaluation_seeds_out_of_corrections(tmp_path, episodes, capsys):
    """The field's failures are corrected, the evaluation seeds' never: the promotion gate
    measures on those, and training on them would leak the test set."""
    from arf_trainer.cli import main

    zero = episodes["zero"]
    field = [(300_000 + i, rollout) for i, (_, rollout) in enumerate(zero[:3])]
    record_failures(tmp_path, model_name="m", model_version=1, eval_run_id="eval",
                    episodes=zero, recorded_at=T0)
    record_failures(tmp_path, model_name="m", model_version=1, eval_run_id="fleet:night-1",
                    episodes=field, recorded_at=T0)
    done = correct_failures(tmp_path, collected_at=T0, seeds=(300_000, 300_002))
    assert done["episodes"] == 2
    assert sorted(set(_rows(tmp_path, CORRECTIONS_TABLE)["seed"].to_pylist())) == [
        300_000, 300_001]  # STOP excluded, evaluation seeds untouched
    assert main(["datahub", "correct", "--hub", str(tmp_path), "--seeds", "300000:400000",
                 "--collected-at", "2026-11-26T01:00:00+00:00"]) == 0
    assert '"episodes": 1' in capsys.readouterr().out
    with pytest.raises(DataHubError, match="START:STOP"):
        correct_failures(tmp_path, collected_at=T0, seeds=(5, 5))
    for bad in ("300000", "a:b", "9:3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["datahub", "correct", "--hub", str(tmp_path), "--seeds", bad])
        assert exit_info.value.code == 2
        assert "--seeds" in capsys.readouterr().err


def test_states_all_relabels_successful_field_episodes_too(tmp_path, episodes, capsys):
    """`--states all` (DAgger): every state of every field episode is relabelled, the expert's
    successful ones included; `failures` still lists only what failed; each episode once, all
    its steps under one `episode` id (what an episode-aware split groups by)."""
    import json

    from arf_trainer.cli import main
    from arf_trainer.datahub.failures import FIELD_TABLE

    both = episodes["zero"] + [(s + 100, r) for s, r in episodes["expert"]]
    for table in (FAILURES_TABLE, FIELD_TABLE):
        record_failures(tmp_path, model_name="m", model_version=1, eval_run_id="fleet:n1",
                        episodes=both, recorded_at=T0, table=table)
    failed = sum(not r.success for _, r in both)
    assert failed < len(both)  # the expert's successes are in the field table only
    assert _rows(tmp_path, FAILURES_TABLE).num_rows == failed * reach.EPISODE_STEPS
    assert _rows(tmp_path, FIELD_TABLE).num_rows == len(both) * reach.EPISODE_STEPS

    assert main(["datahub", "correct", "--hub", str(tmp_path), "--states", "all",
                 "--collected-at", "2026-11-26T01:00:00+00:00"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == len(both)
    assert summary["rows"] == len(both) * reach.EPISODE_STEPS
    rows = _rows(tmp_path, CORRECTIONS_TABLE)
    assert sorted(set(rows["seed"].to_pylist())) == sorted(s for s, _ in both)
    per_episode = {}
    for episode, seed in zip(rows["episode"].to_pylist(), rows["seed"].to_pylist(), strict=True):
        per_episode.setdefault(episode, set()).add(seed)
    assert len(per_episode) == len(both) and all(len(s) == 1 for s in per_episode.values())
    obs = np.stack([rows[f"obs_{j}"].to_numpy() for j in range(reach.OBS_DIM)], axis=1)
    act = np.stack([rows[f"act_{j}"].to_numpy() for j in range(reach.ACT_DIM)], axis=1)
    assert np.array_equal(act, reach.expert_action(obs))
    # Done once: neither --states all nor --states failed corrects an episode again.
    for states in ("all", "failed"):
        again = correct_failures(tmp_path, collected_at=T0, states=states)
        assert again["episodes"] == 0
    with pytest.raises(DataHubError, match="--states 'some' is not one of failed, all"):
        correct_failures(tmp_path, collected_at=T0, states="some")
