"""`arf templates lint --hub` runs prepare's column checks on each query's zero-row result.

Before, a feature glob matching no column, a decode format that does not fit its column, a
split_by or order_by that is not a result column, or a replay query with other columns passed
lint and failed the prepare task of the first run. Each broken template here is also given to
the prepare step itself: lint must print the very message prepare raises (one implementation,
`arf_trainer.datahub.columns`, called from both sides).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from arf_trainer.datahub.prepare import run_prepare
from arf_trainer.datahub.seed import seed_demo
from arf_trainer.datahub.tables import write_table
from arf_trainer.datahub.video_store import FRAME_REF
from arf_trainer.errors import TrainerError
from arf_trainer.spec import StepEnv
from arf_training.cli_templates import _lint
from arf_training.settings import ArfSettings
from arf_training.stepspec import RunIdentity, build_step_spec
from arf_training.templates import load_folder, template_files

REPO = Path(__file__).resolve().parents[2]
PIXELS = REPO / "config_templates" / "reach_pixels_bc.yaml"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tables (with reach_pixels: PNG frames), plus `cams`: a frame-reference column
    as `arf datahub ingest --frames video` stores it (no video needed for a type check)."""
    root = tmp_path_factory.mktemp("hub")
    seed_demo(root, episodes=2, seed=0, pixels=True)
    frames = pa.array([{"video": "0" * 64, "timestamp": 0.0}], type=FRAME_REF)
    write_table(root, "cams", pa.table({"episode": [0], "step": [0], "frame": frames,
                                        "act_0": pa.array([0.5], pa.float32())}))
    return root


def _template(tmp_path: Path, **dataset: Any) -> Path:
    """reach_pixels_bc with these dataset entries replaced (None removes one)."""
    raw = yaml.safe_load(PIXELS.read_text())
    for key, value in dataset.items():
        if value is None:
            raw["dataset"].pop(key, None)
        else:
            raw["dataset"][key] = value
    path = tmp_path / "templates" / "t.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _lint_output(path: Path, hub: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = _lint([str(path)], str(hub))
    return code, capsys.readouterr().out


def _prepare_error(tmp_path: Path, hub: Path, path: Path) -> str:
    """What the prepare step raises for the template at `path`, given the job spec the Airflow
    side builds for it (`build_step_spec`)."""
    (loaded,), issues = load_folder([path])
    assert issues == []
    spec = build_step_spec(loaded, "prepare", RunIdentity("arf_t", "manual__1", "prepare"), {},
                           ArfSettings.from_env())
    env = StepEnv.from_environ({**spec.env, "ARF_JOB_SPEC_JSON": json.dumps(spec.job_spec),
                                "ARF_WORKSPACE": str(tmp_path / "workspace"),
                                "ARF_DATAHUB_URI": hub.as_uri()})
    with pytest.raises(TrainerError) as info:
        run_prepare(env)
    return str(info.value)


COLUMNS = ("SELECT episode, step, image, cos_q0, cos_q1, sin_q0, sin_q1, qdot_0, qdot_1, act_0, "
           "act_1 FROM reach_pixels")

# (dataset entries, the start of the lint line after "error  <file>: ")
BROKEN = [
    pytest.param({"features": ["image", "obz_*"]},
                 "dataset.features entry 'obz_*' matches no column of the query result",
                 id="feature-glob-matches-nothing"),
    pytest.param({"decode": {"image": {"format": "video", "shape": [64, 64, 3]}}},
                 "dataset.decode.image: column 'image' has type binary, not the frame "
                 "references", id="video-format-over-png-bytes"),
    pytest.param({"query": "SELECT episode, step, frame, act_0, act_0 AS act_1 FROM cams",
                  "features": ["frame"],
                  "decode": {"frame": {"format": "png", "shape": [64, 64, 3]}}},
                 "dataset.decode.frame: column 'frame' has type struct<video: string, "
                 "timestamp: double>, not binary (BLOB) bytes to decode",
                 id="png-format-over-frame-references"),
    pytest.param({"split_by": "episod"}, "dataset.split_by is 'episod', not a column",
                 id="split-by-not-a-column"),
    pytest.param({"order_by": ["episode", "stp"]},
                 "dataset.order_by names stp, not a column of the result of dataset.query",
                 id="order-by-not-a-column"),
    pytest.param({"query": COLUMNS.replace("qdot_1,", "[qdot_0, qdot_1] AS qdot,"),
                  "features": ["image", "cos_*", "sin_*", "qdot"]},
                 "dataset.features column 'qdot' has type list<l: float>, which has no "
                 "fixed shape", id="variable-length-feature"),
    pytest.param({"replay": {"query": COLUMNS.replace(", act_1", ""), "ratio": 1.0}},
                 "dataset.replay.query must return the same columns as dataset.query",
                 id="replay-columns-differ"),
]


@pytest.mark.parametrize(("dataset", "line"), BROKEN)
def test_lint_reports_what_prepare_would_refuse_with_its_message(
        tmp_path: Path, hub: Path, capsys: pytest.CaptureFixture[str],
        dataset: dict[str, Any], line: str) -> None:
    path = _template(tmp_path, **dataset)
    code, out = _lint_output(path, hub, capsys)
    assert code == 2, out
    assert f"error  {path}: {line}" in out, out
    assert "0 valid, 1 invalid" in out
    # The same text prepare gives, word for word: the check is prepare's own.
    assert f"error  {path}: {_prepare_error(tmp_path, hub, path)}\n" in out


def test_a_correct_template_lints_clean_with_its_columns_checked(
        tmp_path: Path, hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped templates (pixels, replay, order_by, split_by) against a seeded hub."""
    shipped = sorted((REPO / "config_templates").glob("*.yaml"))
    code, out = _lint_output(REPO / "config_templates", hub, capsys)
    assert code == 0, out
    assert "result columns checked as prepare checks them" in out
    assert f"{len(shipped)} valid, 0 invalid" in out
    # Lint dumps the dataset section alone; the job spec holds it inside the whole template's.
    good, _ = load_folder(template_files(REPO / "config_templates"))
    for loaded in good:
        with warnings.catch_warnings():  # pydantic's about an integer resources.cpu
            warnings.simplefilter("ignore", UserWarning)
            whole = loaded.template.model_dump(mode="json", by_alias=True)
        assert loaded.template.dataset.model_dump(mode="json", by_alias=True) == whole["dataset"]
    # And the same template with one broken column is not clean: the check did run on it.
    code, out = _lint_output(_template(tmp_path, targets=["act_0", "act_2"]), hub, capsys)
    assert code == 2 and "dataset.targets entry 'act_2' matches no column" in out


def test_a_query_that_fails_at_limit_0_is_a_lint_line_not_a_traceback(
        tmp_path: Path, hub: Path) -> None:
    """Passes the static check (DuckDB parses it), fails binding: found by running LIMIT 0."""
    path = _template(tmp_path, query=COLUMNS.replace("act_1", "act_9"))
    arf = Path(sys.executable).parent / "arf"
    result = subprocess.run([str(arf), "templates", "lint", "--hub", str(hub), str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"error  {path}: dataset.query: the dataset query failed: Binder Error" \
        in result.stdout
    assert '"act_9" not found' in result.stdout and "0 valid, 1 invalid" in result.stdout


def test_no_column_check_without_a_hub_or_after_a_failed_query_check(
        tmp_path: Path, hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without tables there is nothing to run the query on; a query the static check refused
    is reported once, not again by the column check."""
    path = _template(tmp_path, features=["obz_*"])
    code, out = _lint_output(path, tmp_path / "no-hub", capsys)
    assert code == 0 and "no data hub tables at" in out
    path = _template(tmp_path, query=COLUMNS.replace("reach_pixels", "reach_pixelz"),
                     features=["obz_*"])
    code, out = _lint_output(path, hub, capsys)
    assert code == 2 and out.count(f"error  {path}:") == 1, out
    assert "'reach_pixelz', which is not a table of the data hub" in out
