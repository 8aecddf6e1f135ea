"""Training template schema v1: the only schema of `config_templates/*.yaml`.

One pydantic v2 model per YAML section, `extra="forbid"`, frozen (template_sections.py,
template_hpo.py, template_federated.py, ...); `TrainingTemplate` here puts them together and
checks how they fit each other. The JSON Schema for editors
(`arf templates schema`) is exported from these models. Loading reports every problem of a file
with its line, field path, the value received and how to fix it (`TemplateError`).

Only pydantic and PyYAML are imported here: this module runs on every DAG parse.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from arf_training.errors import TemplateError, TemplateIssue
from arf_training.nightly_recipe import Nightly, nightly_problems
from arf_training.template_dataset import camera_problems, pixel_recipe_problems
from arf_training.template_federated import Federated, check_federated
from arf_training.template_hpo import (CategoricalSearch, FloatSearch, Hpo, IntSearch,
                                       _hp_value_problem)
# Re-exported: the rest of the package (and users' code) import these from here.
from arf_training.template_query import (  # noqa: F401
    MAX_QUERY_CHARS, QUERY_MACROS, _check_query_size, _check_single_select, rewrite_query_macros,
    uses_data_interval)
from arf_training.template_sections import (  # noqa: F401
    RECIPE_HYPERPARAMETERS, RESERVED_PARAMS, BooleanHyperparameter, CustomCommand, Dataset,
    Distributed, Evaluation, IntegerHyperparameter, Metadata, Model, NumberHyperparameter,
    Replay, Resources, StringHyperparameter, Training, _Section)
from arf_training.template_yaml import (MAX_TEMPLATE_BYTES, decode_template, node_at,
                                        read_yaml)

API_VERSION = "arf.dev/v1"
KIND = "TrainingTemplate"

SCHEDULE_PRESETS = ("@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")


class TrainingTemplate(_Section):
    """A training template: one YAML file, one Airflow DAG."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: Literal["arf.dev/v1"] = Field(alias="apiVersion", description="Schema version.")
    kind: Literal["TrainingTemplate"] = Field(description="Always TrainingTemplate.")
    metadata: Metadata
    schedule: str | None = Field(
        None, description="None (manual/API only), a preset such as @daily, or a cron expression.")
    start_date: date = Field(date(2025, 1, 1), description="First logical date for scheduled runs.")
    max_active_runs: int = Field(1, ge=1, le=64, description="Concurrent runs of this DAG.")
    dataset: Dataset
    model: Model
    training: Training
    evaluation: Evaluation | None = Field(None, description="Evaluate each registered version.")
    hpo: Hpo | None = Field(None, description="Search hyperparameters before the final training.")
    nightly: Nightly | None = Field(None, description="Per night: fine-tune or retrain on the "
                                    "aggregate, within a compute budget (nightly_recipe.py).")
    federated: Federated | None = Field(
        None, description="Train across sites whose data stays at each site (Flower).")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is None or value in SCHEDULE_PRESETS:
            return value
        if value.startswith("@"):
            raise ValueError(f"unknown preset {value!r}; use one of {', '.join(SCHEDULE_PRESETS)}")
        from croniter import croniter  # an Airflow dependency; only loaded for cron schedules

        fields = len(value.split())
        if fields != 5:
            # croniter reads a 6th field as seconds (and a 7th as the year): '* * * * * *'
            # would start the whole pipeline every second.
            raise ValueError(
                f"{value!r} has {fields} fields; write the 5 standard ones (minute hour "
                "day-of-month month day-of-week), e.g. '0 2 * * *': a 6th would be seconds")
        if not croniter.is_valid(value):
            raise ValueError(
                f"{value!r} is not a valid cron expression; write 5 fields, e.g. '0 2 * * *'"
            )
        return value

    @model_validator(mode="after")
    def _fine_tune_fits(self) -> "TrainingTemplate":
        problems = nightly_problems(self) + camera_problems(self) + pixel_recipe_problems(self)
        queries = [("dataset.query", self.dataset.query)]
        if self.dataset.replay is not None:
            queries.append(("dataset.replay.query", self.dataset.replay.query))
        for where, query in queries:
            if uses_data_interval(query) and self.schedule in (None, "@once"):
                problems.append(
                    f"{where} reads the run's data interval, but schedule is "
                    f"{self.schedule!r}: such runs have no interval to select. Set a schedule, "
                    "e.g. '0 2 * * *' (each run reads the period since the previous one)")
        if self.training.freeze_layers and self.model.base_model is None:
            problems.append(
                f"training.freeze_layers is {self.training.freeze_layers}, but model.base_model "
                "is not set: freezing freshly initialised layers trains nothing useful; set "
                "base_model (e.g. models:/reach_bc_policy@champion) or freeze_layers: 0")
        if self.training.freeze_layers and self.training.recipe is None:
            problems.append("training.freeze_layers needs a built-in training.recipe; a custom "
                            "command decides itself what to train")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def uses_data_interval(self) -> bool:
        """Whether the dataset query (or its replay) reads the run's data interval."""
        replay = self.dataset.replay
        return uses_data_interval(self.dataset.query) or (
            replay is not None and uses_data_interval(replay.query))

    @model_validator(mode="after")
    def _federated_fits(self) -> "TrainingTemplate":
        check_federated(self)
        return self

    @model_validator(mode="after")
    def _hpo_fits_training(self) -> "TrainingTemplate":
        if self.hpo is None:
            return self
        training, problems = self.training, []
        if training.recipe is None:
            problems.append("hpo needs a built-in training.recipe: trials report per-epoch "
                            "metrics and are pruned by arf-trainer; remove hpo or use a recipe")
        hps = training.hyperparameters
        for name, dim in self.hpo.search_space.items():
            where = f"hpo.search_space.{name}"
            hp = hps.get(name)
            if hp is None:
                problems.append(f"{where}: {name!r} is not a hyperparameter of this template; "
                                f"searchable names: {sorted(hps)}")
                continue
            if name == "epochs":
                problems.append(f"{where}: epochs is the per-trial budget (hpo.budget.epochs), "
                                "not a search dimension; remove it from search_space")
                continue
            values = dim.choices if isinstance(dim, CategoricalSearch) else [dim.low, dim.high]
            want = {"integer": IntSearch, "number": FloatSearch}.get(hp.type)
            if not isinstance(dim, CategoricalSearch) and not isinstance(dim, want or ()):
                kind = {"integer": "int", "number": "float"}.get(hp.type, "categorical")
                problems.append(f"{where}: type {dim.type!r} does not fit the {hp.type} "
                                f"hyperparameter {name!r}; use type: {kind}")
                continue
            for value in values:
                problem = _hp_value_problem(hp, value)
                if problem:
                    problems.append(f"{where}: {problem}")
                    break
        if "epochs" not in hps and training.recipe is not None:
            problems.append("hpo.budget.epochs: the template has no 'epochs' hyperparameter for "
                            "the budget to replace; declare it in training.hyperparameters")
        if self.hpo.metric.startswith("val_") and self.dataset.validation_split <= 0:
            problems.append(f"hpo.metric: {self.hpo.metric!r} needs validation data, but "
                            "dataset.validation_split is 0; raise it or use train_loss")
        if self.hpo.metric == "val_accuracy" and training.recipe != "classifier":
            problems.append(f"hpo.metric: 'val_accuracy' is reported by the classifier recipe "
                            f"only (recipe is {training.recipe!r}); use val_loss")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def model_asset_uri(self) -> str:
        return f"arf-model://{self.model.name}"


@dataclass(frozen=True)
class LoadedTemplate:
    """A validated template with where it came from (for lineage and error messages)."""

    template: TrainingTemplate
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.template.name


# Tags of discriminated unions (hyperparameter and search-dimension types): not YAML keys.
_UNION_TAGS = ("integer", "number", "string", "boolean", "float", "int", "categorical")


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed where an unknown key was found (walks the models along loc)."""
    model: Any = TrainingTemplate
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return []
        field = fields.get(str(part)) or next(
            (f for f in fields.values() if f.alias == part), None)
        if field is None:
            # A dict key (hyperparameter name) or union tag: pick the model by the tag.
            tag_model = {"integer": IntegerHyperparameter, "number": NumberHyperparameter,
                         "string": StringHyperparameter, "boolean": BooleanHyperparameter,
                         "float": FloatSearch, "int": IntSearch,
                         "categorical": CategoricalSearch}
            if part in tag_model:
                model = tag_model[part]
            continue
        ann = field.annotation
        options = (ann,) if get_origin(ann) is dict else getattr(ann, "__args__", (ann,))
        # A dict of sections (dataset.decode.<column>): the next key is a name, then its value.
        options = tuple(get_args(a)[-1] if get_origin(a) is dict else a for a in options)
        candidates = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if candidates:
            model = candidates[0]
    fields = getattr(model, "model_fields", {})
    return sorted(f.alias or n for n, f in fields.items())


def _issues_from_validation(path: str, root: yaml.Node | None,
                            exc: ValidationError) -> list[TemplateIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # Drop discriminator tags (e.g. 'integer') from the displayed path.
        shown = [str(p) for p in loc if p not in _UNION_TAGS or loc.index(p) == 0]
        field = ".".join(shown)
        node, _ = node_at(root, loc)
        line = node.start_mark.line + 1 if node is not None and node is not root else None
        kind, value = err["type"], err.get("input")
        if kind == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = f"unknown key {loc[-1]!r}" + (f"; allowed keys here: {', '.join(allowed)}"
                                                 if allowed else "") + ". Check the spelling."
        elif kind == "missing":
            msg = "required field is missing; add it"
        else:
            text_msg = err["msg"].removeprefix("Value error, ")
            shown_value = repr(value) if not isinstance(value, (dict, list)) else None
            msg = text_msg + (f" (got {shown_value})" if shown_value and shown_value not in text_msg
                              else "")
        issues.append(TemplateIssue(file=path, field=field, message=msg, line=line))
    return issues


def parse_template(text: str, path: str = "<string>") -> TrainingTemplate:
    """Validate one template's YAML text. Raises `TemplateError` listing every issue."""
    document = read_yaml(text, path)  # syntax errors and duplicate keys, with their lines
    data = document.data
    if not isinstance(data, dict):
        raise TemplateError([TemplateIssue(
            file=path, message=f"expected a mapping with apiVersion, kind, metadata, ...; got "
                               f"{type(data).__name__}")])
    if data.get("apiVersion") not in (None, API_VERSION):
        raise TemplateError([TemplateIssue(
            file=path, field="apiVersion", line=1,
            message=f"unsupported apiVersion {data.get('apiVersion')!r}; this arf-training "
                    f"reads {API_VERSION!r}")])
    try:
        return TrainingTemplate.model_validate(data)
    except ValidationError as exc:
        raise TemplateError(_issues_from_validation(path, document.root, exc)) from exc


# Both DAG files load the same templates; within one process (a DagBag, `airflow dags test`)
# the second load is a dictionary hit. Keyed on content, so an edited file is always re-read.
_CACHE: dict[tuple[str, str], LoadedTemplate | TemplateError] = {}


def load_template(path: Path) -> LoadedTemplate:
    with open(path, "rb") as file:
        raw = file.read(MAX_TEMPLATE_BYTES + 1)
    digest = hashlib.sha256(raw).hexdigest()
    key = (str(path), digest)
    cached = _CACHE.get(key)
    if cached is None:
        try:
            text = decode_template(raw, str(path))
            cached = LoadedTemplate(template=parse_template(text, str(path)), path=path,
                                    sha256=digest)
        except TemplateError as exc:
            cached = exc
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = cached
    if isinstance(cached, TemplateError):
        raise TemplateError(cached.issues)
    return cached


def template_files(folder: Path) -> list[Path]:
    """The folder's *.yaml/*.yml files, by name. (scandir knows the file type without a stat
    per file, and names sort far faster than Paths: this runs on every DAG parse.)

    A broken symlink (dangling, or a loop) is listed too, so that loading reports it instead
    of the template vanishing; a folder, FIFO or device is not (reading a FIFO would block)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries
                       if os.path.splitext(e.name)[1] in (".yaml", ".yml")
                       and (e.is_file() or (e.is_symlink() and not os.path.exists(e.path))))
    return [folder / name for name in names]


def load_folder(paths: list[Path]) -> tuple[list[LoadedTemplate], list[TemplateIssue]]:
    """Load every template; a broken one never hides the others.

    Returns the valid templates (in path order) and the issues of the invalid ones. Templates
    that share a name are all rejected: which one would win depends on file order, so neither
    is built until one is renamed.
    """
    good: list[LoadedTemplate] = []
    issues: list[TemplateIssue] = []
    dupes_early: set[Path] = set()
    for path in paths:
        try:
            good.append(load_template(path))
        except TemplateError as exc:
            issues.extend(exc.issues)
        except OSError as exc:
            issues.append(TemplateIssue(file=str(path), message=f"cannot read file: {exc}"))
    by_name: dict[str, list[LoadedTemplate]] = {}
    for loaded in good:
        by_name.setdefault(loaded.name, []).append(loaded)
    # Model names must be unique too: two DAGs registering one model would interleave versions.
    # Except for fine-tunes of that model (base_model models:/<name>...): they register
    # candidates under the same name on purpose, so that arf_evaluate's promotion gate compares
    # them with the champion. At most one template per name may train it from scratch.
    by_model: dict[str, list[LoadedTemplate]] = {}
    for loaded in good:
        if not fine_tunes_own_model(loaded.template):
            by_model.setdefault(loaded.template.model.name, []).append(loaded)
    for loaded in good:
        if fine_tunes_own_model(loaded.template):
            owners = by_model.get(loaded.template.model.name, [])
            problem = _evaluation_mismatch(loaded, owners)
            if problem:
                issues.append(problem)
                dupes_early.add(loaded.path)
    dupes: set[Path] = set(dupes_early)
    for key, label, groups in (("metadata.name", "name", by_name),
                               ("model.name", "model name", by_model)):
        for value, group in groups.items():
            if len(group) > 1:
                files = ", ".join(str(g.path) for g in group)
                for g in group:
                    dupes.add(g.path)
                    issues.append(TemplateIssue(
                        file=str(g.path), field=key,
                        message=f"duplicate {label} {value!r} (also in: {files}); "
                                "every template needs its own; rename all but one"))
    return [g for g in good if g.path not in dupes], issues


def fine_tunes_own_model(template: TrainingTemplate) -> bool:
    """True when the template starts from a version of the model it registers (a fine-tune)."""
    base = template.model.base_model
    if base is None:
        return False
    name = re.split(r"[/@]", base.removeprefix("models:/"), maxsplit=1)[0]
    return name == template.model.name


def _evaluation_mismatch(loaded: LoadedTemplate,
                         owners: list[LoadedTemplate]) -> TemplateIssue | None:
    """A fine-tune must evaluate its candidates like the template that trains the model from
    scratch: the promotion gate compares versions on the same seeds."""
    mine = loaded.template.evaluation
    for owner in owners:
        theirs = owner.template.evaluation
        if mine is not None and theirs is not None and mine != theirs:
            return TemplateIssue(
                file=str(loaded.path), field="evaluation",
                message=f"differs from the evaluation section of {owner.path} ({owner.name!r}), "
                        f"which registers the same model {loaded.template.model.name!r}: "
                        "arf_evaluate scores every version of a model the same way (the "
                        f"promotion gate pairs them by seed). Copy {owner.name!r}'s evaluation "
                        "section, or remove this one")
    return None


def json_schema() -> dict[str, Any]:
    """JSON Schema of the template file, for editors (yaml-language-server) and CI checks."""
    schema = TrainingTemplate.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ARF training template (arf.dev/v1)"
    return schema
