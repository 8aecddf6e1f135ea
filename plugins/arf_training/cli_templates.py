"""`arf templates lint | schema | list | render`: validate and inspect training templates.

    arf templates lint [PATH ...] [--hub HUB]   every problem of every file, with its line
    arf templates schema [-o FILE]              JSON Schema of the template format, for editors
    arf templates list                          the valid templates and their DAGs
    arf templates render NAME [--step S]        the Kubernetes manifests of its steps
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from arf_training.errors import TemplateError


def add_parsers(tsub: argparse._SubParsersAction) -> None:
    """Add the subcommands to `arf templates`."""
    lint = tsub.add_parser("lint", help="validate template files")
    lint.add_argument("paths", nargs="*", help="files or folders (default: the templates folder)")
    lint.add_argument("--hub", help="data hub folder whose table names the queries may use "
                                    "(default: ARF_DATAHUB_URI, else the embedded hub)")
    schema = tsub.add_parser("schema", help="print the JSON Schema of templates")
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")
    tsub.add_parser("list", help="list the valid templates")
    render = tsub.add_parser("render", help="print the Kubernetes manifests of a template's "
                                            "steps as YAML documents (settings from ARF_K8S_*)")
    render.add_argument("name", help="template name (metadata.name)")
    render.add_argument("--backend", choices=["kubernetes"], default="kubernetes",
                        help="backend whose manifests to render (default kubernetes)")
    render.add_argument("--step", action="append", choices=["prepare", "train", "register",
                                                             "evaluate", "federate"],
                        help="render only this step (repeatable; default: every step)")


def run(args: argparse.Namespace) -> int:
    if args.sub == "lint":
        return _lint(args.paths, args.hub)
    if args.sub == "list":
        return _list()
    if args.sub == "render":
        return _render(args.name, args.backend, args.step)
    from arf_training.templates import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        try:
            Path(args.output).write_text(text + "\n")
        except OSError as exc:
            print(f"arf templates schema: error: -o {args.output}: {exc.strerror or exc}; give "
                  "a file path in an existing folder you can write", file=sys.stderr)
            return 2
    else:
        print(text)
    return 0


def _lint(paths: list[str], hub: str | None = None) -> int:
    from arf_training.settings import ArfSettings, templates_dir
    from arf_training.templates import load_folder, template_files

    files: list[Path] = []
    for raw in paths or [str(templates_dir())]:
        path = Path(raw)
        if path.is_dir():
            files.extend(template_files(path))
        elif path.exists():
            files.append(path)
        else:
            print(f"arf templates lint: {raw}: no such file or folder", file=sys.stderr)
            return 2
    good, issues = load_folder(files)
    query_issues = _lint_queries(good, hub or ArfSettings.from_env().datahub_uri)
    for loaded in good:
        if loaded.path not in query_issues:
            print(f"ok     {loaded.path}  ({loaded.name} -> model {loaded.template.model.name})")
    for issue in issues:
        print(f"error  {issue}")
    for path, messages in query_issues.items():
        for message in messages:
            print(f"error  {path}: {message}")
    invalid = {str(i.file) for i in issues} | {str(p) for p in query_issues}
    print(f"{len(good) - len(query_issues)} valid, {len(invalid)} invalid")
    return 2 if invalid else 0


def _lint_queries(good: list, hub_uri: str) -> dict[Path, list[str]]:
    """The prepare step's own static query check (arf_trainer.datahub.sqlcheck) over each
    template's queries, with the hub's table names when the hub is a local folder; there, also
    prepare's column checks on the queries' zero-row results (`_lint_columns`)."""
    import importlib
    import tempfile

    try:  # the container side's checks: lint is a command, not DAG parsing, so import them here
        for module in ("sqlcheck", "tables", "columns", "decode", "stream"):
            importlib.import_module(f"arf_trainer.datahub.{module}")
    except ImportError as exc:
        print(f"note   queries not checked with DuckDB's parser ({exc}); install the trainer "
              "extra: pip install -e '.[trainer]'")
        return {}
    from arf_trainer.datahub.tables import list_tables

    hub = Path(hub_uri.removeprefix("file://"))
    tables = list_tables(hub) if "://" not in str(hub) else []
    if tables:
        print(f"note   data hub {hub}: query table names checked against {', '.join(tables)}; "
              "result columns checked as prepare checks them, on each query's zero-row result")
    else:
        print(f"note   no data hub tables at {hub_uri}: query table names not checked (seed it "
              "with `arf datahub seed`, or pass --hub / set ARF_DATAHUB_URI)")
    found: dict[Path, list[str]] = {}
    # DuckDB's spill folder, as prepare gives it one (nothing spills at LIMIT 0).
    with tempfile.TemporaryDirectory(prefix="arf-lint-") as spill:
        for loaded in good:
            problems = _lint_static(loaded.template.dataset, hub, tables)
            # Only over queries that passed: a failed one would report the same problem again.
            if tables and not problems:
                problems = _lint_columns(loaded.template, hub, Path(spill))
            if problems:
                found[loaded.path] = problems
    return found


def _lint_static(dataset: Any, hub: Path, tables: list[str]) -> list[str]:
    """The static check of the queries (with the hub's table names, if any), and every pinned
    table version opened (with tables)."""
    from arf_trainer.datahub.sqlcheck import check_query
    from arf_trainer.datahub.tables import open_table
    from arf_trainer.errors import DataHubError, QueryError

    from arf_training.templates import QUERY_MACROS

    problems: list[str] = []
    queries = [("dataset.query", dataset.query)]
    if dataset.replay is not None:
        queries.append(("dataset.replay.query", dataset.replay.query))
    for what, query in queries:
        try:
            check_query(query, tables or None, what=what, parameters=QUERY_MACROS)
        except QueryError as exc:
            problems.append(str(exc))
    for name, version in dataset.tables.items() if tables else ():
        try:  # prepare opens every pin, used or not: a typo must not pass silently
            open_table(hub, name, version)
        except DataHubError as exc:
            problems.append(f"dataset.tables: {exc}")
    return problems


# The lint's bound on each zero-row query: LIMIT 0 reads no row, but DuckDB folds constant
# expressions while it plans, and a query whose planning alone runs this long is worth a line.
LINT_QUERY_TIMEOUT_S = 30.0


def _lint_columns(template: Any, hub: Path, spill: Path) -> list[str]:
    """Prepare's checks of a template's result columns (`arf_trainer.datahub.columns`: decode
    types, features, targets, split_by, order_by, the replay query's columns), run on each
    query's zero-row result (`QuerySource.schema`, LIMIT 0); one line per problem, naming its
    field. A query that fails to run is one such line, not an exception."""
    from arf_trainer.datahub.columns import (check_order_by, check_replay_columns, check_result,
                                             check_scalar_keys)
    from arf_trainer.datahub.decode import Decoders
    from arf_trainer.errors import DataHubError, QueryError, SpecError

    errors = (SpecError, DataHubError, QueryError)
    # The job spec's dataset section, dumped with stepspec.build_step_spec's options: the dict
    # prepare reads as env.spec.dataset. Only this section: the whole template's dump warns
    # about an integer `resources.cpu` (pydantic's serializer), noise in a lint's output.
    dataset = template.dataset.model_dump(mode="json", by_alias=True)
    order_by, replay = dataset.get("order_by") or None, dataset.get("replay")
    try:
        schema = _zero_row_schema(hub, "dataset.query", dataset["query"], dataset, spill)
    except errors as exc:
        return [_lint_line("dataset.query", exc)]
    problems: list[str] = []
    decoders = None
    try:  # as prepare's _streams and _streamed: the decoders, then the columns as decoded
        decoders = Decoders(dataset.get("decode"), order_by, hub)
        check_result(dataset, schema, decoders)
    except errors as exc:
        problems.append(_lint_line("dataset.features", exc))
    finally:
        if decoders is not None:
            decoders.close()
    if order_by:
        try:  # what prepare's sorted stream checks (arf_trainer.datahub.stream)
            check_order_by(order_by, schema.names, "dataset.query")
            check_scalar_keys(order_by, schema)
        except errors as exc:
            problems.append(_lint_line("dataset.order_by", exc))
    if replay:
        try:  # as prepare's _replay_source
            check_replay_columns(schema, _zero_row_schema(
                hub, "dataset.replay.query", replay["query"], dataset, spill))
        except errors as exc:
            problems.append(_lint_line("dataset.replay.query", exc))
    return problems


def _lint_line(field: str, exc: Exception) -> str:
    """A container error as a lint line: most messages start with the field they are about
    (`dataset.decode.image: ...`); the others get `field: ` in front."""
    text = str(exc)
    return text if text.startswith("dataset.") else f"{field}: {text}"


def _zero_row_schema(hub: Path, what: str, query: str, dataset: dict[str, Any],
                     spill: Path) -> Any:
    """The Arrow schema of `query`'s result as prepare would get it: the same sandbox, pins and
    parameter binding (`arf_trainer.datahub.dataset_query`), with placeholder times for the
    data-interval macros (a zero-row result depends only on their type, TIMESTAMPTZ)."""
    import datetime as dt

    from arf_trainer.datahub.dataset_query import (INTERVAL_PARAMETERS, QUERY_MEMORY_LIMIT,
                                                   parameters_for)
    from arf_trainer.datahub.stream import QuerySource

    end = dt.datetime.now(dt.UTC).replace(microsecond=0)
    values = {name: end if name == "data_interval_end" else end - dt.timedelta(days=1)
              for name in INTERVAL_PARAMETERS}
    source = QuerySource(hub, query, dict(dataset.get("tables") or {}),
                         parameters=parameters_for(what, query, values), what=what,
                         memory_limit=QUERY_MEMORY_LIMIT, timeout_s=LINT_QUERY_TIMEOUT_S,
                         spill_dir=spill, threads=1)
    return source.schema()


def _list() -> int:
    from arf_training.settings import templates_dir
    from arf_training.templates import load_folder, template_files

    good, issues = load_folder(template_files(templates_dir()))
    rows = [[t.name, t.training.recipe or "custom command",
             f"{t.training.distributed.world_size} proc", f"schedule={t.schedule or 'manual'}",
             f"model={t.model.name}"] for t in (loaded.template for loaded in good)]
    for line in table_lines(rows):
        print(line)
    if issues:
        print(f"({len({i.file for i in issues})} invalid template(s): run `arf templates lint`)")
    return 0


def table_lines(rows: list[list[str]]) -> list[str]:
    """Rows as lines with every column as wide as its widest cell (names of any length stay
    aligned); the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)] if rows else []
    return ["  ".join([cell.ljust(w) for cell, w in zip(row, widths)] + row[-1:]).rstrip()
            for row in rows]


def _render(name: str, backend: str, steps: list[str] | None) -> int:
    """Print the manifests of a template's steps as YAML documents (`helm template` style)."""
    import yaml

    from arf_training.kubernetes import (KubernetesConfigError, KubernetesSettings,
                                         render_step_manifests)
    from arf_training.kubernetes.render import placeholder_identity, steps_of
    from arf_training.settings import templates_dir
    from arf_training.templates import load_folder, template_files

    good, issues = load_folder(template_files(templates_dir()))
    found = next((t for t in good if t.name == name), None)
    if found is None:
        bad = [i for i in issues if Path(i.file).stem == name]
        if bad:
            raise TemplateError(bad)
        known = ", ".join(sorted(t.name for t in good)) or "none"
        print(f"arf templates render: no valid template named {name!r} in {templates_dir()} "
              f"(valid templates: {known})", file=sys.stderr)
        return 2
    docs = []
    try:
        settings = KubernetesSettings.from_env()
        for step in steps or steps_of(found):
            source = f"# Source: {found.path} step {step} (backend {backend}, placeholder run id)"
            if step == "federate":  # what a run adds that no render can know
                source += ("\n# At run time the SuperLink's job spec also carries each site's "
                           "manifest metadata (columns, row counts, table versions, "
                           "fingerprint), from the sites' prepare_data results.")
            docs.append(source)
            for manifest in render_step_manifests(found, step, settings,
                                                  placeholder_identity(found.name, step)):
                docs.append(yaml.safe_dump(manifest, sort_keys=False, width=100))
    except KubernetesConfigError as exc:
        print(f"arf templates render: error: {exc}", file=sys.stderr)
        return 2
    print("".join(_yaml_stream(docs)), end="")
    return 0


def _yaml_stream(docs: list[str]) -> list[str]:
    """`---` before each manifest, its `# Source:` comment inside the document it describes."""
    out: list[str] = []
    after_source = False
    for doc in docs:
        # A step with several manifests (a federation's pods) needs `---` between them too.
        if doc.startswith("# Source") or not after_source:
            out.append("---")
        after_source = doc.startswith("# Source")
        out.append(doc.rstrip("\n"))
    return [line + "\n" for line in out]
