"""Template hyperparameters as Airflow Params, and validation of a trigger conf against them.

Airflow checks types and bounds of Params when a run is created from the UI or the REST API, but
it lets unknown conf keys through, and `airflow dags test -c` or a scheduled run may bypass the
form. `resolve_conf` is the single check every step (and the CLI) runs before doing anything.
"""

from __future__ import annotations

from typing import Any

from arf_training.errors import ConfError
from arf_training.templates import TrainingTemplate

SECTION_TRAINING = "Training"
SECTION_DATA = "Data"


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
        schemas[name] = schema
    schemas["seed"] = {"type": "integer", "minimum": 0, "title": "seed",
                       "default": template.training.seed, "section": SECTION_TRAINING,
                       "description": "Seed of every random number generator (reproducibility)."}
    if template.dataset.allow_query_override:
        schemas["dataset_query"] = {
            "type": "string", "title": "dataset_query", "default": template.dataset.query.strip(),
            "format": "multiline", "section": SECTION_DATA,
            "description": "SQL SELECT over the data hub that replaces the template's query.",
        }
    return schemas


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
    }[kind]
    if not ok:
        return f"{name!r} must be of type {kind}, got {value!r} ({type(value).__name__})"
    if "enum" in schema and value not in schema["enum"]:
        return f"{name!r} must be one of {schema['enum']}, got {value!r}"
    if "minimum" in schema and value < schema["minimum"]:
        return f"{name!r} = {value!r} is below its minimum {schema['minimum']}"
    if "maximum" in schema and value > schema["maximum"]:
        return f"{name!r} = {value!r} is above its maximum {schema['maximum']}"
    return None


def resolve_conf(template: TrainingTemplate, conf: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a trigger conf and return every Param's value (defaults filled in).

    Raises `ConfError` naming each bad parameter, its type, bounds and description.
    """
    conf = dict(conf or {})
    schemas = param_schemas(template)
    problems = []
    for key in sorted(set(conf) - set(schemas)):
        problems.append(f"unknown parameter {key!r}; template {template.name!r} accepts: "
                        f"{', '.join(sorted(schemas))}")
    values = {}
    for name, schema in schemas.items():
        value = conf.get(name, schema["default"])
        problem = _check_value(name, value, schema)
        if problem:
            problems.append(f"{problem}. Expected {_describe(name, schema)}")
        values[name] = value
    if problems:
        raise ConfError(f"invalid trigger conf for {template.name!r}:\n  - " + "\n  - ".join(problems))
    return values
