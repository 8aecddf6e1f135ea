"""Hostile or careless templates and trigger confs (a review's probes, kept as regressions).

Each case was a real defect: a template that stalled or broke the DAG files (hiding every other
template's DAG), a bad value that passed lint and failed later, or a conf checked one way by
Airflow and another way by the steps.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from arf_training.errors import ConfError, TemplateError
from arf_training.params import build_params, param_schemas, resolve_conf
from arf_training.template_yaml import MAX_TEMPLATE_BYTES, MAX_VALUES
from arf_training.templates import load_folder, load_template, parse_template, template_files

REPO = Path(__file__).resolve().parents[2]
REACH = (REPO / "config_templates" / "reach_bc.yaml").read_text()
CUSTOM = (REPO / "config_templates" / "digits_lightning.yaml").read_text()


def _edit(old: str, new: str, text: str = REACH) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def _issues(text: str) -> str:
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    return str(info.value)


def _laughs(levels: int) -> str:
    """`levels` anchors, each a list of nine aliases of the one before: 9**levels values."""
    lines = ["x_junk:", "  l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly():
    started = time.perf_counter()
    message = _issues(REACH + _laughs(8))  # 9**9 values if expanded: hours, and gigabytes
    assert time.perf_counter() - started < 5
    assert f"more than {MAX_VALUES:,} values" in message and "aliases" in message


def test_a_few_aliases_still_work():
    text = _edit("  split_by: episode\n  order_by: [episode, step]",
                 "  split_by: &group episode\n  order_by: [*group, step]")
    assert parse_template(text, "t.yaml").dataset.order_by == ["episode", "step"]


def test_oversized_file_is_an_issue_not_a_stall(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(REACH + "# " + "x" * MAX_TEMPLATE_BYTES + "\n")
    good, issues = load_folder([big])
    assert good == [] and "over 1,048,576 bytes" in issues[0].message


def test_non_utf8_bytes_are_an_issue_with_their_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(_edit("owner: robotics-ml", "owner: robotics-ml-caf\u00e9").encode("latin-1"))
    with pytest.raises(TemplateError) as info:
        load_template(path)
    issue = info.value.issues[0]
    assert issue.line == 11 and "0xe9" in issue.message and "save the file as UTF-8" in \
        issue.message


def test_utf8_with_bom_loads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + REACH.encode())
    assert load_template(path).name == "reach_bc"


def test_broken_symlink_is_reported_and_a_fifo_is_skipped(tmp_path):
    (tmp_path / "good.yaml").write_text(REACH)
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    os.mkfifo(tmp_path / "pipe.yaml")  # reading it would block the DAG file forever
    files = template_files(tmp_path)
    assert [f.name for f in files] == ["gone.yaml", "good.yaml"]
    good, issues = load_folder(files)
    assert [g.name for g in good] == ["reach_bc"]
    assert issues[0].file.endswith("gone.yaml") and "cannot read" in issues[0].message


@pytest.mark.parametrize("old, new, fragments", [
    pytest.param("      default: 0.003\n", "      default: .nan\n",
                 ["training.hyperparameters.lr.default", "finite"], id="nan-default"),
    pytest.param("      maximum: 1.0\n      description: Adam", "      maximum: .inf\n"
                 "      description: Adam", ["training.hyperparameters.lr.maximum", "finite"],
                 id="inf-maximum"),
    pytest.param("      minimum: 1.0e-6\n", "      minimum: .nan\n",
                 ["training.hyperparameters.lr.minimum", "finite"], id="nan-minimum"),
    pytest.param("  tags: [reach,", "  tags: [" + "t" * 101 + ", reach,",
                 ["metadata.tags.0", "at most 100 characters"], id="tag-over-airflow-limit"),
    pytest.param("  owner: robotics-ml\n", "  owner: " + "o" * 2001 + "\n",
                 ["metadata.owner", "at most 200 characters"], id="owner-over-airflow-column"),
    pytest.param("  seed: 0\n", "  seed: 4294967296\n",
                 ["training.seed", "4294967296", "2**32"], id="seed-over-numpy-range"),
])
def test_values_airflow_or_the_trainer_would_refuse_are_template_errors(old, new, fragments):
    message = _issues(_edit(old, new))
    for fragment in fragments:
        assert fragment in message, message


def test_hpo_search_bounds_must_be_finite():
    text = _edit("low: 1.0e-4, high: 3.0e-2", "low: 1.0e-4, high: .inf",
                 (REPO / "config_templates" / "hpo_reach_bc.yaml").read_text())
    message = _issues(text)
    assert "hpo.search_space.lr" in message and "finite" in message, message


def test_nightly_recipe_is_a_reserved_hyperparameter_name():
    text = _edit("  hyperparameters:\n", "  hyperparameters:\n    nightly_recipe:\n"
                 "      type: string\n      default: mine\n", CUSTOM)
    assert "'nightly_recipe' is reserved" in _issues(text)


def test_seed_param_has_the_trainers_bound():
    template = parse_template(REACH, "t.yaml")
    schema = param_schemas(template)["seed"]
    assert schema["maximum"] == 2**32 - 1 - template.training.distributed.world_size
    with pytest.raises(ConfError, match="'seed' = 5000000000 is above its maximum"):
        resolve_conf(template, {"seed": 5_000_000_000})


def test_integral_float_for_an_integer_is_accepted_as_airflow_does():
    """Airflow's Param check (JSON Schema) accepts 3.0 for an integer from the REST API; the
    steps must not fail a run Airflow created, and must pass on the int."""
    template = parse_template(REACH, "t.yaml")
    params = build_params(template)
    params["epochs"].resolve(3.0)  # Airflow: valid
    values = resolve_conf(template, {"epochs": 3.0, "hidden_size": 64.0})
    assert values["epochs"] == 3 and type(values["epochs"]) is int
    assert type(values["hidden_size"]) is int
    with pytest.raises(ConfError, match="must be of type integer"):
        resolve_conf(template, {"epochs": 2.5})


def test_dataset_query_is_refused_at_step_time_when_not_allowed():
    """REST callers bypass the client: the step's check is what refuses the override."""
    template = parse_template(REACH, "t.yaml")
    assert not template.dataset.allow_query_override
    with pytest.raises(ConfError, match="unknown parameter 'dataset_query'"):
        resolve_conf(template, {"dataset_query": "SELECT 1"})


def test_a_dag_that_fails_to_build_hides_no_other_dag(tmp_path, monkeypatch, caplog):
    """The net under the schema: whatever still makes one template's DAG fail to build leaves
    that DAG out (logged) and builds every other DAG, `arf_evaluate` included."""
    from arf_training import factory

    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(
            _edit("name: reach_bc_policy", f"name: {name}_policy",
                  _edit("  name: reach_bc\n", f"  name: {name}\n")))
    real = factory.build_training_dag

    def build(loaded, backend_id=None):
        if loaded.name == "one":
            raise ValueError("tag cannot be longer than 100 characters")
        return real(loaded, backend_id)

    monkeypatch.setattr(factory, "build_training_dag", build)
    dags = factory.build_dags(tmp_path)
    assert sorted(dags) == ["arf_evaluate", "two"]
    assert "template one" in caplog.text and "100 characters" in caplog.text


def test_a_dag_whose_params_fail_is_not_auto_registered():
    """A DAG whose build fails after its `with` block must not reach Airflow by the DagBag's
    auto-registration of context-managed DAGs."""
    from airflow.sdk.definitions._internal.contextmanager import DagContext

    from arf_training.factory import build_training_dag
    from arf_training.templates import LoadedTemplate

    loaded = LoadedTemplate(parse_template(REACH, "t.yaml"), Path("t.yaml"), "0" * 64)
    DagContext.autoregistered_dags.clear()
    DagContext.current_autoregister_module_name = __name__  # as while a DagBag imports a file
    try:
        build_training_dag(loaded, "local")
        assert not DagContext.autoregistered_dags
    finally:
        DagContext.current_autoregister_module_name = None
        DagContext.autoregistered_dags.clear()


PIXELS = (Path(__file__).resolve().parents[2] / "config_templates"
          / "reach_pixels_bc.yaml").read_text()


@pytest.mark.parametrize("shape", ["[64, 48, 3]", "[512, 512, 3]", "[64, 64, 1]"])
def test_frames_the_reach_pixels_camera_cannot_render_are_a_template_error(shape: str) -> None:
    """They trained for a whole run; only the evaluate step then refused the model."""
    text = PIXELS.replace("shape: [64, 64, 3]", f"shape: {shape}")
    assert text != PIXELS
    with pytest.raises(TemplateError) as caught:
        parse_template(text, "px.yaml")
    assert f"dataset.decode.image.shape={shape.replace(' ', '').replace(',', ', ')}" \
        in str(caught.value)
    assert "renders square RGB frames of 8 to 256 pixels" in str(caught.value)
    assert parse_template(PIXELS.replace("shape: [64, 64, 3]", "shape: [32, 32, 3]"), "ok.yaml")


def test_bc_pixels_cameras_the_train_or_evaluate_step_would_refuse_are_template_errors() -> None:
    """Found at lint time, not after prepare has decoded every frame: a second camera where
    the reach_pixels evaluation renders one view, and a grey decoded column among the features
    (every camera must be RGB). Several RGB cameras without that evaluation are fine."""
    two = PIXELS.replace("  decode:\n", "  decode:\n    wrist: {format: png, shape: [48, 64, 3]}\n")
    assert two != PIXELS
    assert parse_template(two, "ok.yaml")  # in the query, not a feature: fine
    both = two.replace("features: [image, ", "features: [image, wr*, ")
    with pytest.raises(TemplateError) as caught:
        parse_template(both, "px.yaml")
    assert ("dataset.features take 2 cameras (wrist, image), but evaluation.environment "
            "reach_pixels renders one view") in str(caught.value)
    unevaluated = both[:both.index("evaluation:")]
    assert "evaluation:" in both and parse_template(unevaluated, "two.yaml")

    grey = unevaluated.replace("shape: [48, 64, 3]", "shape: [48, 64, 1]")
    with pytest.raises(TemplateError) as caught:
        parse_template(grey, "grey.yaml")
    assert ("dataset.decode.wrist.shape=[48, 64, 1]: recipe bc_pixels takes RGB frames from "
            "each camera; decode to shape [48, 64, 3]") in str(caught.value)
