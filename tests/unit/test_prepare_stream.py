"""The prepare step's streaming path: episode splits, declared order, spilling, array columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.seed import seed_demo
from arf_trainer.datahub.split import ExactSample
from arf_trainer.datahub.tables import write_table
from arf_trainer.errors import QueryError, SpecError
from test_prepare import REPO, _manifest, step_env


def _episodes(workspace: Path) -> dict[str, set[int]]:
    manifest = _manifest(workspace)
    return {split: {e for s in manifest["shards"][split]
                    for e in pq.read_table(workspace / "prepare" / s["path"],
                                           columns=["episode"])["episode"].to_pylist()}
            for split in ("train", "val")}


def _rows(workspace: Path, split: str, columns: list[str] | None = None) -> pa.Table:
    manifest = _manifest(workspace)
    return pa.concat_tables([pq.read_table(workspace / "prepare" / s["path"], columns=columns)
                             for s in manifest["shards"][split]])


def test_split_by_keeps_episodes_whole_and_is_stable_under_append(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    seed_demo(hub, episodes=30, seed=0, force=False)
    run_prepare(step_env(tmp_path / "v0", hub))  # reach_bc: split_by episode
    before = _episodes(tmp_path / "v0")
    assert before["train"] and before["val"] and not before["train"] & before["val"]
    manifest = _manifest(tmp_path / "v0")
    assert manifest["split_by"] == "episode" and manifest["order_by"] == ["episode", "step"]

    seed_demo(hub, episodes=10, seed=1, force=True)  # appends episodes 30..39: version 1
    run_prepare(step_env(tmp_path / "v1", hub))
    after = _episodes(tmp_path / "v1")
    assert not after["train"] & after["val"]
    # Every earlier episode stays on its side; only new episodes are added.
    assert before["train"] <= after["train"] and before["val"] <= after["val"]
    assert (after["train"] | after["val"]) - (before["train"] | before["val"]) <= set(range(30, 40))


def test_group_fraction_follows_validation_split_and_the_seed(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    groups = np.repeat(np.arange(4000), 2)
    write_table(hub, "g", pa.table({"key": [f"run-{g}" for g in groups],
                                    "i": np.arange(len(groups)), "x": np.ones(len(groups))}))
    dataset = {"query": "SELECT * FROM g", "features": ["x"], "targets": ["i"],
               "split_by": "key", "order_by": ["i"], "validation_split": 0.2}
    fractions, vals = [], []
    for seed in (0, 1):
        ws = tmp_path / f"s{seed}"
        run_prepare(step_env(ws, hub, dataset=dataset, seed=seed))
        manifest = _manifest(ws)
        fractions.append(manifest["val_rows"] / manifest["rows"])
        vals.append(set(_rows(ws, "val", ["key"])["key"].to_pylist()))
        assert not vals[-1] & set(_rows(ws, "train", ["key"])["key"].to_pylist())
    assert all(0.18 < f < 0.22 for f in fractions), fractions  # 800 +- 25 groups (1 sd)
    assert vals[0] != vals[1]


def test_exact_row_sample_does_not_depend_on_batch_sizes() -> None:
    whole = ExactSample(200_000, 20_000, 7, "q").mask(200_000)
    sample = ExactSample(200_000, 20_000, 7, "q")
    pieces = np.concatenate([sample.mask(n) for n in (1, 65_535, 3, 70_000, 64_461)])
    assert whole.sum() == 20_000 and np.array_equal(whole, pieces)


def _shuffled_hub(root: Path, order: np.ndarray, parts: int) -> Path:
    episodes, steps = np.repeat(np.arange(50), 40), np.tile(np.arange(40), 50)
    rng = np.random.default_rng(0)
    table = pa.table({"episode": episodes, "step": steps.astype(np.int32),
                      "obs_0": rng.normal(size=2000).astype(np.float32),
                      "act_0": rng.normal(size=2000).astype(np.float32)}).take(order)
    for number, chunk in enumerate(np.array_split(np.arange(2000), parts)):
        write_table(root, "demos", table.take(chunk), mode="append" if number else "overwrite")
    return root


ORDERED = {"query": "SELECT * FROM demos", "features": ["obs_0"], "targets": ["act_0"],
           "split_by": "episode", "order_by": ["episode", "step"]}


def test_same_rows_in_any_physical_layout_give_the_same_fingerprint(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    one = _shuffled_hub(tmp_path / "a", np.arange(2000), parts=1)
    other = _shuffled_hub(tmp_path / "b", rng.permutation(2000), parts=5)
    prints = []
    for name, hub, seed in (("a", one, 0), ("a2", one, 0), ("b", other, 0), ("c", one, 3)):
        run_prepare(step_env(tmp_path / name, hub, dataset=ORDERED, seed=seed))
        prints.append(_manifest(tmp_path / name)["fingerprint"])
    assert prints[0] == prints[1] == prints[2] != prints[3]
    train = _rows(tmp_path / "b", "train", ["episode", "step"])
    keys = list(zip(train["episode"].to_pylist(), train["step"].to_pylist(), strict=True))
    assert keys == sorted(keys)  # the declared order, whatever order the files hold


def test_a_query_reading_one_table_twice_streams_every_row(tmp_path: Path) -> None:
    # The stream scans tables through bounded-read-ahead datasets (query._bounded_scan): a
    # self-join reads the same one twice and must still see every row.
    hub = _shuffled_hub(tmp_path / "hub", np.arange(2000), parts=3)
    summary = run_prepare(step_env(tmp_path / "ws", hub, dataset={
        **ORDERED, "query": "SELECT d.episode, d.step, d.obs_0, e.act_0 FROM demos d "
                            "JOIN demos e ON d.episode = e.episode AND d.step = e.step "
                            "WHERE d.obs_0 > -100"}))
    assert summary["rows"] == 2000


def test_streamed_tables_keep_projection_and_filter_pushdown(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The stream reads tables with little read-ahead (query._BoundedDataset); DuckDB must still
    # ask it for the query's columns and filter only, so a narrow query over a wide frame table
    # does not read every frame.
    from arf_trainer.datahub import query

    asked: list[dict[str, Any]] = []
    scanner = query._BoundedDataset.scanner

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        made = scanner(self, *args, **kwargs)
        asked.append({**kwargs, "read": made.projected_schema.names})
        return made

    monkeypatch.setattr(query._BoundedDataset, "scanner", spy)
    hub = _shuffled_hub(tmp_path / "hub", np.arange(2000), parts=3)
    summary = run_prepare(step_env(tmp_path / "ws", hub, dataset={
        **ORDERED, "query": "SELECT episode, step, act_0 FROM demos WHERE step >= 5",
        "features": ["step"]}))
    assert summary["rows"] == 2000 - 5 * 50  # 50 episodes of 40 steps
    assert asked and all(sorted(a["read"]) == ["act_0", "episode", "step"]
                         and a["filter"] is not None for a in asked), asked


@pytest.mark.parametrize(("dataset", "error", "fragment"), [
    pytest.param({"split_by": "run"}, SpecError, "dataset.split_by is 'run', not a column of the "
                 "query result; columns: episode, step, obs_0, act_0", id="split-by-missing"),
    pytest.param({"order_by": ["episode", "t"]}, SpecError, "dataset.order_by names t, not a "
                 "column", id="order-by-missing"),
    pytest.param({"order_by": ["episode"]}, SpecError, r"dataset.order_by \['episode'\] is not "
                 "a unique key of dataset.query's result: more than one row has {'episode': 0}",
                 id="order-by-not-unique"),
])
def test_layout_errors_name_the_column_and_leave_nothing(tmp_path: Path, dataset: dict[str, Any],
                                                         error: type[Exception],
                                                         fragment: str) -> None:
    hub = _shuffled_hub(tmp_path / "hub", np.arange(2000), parts=1)
    workspace = tmp_path / "ws"
    with pytest.raises(error, match=fragment):
        run_prepare(step_env(workspace, hub, dataset={**ORDERED, **dataset}))
    assert list(workspace.iterdir()) == []  # no shards, no spill files


def test_result_larger_than_duckdbs_memory_spills_into_the_workspace(tmp_path: Path) -> None:
    # ~100 MB of rows sorted under a 64 MiB DuckDB limit (half of resources.memory: 128Mi): the
    # sort must spill. Before, the sandbox had no spill directory and such a query failed.
    n = 1_200_000
    rng = np.random.default_rng(0)
    hub = tmp_path / "hub"
    write_table(hub, "big", pa.table({"id": rng.permutation(n),
                                      **{f"f{j}": rng.normal(size=n) for j in range(10)}}))
    env = step_env(tmp_path / "ws", hub, dataset={
        "query": "SELECT * FROM big", "features": ["f*"], "targets": ["id"], "split_by": None,
        "order_by": ["id"], "validation_split": 0.1})
    env.spec.training["resources"]["memory"] = "128Mi"
    summary = run_prepare(env)
    assert (summary["rows"], summary["val_rows"]) == (n, n // 10)
    assert [p.name for p in (tmp_path / "ws").iterdir()] == ["prepare"]  # spill removed
    ids = _rows(tmp_path / "ws", "train", ["id"])["id"].to_numpy()
    assert np.all(np.diff(ids) > 0)


def _array_hub(root: Path) -> Path:
    n = 30
    rng = np.random.default_rng(0)
    joints = pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 7), pa.float32()), 7)
    pixels = pa.array(rng.integers(0, 255, size=n * 4 * 4 * 3).astype(np.uint8))
    image = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pixels, 3), 4), 4)
    write_table(root, "frames", pa.table({
        "episode": np.repeat(np.arange(6), 5), "step": np.tile(np.arange(5), 6),
        "joints": joints, "image": image,
        "action": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 2), pa.float32()), 2),
        "tags": pa.array([["a"] * (i % 3) for i in range(n)], pa.list_(pa.string()))}))
    return root


def test_fixed_shape_array_columns_pass_through_with_dtype_and_shape(tmp_path: Path) -> None:
    hub = _array_hub(tmp_path / "hub")
    dataset = {"query": "SELECT episode, step, joints, image, action, tags, "
                        "[1.5, 2.5]::DOUBLE[2] AS const FROM frames",
               "features": ["joints", "image"], "targets": ["action"], "split_by": "episode",
               "order_by": ["episode", "step"], "validation_split": 0.3}
    run_prepare(step_env(tmp_path / "ws", hub, dataset=dataset))
    columns = {c["name"]: c for c in _manifest(tmp_path / "ws")["columns"]}
    assert {n: (c["dtype"], c["shape"]) for n, c in columns.items()} == {
        "episode": ("int64", []), "step": ("int64", []), "joints": ("float32", [7]),
        "image": ("uint8", [4, 4, 3]), "action": ("float32", [2]), "tags": (None, None),
        "const": ("float64", [2])}
    rows = pa.concat_tables([_rows(tmp_path / "ws", s) for s in ("train", "val")])
    assert rows.schema.field("image").type == pa.list_(pa.list_(pa.list_(pa.uint8(), 3), 4), 4)
    original = pa.Table.from_batches(
        pq.ParquetDataset(sorted((hub / "frames").glob("*.parquet"))).read().to_batches())
    by_key = {(e, s): img for e, s, img in zip(original["episode"].to_pylist(),
                                               original["step"].to_pylist(),
                                               original["image"].to_pylist(), strict=True)}
    for e, s, img in zip(rows["episode"].to_pylist(), rows["step"].to_pylist(),
                         rows["image"].to_pylist(), strict=True):
        assert img == by_key[(e, s)]


def test_variable_length_list_feature_is_refused_naming_it(tmp_path: Path) -> None:
    hub = _array_hub(tmp_path / "hub")
    dataset = {"query": "SELECT * FROM frames", "features": ["joints", "tags"],
               "targets": ["action"], "split_by": "episode", "order_by": ["episode", "step"]}
    with pytest.raises(SpecError, match=r"dataset.features column 'tags' has type "
                       r"list<.*no fixed shape.*CAST\(tags AS FLOAT\[7\]\)"):
        run_prepare(step_env(tmp_path / "ws", hub, dataset=dataset))
    assert list((tmp_path / "ws").iterdir()) == []


def test_memory_error_inside_the_stream_is_still_a_query_error(tmp_path: Path) -> None:
    hub = _shuffled_hub(tmp_path / "hub", np.arange(2000), parts=1)
    env = step_env(tmp_path / "ws", hub, dataset={
        **ORDERED, "query": "SELECT d.*, e.step AS s2 FROM demos d, demos e"})
    env.spec.training["resources"]["memory"] = "8Mi"  # 4 MiB for DuckDB: too small to work
    with pytest.raises(QueryError, match="needs more than its memory limit of 4MiB within "
                                         "resources.memory: 8Mi"):
        run_prepare(env)


@pytest.mark.parametrize(("layout", "fragment"), [
    pytest.param({"order_by": ["episode", "episode"]}, "repeated: episode", id="repeat"),
    pytest.param({"order_by": []}, "at least 1 item", id="empty"),
    pytest.param({"split_by": ""}, "at least 1 character", id="blank-split-by"),
])
def test_template_layout_fields_are_validated(tmp_path: Path, layout: dict[str, Any],
                                              fragment: str) -> None:
    from arf_training.errors import TemplateError
    from arf_training.templates import parse_template

    raw = yaml.safe_load((REPO / "config_templates" / "reach_bc.yaml").read_text())
    raw["dataset"].update(layout)
    with pytest.raises(TemplateError, match=fragment):
        parse_template(yaml.safe_dump(raw))


def test_shipped_robot_templates_split_by_episode() -> None:
    from arf_training.templates import parse_template

    for name in ("reach_bc", "hpo_reach_bc", "reach_bc_retrain", "reach_bc_failure_finetune"):
        dataset = parse_template((REPO / "config_templates" / f"{name}.yaml").read_text()).dataset
        assert (dataset.split_by, dataset.order_by) == ("episode", ["episode", "step"]), name

