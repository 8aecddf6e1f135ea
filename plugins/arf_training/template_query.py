"""The rules of a template's dataset query (`dataset.query`, `dataset.replay.query`,
`federated.sites[].query`): size limit, a single read-only SELECT, and the data-interval macros.

Only the standard library here: it runs on every DAG parse.
"""

from __future__ import annotations

import re
from typing import Any

_SQL_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_SQL_STRING = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
# Airflow's data-interval macros a dataset query may use. They are not pasted into the SQL:
# `rewrite_query_macros` turns each into a DuckDB named parameter ($data_interval_start), and
# the prepare step binds the run's values (TIMESTAMP WITH TIME ZONE) to it.
QUERY_MACROS = ("data_interval_start", "data_interval_end", "logical_date")
_MACRO = re.compile(r"\{\{(.*?)\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_PARAMETER = re.compile(r"\$(" + "|".join(QUERY_MACROS) + r")\b")
# Longest dataset query (characters): the container refuses longer ones before parsing them
# (arf_trainer.datahub.sqlcheck.MAX_QUERY_CHARS, the same number; a test keeps them equal).
# This side may not import the container's module, and refusing here shows it at lint time.
MAX_QUERY_CHARS = 32_768


def rewrite_query_macros(query: str) -> str:
    """`{{ data_interval_start }}` (and the other QUERY_MACROS) -> `$data_interval_start`.

    Raises ValueError naming the expression for anything else in braces (other macros, Jinja
    blocks, filters) and for a macro inside a quoted SQL string, where it would be text.
    """
    for literal in _SQL_STRING.findall(_SQL_COMMENT.sub(" ", query)):
        if "{{" in literal or "{%" in literal:
            raise ValueError(
                f"the string literal {literal} holds a template expression; write "
                "{{ data_interval_start }} without quotes: it is bound as a TIMESTAMP WITH TIME "
                "ZONE parameter, not pasted into the SQL")

    def replace(match: re.Match[str]) -> str:
        name = (match.group(1) or "").strip()
        if match.group(1) is None or name not in QUERY_MACROS:
            raise ValueError(
                f"uses the template expression {match.group(0)!r}; only "
                + ", ".join("{{ " + m + " }}" for m in QUERY_MACROS)
                + " are allowed (bound as query parameters, never pasted into the SQL); "
                "write other values into the query")
        return f"${name}"

    return _MACRO.sub(replace, query)


def uses_data_interval(query: str) -> bool:
    """Whether a (rewritten) query reads one of the run's data-interval parameters."""
    return bool(_PARAMETER.search(_SQL_STRING.sub("''", _SQL_COMMENT.sub(" ", query))))


def _check_query_size(data: Any, field: str) -> Any:
    """Refuse an oversized query before any regex or parser runs over it. A model-level check
    (not a field validator), so that the issue quotes a short prefix, not the whole value."""
    query = data.get("query") if isinstance(data, dict) else None
    if isinstance(query, str) and len(query) > MAX_QUERY_CHARS:
        raise ValueError(
            f"{field} is {len(query):,} characters long, over the limit of {MAX_QUERY_CHARS:,} "
            f"(starts {' '.join(query[:60].split())!r}); shorten it, e.g. join a hub table of "
            "ids instead of a long IN list")
    return data


def _check_single_select(query: str) -> str:
    """Rewrite the macros and check for one SELECT; returns the rewritten query."""
    query = rewrite_query_macros(query)
    # A cheap first line of defence so lint catches it; the container enforces it with
    # DuckDB's own parser inside the sandbox.
    body = _SQL_STRING.sub("''", _SQL_COMMENT.sub(" ", query)).strip().rstrip(";").strip()
    if ";" in body:
        raise ValueError("holds more than one statement; keep a single SELECT")
    first = body.split(None, 1)[0].upper() if body else ""
    if first not in ("SELECT", "WITH", "FROM", "VALUES", "("):
        raise ValueError(
            f"must be a single SELECT, but starts with {first or 'nothing'!r}; "
            "data hub queries are read-only (no COPY, ATTACH, INSTALL, CREATE, ...)"
        )
    return query
