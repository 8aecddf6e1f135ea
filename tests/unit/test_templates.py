"""Template schema: valid templates load; every malformed one says file, line, field and fix."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from arf_training.errors import TemplateError
from arf_training.template_yaml import read_yaml
from arf_training.templates import json_schema, load_folder, parse_template, template_files

REPO = Path(__file__).resolve().parents[2]
GOOD = (REPO / "config_templates" / "digits_smoke.yaml").read_text()


def test_shipped_templates_are_valid():
    good, issues = load_folder(template_files(REPO / "config_templates"))
    assert issues == []
    assert {t.name for t in good} >= {"reach_bc", "digits_smoke"}
    reach = next(t for t in good if t.name == "reach_bc")
    assert reach.template.training.distributed.world_size == 2
    assert len(reach.sha256) == 64


def _edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


def _decode(entry: str) -> str:
    return _edit("  validation_split: 0.2",
                 f"  validation_split: 0.2\n  decode:\n    pixels: {entry}")


# (id, template text, expected fragments of the message, expected line or None)
MALFORMED = [
    pytest.param(_edit("  owner: platform", "  owner: platform\n  ownr: x"),
                 ["metadata.ownr", "unknown key 'ownr'", "allowed keys here", "owner"], 10,
                 id="unknown-key"),
    pytest.param(_edit("procs_per_node: 2", "procs_per_node: two"),
                 ["training.distributed.procs_per_node", "'two'"], None, id="wrong-type"),
    pytest.param(_edit("schedule: null", "schedule: '0 25 * * *'"),
                 ["schedule", "not a valid cron expression", "'0 2 * * *'"], 11, id="bad-cron"),
    pytest.param(_edit("schedule: null", "schedule: '0 2 * * * *'"),
                 ["schedule", "has 6 fields", "5 standard ones", "a 6th would be seconds"], 11,
                 id="cron-with-seconds"),
    pytest.param(_edit("schedule: null", "schedule: '@fortnightly'"),
                 ["schedule", "unknown preset", "@daily"], 11, id="bad-preset"),
    pytest.param(_edit("cpu: 1", "cpu: -2"),
                 ["training.resources.cpu", "not a positive Kubernetes quantity"], None,
                 id="negative-cpu"),
    pytest.param(_edit("memory: 1Gi", "memory: lots"),
                 ["training.resources.memory", "'lots'"], None, id="bad-memory"),
    pytest.param(_edit("SELECT * FROM digits", "COPY digits TO '/tmp/x.csv'"),
                 ["dataset.query", "must be a single SELECT", "'COPY'"], None, id="non-select"),
    pytest.param(_edit("SELECT * FROM digits", "SELECT 1; DROP TABLE digits"),
                 ["dataset.query", "more than one statement"], None, id="two-statements"),
    pytest.param(_edit("  name: digits_smoke", "  name: Digits Smoke"),
                 ["metadata.name", "should match pattern"], None, id="bad-name"),
    pytest.param(_edit("      default: 0.01", "      default: 5.0"),
                 ["training.hyperparameters.lr", "default 5.0 is above maximum 1.0"], None,
                 id="default-out-of-range"),
    pytest.param(_edit("      default: 64\n      enum: [32, 64, 128]",
                       "      default: 48\n      enum: [32, 64, 128]"),
                 ["hidden_size", "default 48 is not one of enum"], None, id="default-not-in-enum"),
    pytest.param(_edit("    epochs:\n      type: integer", "    epochz:\n      type: integer"),
                 ["recipe 'classifier' has no hyperparameter(s) ['epochz']", "accepts"], None,
                 id="unknown-hyperparameter"),
    pytest.param(_edit("    lr:\n      type: number\n      default: 0.01\n      minimum: 1.0e-6\n"
                       "      maximum: 1.0\n      description: Adam learning rate.\n", ""),
                 ["training", "recipe 'classifier' needs hyperparameter(s) ['lr'] declared",
                  "lr: {type: number, default: 0.001}"], None, id="required-hyperparameter"),
    pytest.param(_edit("    epochs:\n      type: integer", "    epochs:\n      type: int"),
                 ["training.hyperparameters.epochs", "'integer'"], None, id="bad-param-type"),
    pytest.param(_edit("  recipe: classifier", "  recipe: classifier\n  command:\n    image: x\n"
                                               "    command: [python, train.py]"),
                 ["training", "exactly one of 'recipe'"], None, id="recipe-and-command"),
    pytest.param(_edit("  recipe: classifier", "  recipe: xgboost"),
                 ["training.recipe", "'bc', 'classifier' or 'bc_pixels'"], None, id="unknown-recipe"),
    pytest.param(_edit("validation_split: 0.2", "validation_split: 1.5"),
                 ["dataset.validation_split", "less than 1"], None, id="split-range"),
    pytest.param(_decode("{format: gif, shape: [8, 8, 1]}"),
                 ["dataset.decode.pixels.format", "'png', 'jpeg' or 'video'", "'gif'"], None,
                 id="decode-format"),
    pytest.param(_decode("{format: png, shape: [8, 8, 2]}"),
                 ["dataset.decode.pixels.shape", "channels must be 1 (grayscale), 3 (RGB) or 4"],
                 None, id="decode-channels"),
    pytest.param(_decode("{format: png, shape: [0, 8, 1]}"),
                 ["dataset.decode.pixels.shape", "height and width must be 1..4096"], None,
                 id="decode-size"),
    pytest.param(_decode("{format: png, shape: [8, 8]}"),
                 ["dataset.decode.pixels.shape", "[height, width, channels]"], None,
                 id="decode-rank"),
    pytest.param(_decode("{format: png, shape: [8, 8, 1], resize: true}"),
                 ["dataset.decode.pixels.resize", "allowed keys here: downscale, format, shape"], None,
                 id="decode-unknown-key"),
    pytest.param(_edit("apiVersion: arf.dev/v1", "apiVersion: arf.dev/v9"),
                 ["apiVersion", "unsupported apiVersion 'arf.dev/v9'"], 1, id="api-version"),
    pytest.param(_edit("model:\n  name: digits_classifier\n", ""),
                 ["model", "required field is missing"], None, id="missing-section"),
    pytest.param(_edit("  tags: [smoke, classifier]", "  tags: [smoke, classifier\n  x: ]"),
                 ["YAML syntax error"], None, id="yaml-syntax"),
    pytest.param(_edit("  name: digits_smoke", "  name: arf_evaluate"),
                 ["metadata.name", "reserved"], None, id="reserved-name"),
    pytest.param(_edit("model:\n  name: digits_classifier",
                       "model:\n  name: digits_classifier\n  base_model: digits_classifier@champion"),
                 ["model.base_model", "should match pattern"], None, id="bad-base-model"),
]


@pytest.mark.parametrize("text, fragments, line", MALFORMED)
def test_malformed_template_messages(text, fragments, line):
    with pytest.raises(TemplateError) as info:
        parse_template(text, "config_templates/broken.yaml")
    message = str(info.value)
    assert message.startswith("config_templates/broken.yaml")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    if line is not None:
        assert info.value.issues[0].line == line, message


def test_every_issue_is_reported_not_only_the_first():
    text = _edit("cpu: 1", "cpu: -1").replace("procs_per_node: 2", "procs_per_node: 0")
    with pytest.raises(TemplateError) as info:
        parse_template(text, "t.yaml")
    fields = {i.field for i in info.value.issues}
    assert {"training.resources.cpu", "training.distributed.procs_per_node"} <= fields


def test_broken_template_does_not_hide_the_others(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(_edit("cpu: 1", "cpu: -1"))
    good, issues = load_folder(template_files(tmp_path))
    assert [g.name for g in good] == ["digits_smoke"]
    assert {i.file for i in issues} == {str(tmp_path / "b.yaml")}


def test_duplicate_names_are_errors_for_every_copy(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD.replace("digits_classifier", "other_model"))
    (tmp_path / "c.yaml").write_text(REPO.joinpath("config_templates/reach_bc.yaml").read_text())
    good, issues = load_folder(template_files(tmp_path))
    assert [g.name for g in good] == ["reach_bc"]
    assert len(issues) == 2
    assert all("duplicate name 'digits_smoke'" in i.message for i in issues)
    assert all(str(tmp_path / "a.yaml") in i.message and str(tmp_path / "b.yaml") in i.message
               for i in issues)


def test_duplicate_model_names_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD.replace("name: digits_smoke", "name: digits_two"))
    good, issues = load_folder(template_files(tmp_path))
    assert good == [] and all("duplicate model name" in i.message for i in issues)


def test_dataset_decode_reaches_the_job_spec_and_the_schema():
    import jsonschema
    import yaml

    text = _decode("{format: png, shape: [8, 8, 1]}")
    template = parse_template(text, "t.yaml")
    # The job spec carries the template as JSON: what the prepare step reads.
    assert template.model_dump(mode="json")["dataset"]["decode"] == {
        "pixels": {"format": "png", "shape": [8, 8, 1]}}
    assert parse_template(GOOD).model_dump(mode="json")["dataset"]["decode"] is None
    jsonschema.validate(yaml.safe_load(text), json_schema())


def test_json_schema_export_validates_the_shipped_templates():
    import jsonschema
    import yaml

    schema = json_schema()
    for path in template_files(REPO / "config_templates"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**yaml.safe_load(GOOD), "bogus": 1}, schema)


def test_lint_cli(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(_edit("cpu: 1", "cpu: -1"))
    arf = Path(sys.executable).parent / "arf"
    ok = subprocess.run([str(arf), "templates", "lint", str(tmp_path / "good.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([str(arf), "templates", "lint", str(tmp_path)], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert "bad.yaml:" in bad.stdout and "training.resources.cpu" in bad.stdout
    assert "1 valid, 1 invalid" in bad.stdout
    schema = subprocess.run([str(arf), "templates", "schema"], capture_output=True, text=True)
    assert json.loads(schema.stdout)["title"].startswith("ARF training template")


# -- YAML problems PyYAML lets through or places late (issue 13) ---------------------------------

def _line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def test_duplicate_key_is_rejected_with_both_lines():
    # A second metadata.name would otherwise silently rename the DAG.
    text = _edit("  owner: platform", "  owner: platform\n  name: renamed_dag")
    with pytest.raises(TemplateError) as info:
        parse_template(text, "dup.yaml")
    [issue] = info.value.issues
    assert (issue.file, issue.field) == ("dup.yaml", "metadata.name")
    assert issue.line == _line_of(text, "name: renamed_dag")
    assert f"first at line {_line_of(text, 'name: digits_smoke')}" in issue.message
    assert str(info.value).startswith(f"dup.yaml:{issue.line}: metadata.name: duplicate key 'name'")


def test_every_duplicate_key_is_reported_at_any_depth():
    text = (_edit("      default: 0.01", "      default: 0.01\n      default: 0.5")
            .replace("schedule: null", "schedule: null\nschedule: '@daily'"))
    with pytest.raises(TemplateError) as info:
        parse_template(text, "dup.yaml")
    found = {(i.field, i.line) for i in info.value.issues}
    assert found == {("schedule", _line_of(text, "schedule: '@daily'")),
                     ("training.hyperparameters.lr.default", _line_of(text, "default: 0.5"))}


def test_merge_keys_may_be_overridden():
    # Keys merged in with `<<` are defaults that the mapping's own keys replace: no duplicate.
    doc = read_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n", "m.yaml")
    assert doc.data["d"] == {"x": 3, "y": 2}


# (id, text, the line the issue must point at, fragments of the message)
YAML_SYNTAX = [
    pytest.param(_edit("  tags: [smoke, classifier]", "  tags: [smoke, classifier\n  x: 1"),
                 "tags: [smoke", ["flow sequence", "close the '['"], id="unclosed-bracket"),
    pytest.param(_edit("  owner: platform", "  owner platform"), "owner platform",
                 ["add the ':'"], id="missing-colon"),
    pytest.param(_edit("  owner: platform", "  owner: \"platform"), "owner: \"platform",
                 ["quoted value opened at line", "close its quote"], id="unclosed-quote"),
    pytest.param(_edit("  owner: platform", "  owner: platform\n   extra: 1"), "extra: 1",
                 ["indented deeper"], id="over-indented"),
]


@pytest.mark.parametrize("text, culprit, fragments", YAML_SYNTAX)
def test_yaml_syntax_error_points_at_the_broken_line(text, culprit, fragments):
    with pytest.raises(TemplateError) as info:
        parse_template(text, "syntax.yaml")
    [issue] = info.value.issues
    message = str(info.value)
    assert issue.line == _line_of(text, culprit), message
    assert message.startswith(f"syntax.yaml:{issue.line}: YAML syntax error"), message
    assert f"line {issue.line}" in message  # named in the text too, next to PyYAML's own line
    for fragment in fragments:
        assert fragment in message, message


def test_lint_reports_duplicate_keys_and_syntax_lines(tmp_path):
    dup = _edit("  owner: platform", "  owner: platform\n  name: renamed_dag")
    bad = _edit("  tags: [smoke, classifier]", "  tags: [smoke, classifier\n  x: 1")
    (tmp_path / "dup.yaml").write_text(dup)
    (tmp_path / "bad.yaml").write_text(bad)
    arf = Path(sys.executable).parent / "arf"
    out = subprocess.run([str(arf), "templates", "lint", str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"dup.yaml:{_line_of(dup, 'renamed_dag')}: metadata.name: duplicate key" in out.stdout
    assert f"bad.yaml:{_line_of(bad, 'tags: [smoke')}: YAML syntax error" in out.stdout


# -- lint runs the prepare step's own query check (issue 13, query sandbox) ----------------------

def _with_queries(query: str, replay: str | None = None) -> str:
    import yaml

    raw = yaml.safe_load(GOOD)
    raw["dataset"]["query"] = query
    if replay is not None:
        raw["dataset"]["replay"] = {"query": replay, "ratio": 1.0}
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.fixture
def digits_hub(tmp_path: Path) -> Path:
    import pyarrow as pa

    from arf_trainer.datahub.tables import write_table

    write_table(tmp_path / "hub", "digits", pa.table({"pixel_0": [0.0], "label": [1]}))
    return tmp_path / "hub"


@pytest.mark.parametrize(("query", "fragment"), [
    pytest.param("SELECT * FROM read_csv('/etc/passwd')", "reads FROM read_csv()", id="read_csv"),
    pytest.param("SELECT current_setting('temp_directory') AS d, * FROM digits",
                 "calls current_setting()", id="current_setting"),
    pytest.param("FROM duckdb_settings()", "reads FROM duckdb_settings()", id="duckdb_settings"),
    pytest.param("SELECT * FROM digitz", "references 'digitz', which is not a table of the "
                 "data hub; tables available: digits", id="unknown-table"),
    pytest.param("SELECT * FROM digits WHERE label = $label",
                 "uses parameter(s) $label, which the run does not provide",
                 id="unknown-parameter"),
])
def test_lint_refuses_what_prepare_would_refuse(tmp_path, digits_hub, capsys, query, fragment):
    from arf_trainer.datahub.query import run_query
    from arf_trainer.errors import QueryError
    from arf_training.cli_templates import _lint

    path = tmp_path / "t.yaml"
    path.write_text(_with_queries(query, replay=query))
    assert _lint([str(path)], str(digits_hub)) == 2
    out = capsys.readouterr().out
    # Both queries, each named, with the message the prepare step gives for the same query.
    assert f"dataset.query {fragment}" in out and f"dataset.replay.query {fragment}" in out
    assert "0 valid, 1 invalid" in out
    query = parse_template(path.read_text()).dataset.query  # macros rewritten, as prepare sees it
    with pytest.raises(QueryError, match=re.escape(fragment)):
        run_query(digits_hub, query)


def test_lint_checks_pinned_tables_and_versions_like_prepare(tmp_path, digits_hub, capsys):
    from arf_training.cli_templates import _lint

    text = _with_queries("SELECT * FROM digits").replace(
        "  allow_query_override: true",
        "  allow_query_override: true\n  tables: {digits: 7, nope: 0}")
    path = tmp_path / "t.yaml"
    path.write_text(text)
    assert _lint([str(path)], str(digits_hub)) == 2
    out = capsys.readouterr().out
    assert "dataset.tables: data hub table 'digits' has no version 7; versions available: 0" in out
    assert "'nope' (version 0)" in out and "0 valid, 1 invalid" in out


def test_lint_says_when_it_cannot_check_table_names(tmp_path, digits_hub, capsys):
    from arf_training.cli_templates import _lint

    path = tmp_path / "t.yaml"
    path.write_text(_with_queries("SELECT * FROM digitz"))
    assert _lint([str(path)], str(tmp_path / "none")) == 0
    assert f"no data hub tables at {tmp_path / 'none'}: query table names not checked" \
        in capsys.readouterr().out
    arf = Path(sys.executable).parent / "arf"
    with_hub = subprocess.run([str(arf), "templates", "lint", "--hub", str(digits_hub),
                               str(path)], capture_output=True, text=True)
    assert with_hub.returncode == 2
    assert "query table names checked against digits" in with_hub.stdout
    assert "'digitz', which is not a table of the data hub" in with_hub.stdout


def test_oversized_query_is_a_template_error_before_any_parsing():
    from arf_trainer.datahub import sqlcheck
    from arf_training import templates

    assert templates.MAX_QUERY_CHARS == sqlcheck.MAX_QUERY_CHARS  # one limit on both sides
    with pytest.raises(TemplateError) as info:
        parse_template(_with_queries("SELECT 1 AS a, " + "2 AS b, " * 5000 + "3 AS c"))
    message = str(info.value)
    assert "dataset.query" in message and "over the limit of 32,768" in message
    assert len(message) < 1000  # a short prefix of the query, not all 40 000 characters
    with pytest.raises(TemplateError, match="dataset.replay.query is 40,0"):
        parse_template(_with_queries("SELECT 1", replay="SELECT 1 AS a, " + "2 AS b, " * 5000))


def test_both_sides_agree_on_the_recipes_hyperparameters():
    """The Airflow side may not import the container's package: the names are written twice."""
    import arf_trainer.trainer.recipes_vision  # noqa: F401 (registers bc_pixels)
    from arf_trainer.trainer.recipes import RECIPES, Hyperparameters

    from arf_training.template_sections import RECIPE_HYPERPARAMETERS, RECIPE_REQUIRED

    assert set(RECIPE_HYPERPARAMETERS) == set(RECIPES)
    assert all(names == set(Hyperparameters.accepted(recipe))
               for recipe, names in RECIPE_HYPERPARAMETERS.items())
    assert RECIPE_REQUIRED == Hyperparameters.REQUIRED
