"""The failure-loop benchmark's bookkeeping: the goals are computed from the rows (not
assumed), the table and the plot are written. The loop itself runs through Airflow in
`bench/failure_loop.py`; its parts (fleet, corrections, the nightly DAG, the gate) have their
own tests."""

from __future__ import annotations

import json

import pytest

from arf_training import failure_loop as fl
from arf_training.cli import main as arf_main
from arf_training.errors import ConfError


def night(label, rate, *, promoted, champion_rate=None, after=None, steps=0, skipped=None,
          by_hand=False, model=fl.MODEL, version="2"):
    return fl.Night(label=label, model=model, logical_date="2026-12-01T02:00:00+00:00",
                    candidate_version=version, success_rate=rate,
                    ci95=None if rate is None else (max(0.0, rate - 0.1), min(1.0, rate + 0.1)),
                    promoted=promoted, by_hand=by_hand, champion_rate=champion_rate,
                    champion_after="2", champion_after_rate=after, steps=steps, skipped=skipped,
                    train_seconds=steps / 100)


def rows():
    return [night("start", 0.40, promoted=False, by_hand=True, after=0.40, steps=270),
            night("night 1", 0.80, promoted=True, champion_rate=0.40, after=0.80, steps=70),
            night("night 2", 0.70, promoted=False, champion_rate=0.80, after=0.80, steps=50),
            night("night 3", None, promoted=None, after=0.80, skipped="no corrections"),
            night("night 4", 0.92, promoted=True, champion_rate=0.80, after=0.92, steps=40)]


SCRATCH = night("from scratch", 0.92, promoted=True, model=fl.SCRATCH_MODEL, steps=1000)


def test_goals_hold_when_the_rows_meet_them():
    s = fl.summarize(fl.LoopConfig(), rows(), SCRATCH)
    assert s["finetune_steps"] == 160  # the skipped night and the weak start do not count
    assert s["compute_ratio_steps"] == pytest.approx(0.16)
    assert s["final_champion_rate"] == 0.92 and s["gap_to_scratch"] == pytest.approx(0.0)
    assert s["first_night_at_goal"] == 4 and not s["worse_promotions"]
    assert all(s["goals"].values()), s["goals"]


def test_each_goal_fails_on_its_own_evidence():
    nights = rows()
    nights[4] = night("night 4", 0.78, promoted=True, champion_rate=0.80, after=0.78,
                      steps=400)  # promoted although worse; costly
    s = fl.summarize(fl.LoopConfig(), nights, SCRATCH)
    assert s["worse_promotions"] == ["night 4"]
    goals = s["goals"]
    assert not goals["no worse model promoted"]
    assert not goals["champion >= 90% within 4 nights"]
    assert not goals["fine-tunes <= 25% of from-scratch steps"]  # 520 / 1000
    assert not goals["final champion within 2 points of from scratch (or better)"]


def test_table_and_plot(tmp_path):
    nights = rows()
    nights[0] = night("start", 0.0, promoted=False, by_hand=True, after=0.0, steps=270)
    s = fl.summarize(fl.LoopConfig(), nights, SCRATCH)
    table = fl.format_table(s)
    assert "by hand" in table and "promoted" in table and "rejected" in table
    assert "skipped: no corrections" in table
    assert "16.0% of the steps" in table.replace("160 optimizer", "")
    assert "[x] champion >= 90% within 4 nights" in table  # 0.92 at night 4
    png = fl.plot(s, tmp_path / "loop.png")  # a 0 % rate: its Wilson bound may round below 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("field, value", [("nights", 0), ("demos", -1),
                                          ("field_episodes", True), ("seed", 100)])
def test_bad_loop_settings_are_input_errors(field, value):
    with pytest.raises(ConfError, match=f"--{field.replace('_', '-')}"):
        fl.LoopConfig(**{field: value}).check()


def test_a_loop_stays_inside_its_field_seed_block():
    """A loop of --seed k uses field seeds FIELD_SEED0 + k * FIELD_SEEDS_PER_LOOP onwards: more
    nights x episodes than the block would reuse the next seed's field seeds."""
    fl.LoopConfig(nights=4, field_episodes=fl.FIELD_SEEDS_PER_LOOP // 4).check()
    with pytest.raises(ConfError, match="more than the 100000 of one --seed's block"):
        fl.LoopConfig(nights=5, field_episodes=fl.FIELD_SEEDS_PER_LOOP // 4).check()


def test_cli_rejects_a_bad_setting_before_running(capsys):
    assert arf_main(["demo", "failure-loop", "--nights", "0"]) == 2
    assert "--nights 0 must be a positive integer" in capsys.readouterr().err


def test_the_nights_so_far_are_on_disk_after_each_night(tmp_path):
    """A loop that failed at night 3 of 4 (an hour in) wrote no record at all: only the
    console's lines said what nights 0-2 measured."""
    from arf_training import failure_loop as fl

    # Not Loop(...): that points this process at a new home's Airflow DB and PostgreSQL (its
    # os.environ), which broke test_postgres's view of the session's home after it.
    loop = object.__new__(fl.Loop)
    loop.home, loop.config, loop.nights = tmp_path / "home", fl.LoopConfig(), []
    loop.home.mkdir()
    loop.nights.append(fl.Night(label="night 0", success_rate=0.6))
    loop._record_so_far()
    loop.nights.append(fl.Night(label="night 1", success_rate=0.7, promoted=True))
    loop._record_so_far()
    record = json.loads((tmp_path / "home" / fl.PARTIAL_RECORD).read_text())
    assert record["complete"] is False
    assert [(n["label"], n["success_rate"]) for n in record["nights"]] == [
        ("night 0", 0.6), ("night 1", 0.7)]
    assert record["config"]["nights"] == fl.LoopConfig().nights
    assert not list((tmp_path / "home").glob(".*.tmp"))
