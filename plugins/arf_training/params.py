"""Template hyperparameters as Airflow Params, and validation of a trigger conf against them.

Airflow checks types and bounds of Params when a run is created from the UI or the REST API, but
it lets unknown conf keys through, and `airflow dags test -c` or a scheduled run may bypass the
form. `resolve_conf` is the single check every step (and the CLI) runs before doing anything.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from arf_training.errors import ConfError
from arf_training.limits import quote
from arf_training.templates import MAX_QUERY_CHARS

if TYPE_CHECKING:  # the CLI and gRPC server check confs without loading the template models
    from arf_training.templates import TrainingTemplate

SECTION_TRAINING = "Training"
SECTION_DATA = "Data"
# A template with a `nightly:` section: the night's recipe. The container side spells the same
# names (arf_trainer.nightly.policy: CONF_KEY, RECIPES), which this side may not import.
NIGHTLY_PARAM = "nightly_recipe"
NIGHTLY_RECIPES = ("auto", "fine-tune", "retrain")
MAX_PROBLEMS = 10
"""Problems one invalid conf reports (the rest are counted)."""
_MAX_FLOAT = 1.7976931348623157e308
# JSON Schema has no "finite" keyword, and every bound check passes for NaN (`nan < x` and
# `nan > x` are both false), so a "number" Param alone lets NaN and infinities through Airflow's
# validation (UI, REST API). Each alternative below matches only what must be refused, and "not"
# refuses it: NaN is the only number that passes exclusiveMinimum 0 and exclusiveMaximum 0 at once
# (validators refuse x <= 0 and x >= 0, both false for NaN); +inf the only one above the largest
# float, -inf the only one below its negative.
NOT_FINITE = {"anyOf": [
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0},
    {"type": "number", "exclusiveMinimum": _MAX_FLOAT},
    {"type": "number", "exclusiveMaximum": -_MAX_FLOAT},
]}


def param_schemas(template: TrainingTemplate) -> dict[str, dict[str, Any]]:
    """JSON-schema fragments (plus UI hints) of every Param, keyed by Param name."""
    schemas: dict[str, dict[str, Any]] = {}
    for name, hp in template.training.hyperparameters.items():
        schema: dict[str, Any] = {"type": hp.type, "title": name, "default": hp.default,
                                  "description": hp.description or None,
                                  "section": SECTION_TRAINING}
        for key in ("minimum", "maximum", "enum"):
            value = getattr(hp, key, None)
            if value is not None:
                schema[key] = value
        if hp.type == "number":
            schema["not"] = NOT_FINITE
        schema["title"] = _title(name, schema)
        schemas[name] = schema
    max_seed = template.training.max_seed  # the trainer's range: a bigger seed fails train
    schemas["seed"] = {"type": "integer", "minimum": 0, "maximum": max_seed,
                       "title": "seed (≥ 0)",
                       "default": template.training.seed, "section": SECTION_TRAINING,
                       "description": "Seed of every random number generator (reproducibility)."}
    if template.nightly is not None:
        schemas[NIGHTLY_PARAM] = {
            "type": "string", "title": NIGHTLY_PARAM, "default": "auto",
            "enum": list(NIGHTLY_RECIPES), "section": SECTION_TRAINING,
            "description": "auto: the template's nightly rule chooses (the choose_recipe task); "
                           "fine-tune or retrain: this run does that.",
        }
    if template.dataset.allow_query_override:
        schemas["dataset_query"] = {
            "type": "string", "title": "dataset_query", "default": template.dataset.query.strip(),
            # prepare's cap (arf_trainer.datahub.sqlcheck): the form and the REST API refuse a
            # longer query at trigger time instead of a failed prepare_data.
            "maxLength": MAX_QUERY_CHARS,
            "format": "multiline", "section": SECTION_DATA,
            "description": "SQL SELECT over the data hub that replaces the template's query.",
        }
    return schemas


def _title(name: str, schema: dict[str, Any]) -> str:
    """The form label: the Param name (what `--set` and the REST API use) plus its bounds, which
    the UI's number inputs enforce but do not show."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if "enum" in schema or (lo is None and hi is None):
        return name
    if lo is not None and hi is not None:
        return f"{name} ({lo:g} – {hi:g})"
    return f"{name} (≥ {lo:g})" if lo is not None else f"{name} (≤ {hi:g})"


def build_params(template: TrainingTemplate) -> dict[str, Any]:
    """Airflow `Param`s for the DAG: the trigger form shows typed fields with descriptions."""
    from airflow.sdk import Param

    params = {}
    for name, schema in param_schemas(template).items():
        schema = {k: v for k, v in schema.items() if v is not None}
        default, description = schema.pop("default"), schema.pop("description", None)
        params[name] = Param(default, description=description, **schema)
    return params


def _describe(name: str, schema: dict[str, Any]) -> str:
    bits = [f"type {schema['type']}"]
    if "minimum" in schema:
        bits.append(f"minimum {schema['minimum']}")
    if "maximum" in schema:
        bits.append(f"maximum {schema['maximum']}")
    if "enum" in schema:
        bits.append(f"one of {schema['enum']}")
    desc = f" — {schema['description']}" if schema.get("description") else ""
    return f"{name} ({', '.join(bits)}){desc}"


def _check_value(name: str, value: Any, schema: dict[str, Any]) -> str | None:
    kind = schema["type"]
    # bool is an int in Python; JSON Schema keeps them apart, and so do we.
    ok = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
    }.get(kind, True)  # other JSON types (object, array) are left to Airflow
    if not ok:
        return f"{name!r} must be of type {kind}, got {quote(value)} ({type(value).__name__})"
    if kind == "number" and isinstance(value, float) and not math.isfinite(value):
        return f"{name!r} must be a finite number, got {value!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{name!r} must be one of {schema['enum']}, got {quote(value)}"
    if "minimum" in schema and value < schema["minimum"]:
        return f"{name!r} = {quote(value)} is below its minimum {schema['minimum']}"
    if "maximum" in schema and value > schema["maximum"]:
        return f"{name!r} = {quote(value)} is above its maximum {schema['maximum']}"
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return (f"{name!r} is {len(value):,} characters long, over its limit of "
                f"{schema['maxLength']:,}: {quote(value)}")
    return None


def parse_value(name: str, text: str, schema: dict[str, Any] | None) -> Any:
    """A `--set name=text` value (CLI, gRPC) converted to its Param's type.

    Unknown names are returned as given; `check_conf` reports them with the accepted names.
    """
    if schema is None:
        return text
    kind = schema.get("type")
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            value = float(text)
            if not math.isfinite(value):  # float() reads "nan", "inf", "-Infinity", "1e999"
                raise ConfError(f"{name}={quote(text)} is not a finite number. Expected "
                                f"{_describe(name, schema)}")
            return value
        if kind == "boolean":
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
    except ValueError:
        raise ConfError(f"{name}={quote(text)} is not a valid {kind}. Expected "
                        f"{_describe(name, schema)}") from None
    return text


def check_conf(template_name: str, schemas: dict[str, dict[str, Any]],
               conf: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a conf against Param schemas (`param_schemas`, or the same Params as a running
    Airflow serves them: `schemas_from_airflow`) and return every value, defaults filled in."""
    conf = dict(conf or {})
    problems = []
    for key in sorted(set(conf) - set(schemas)):
        problems.append(f"unknown parameter {quote(key)}; template {template_name!r} accepts: "
                        f"{', '.join(sorted(schemas))}")
    values = {}
    for name, schema in schemas.items():
        value = conf.get(name, schema["default"])
        if schema["type"] == "integer" and isinstance(value, float) and value.is_integer():
            # JSON Schema, and so Airflow's check of the UI form and REST API, counts 3.0 as an
            # integer: accept it as Airflow did, and hand the steps the int.
            value = int(value)
        problem = _check_value(name, value, schema)
        if problem:
            problems.append(f"{problem}. Expected {_describe(name, schema)}")
        values[name] = value
    if problems:  # the first few: a conf of 10,000 unknown keys must not echo megabytes
        more = [f"... and {len(problems) - MAX_PROBLEMS} more"] * (len(problems) > MAX_PROBLEMS)
        raise ConfError(f"invalid trigger conf for {template_name!r}:\n  - "
                        + "\n  - ".join(problems[:MAX_PROBLEMS] + more))
    return values


def resolve_conf(template: TrainingTemplate, conf: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a trigger conf and return every Param's value (defaults filled in).

    Raises `ConfError` naming each bad parameter, its type, bounds and description.
    """
    return check_conf(template.name, param_schemas(template), conf)


def schemas_from_airflow(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `param_schemas` shape of a DAG's Params as the REST API serves them
    (`GET /api/v2/dags/{dag_id}/details` -> `params`: {name: {value, schema, description}}).

    This is how a client that has no template files (the CLI on a laptop, the gRPC service)
    checks a conf before submitting it: against the deployed DAG's own Params.
    """
    schemas: dict[str, dict[str, Any]] = {}
    for name, raw in (params or {}).items():
        raw = raw if isinstance(raw, dict) else {"value": raw}
        schema = dict(raw.get("schema") or {})
        kind = schema.get("type")
        if isinstance(kind, list):  # ["null", "string"]: the first non-null type
            kind = next((k for k in kind if k != "null"), "string")
        schema["type"] = kind or "string"
        schema["default"] = raw.get("value")
        schema["description"] = raw.get("description") or schema.get("description")
        schemas[name] = schema
    return schemas
