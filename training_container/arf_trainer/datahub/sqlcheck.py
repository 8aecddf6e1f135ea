"""The static check of a data hub query, shared by `arf templates lint` and the prepare step.

It only parses (DuckDB's own parser; nothing is bound, no data is read), so `arf templates
lint` runs exactly the check the prepare step runs before it opens anything: a template that
lints clean never fails prepare for a reason lint could have seen. In order:

1. Size: at most `MAX_QUERY_CHARS` characters, checked before any parsing. DuckDB's parser and
   its JSON parse tree grow with the text (measured: a 256 KiB query took 2.8 s and ~650 MB to
   check; the issue's 1 MB query 30 s and 1.6 GB), and parsing runs outside any query limit.
   DuckDB caps expression nesting at depth 1000 itself.
2. Exactly one statement, and it is a SELECT (no COPY, ATTACH, PRAGMA, SET, ...).
3. FROM clauses: only tables referenced by name (hub tables, when the caller knows them, or
   CTEs in scope), subqueries, joins, VALUES, PIVOT and `ALLOWED_TABLE_FUNCTIONS`.
   DESCRIBE/SHOW/SUMMARIZE (`SHOW memory_limit` is a SELECT to DuckDB) are refused.
4. Functions: an allowlist of the families a dataset query needs (`ALLOWED_FUNCTIONS`), not a
   denylist: a function the next DuckDB release adds is refused until someone adds it here.
   Left out on purpose: functions that read the sandbox's own configuration or catalog
   (`current_setting`, `duckdb_settings`, `version`, ...; found writing local paths into
   training shards), read files or other databases, sleep, log, or return a different value on
   every run (`now`, `random`, `uuid`): the same table versions must give the same shards.
   Schema-qualified function names (`main.current_setting`) are refused too, and so are the
   bare names DuckDB binds to such functions (`CURRENT_DATE`, `user`: `_VALUE_FUNCTIONS`).
5. Determinism: no USING SAMPLE/TABLESAMPLE, no LIMIT/OFFSET or DISTINCT ON in a SELECT
   without ORDER BY, and no order-sensitive aggregate or window function (`string_agg`,
   `first`, `row_number`, ...) without an ORDER BY of its own: each keeps whichever rows a
   parallel scan delivers first.

What parsing cannot see is left to the sandbox (`arf_trainer.datahub.query`): external access
off, locked configuration, the UTC time zone, the memory and time limits.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import duckdb

from arf_trainer.errors import QueryError

MAX_QUERY_CHARS = 32_768
"""Longest query text accepted (characters). The Airflow side (arf_training.templates) holds
the same number for the template check; a test keeps the two equal."""
_SHOWN_QUERY_CHARS = 300

_FIX_READ_ONLY = (
    "the data hub accepts one read-only SELECT (WITH ... SELECT, FROM ..., VALUES also work) over "
    "hub tables referenced by name; no COPY, ATTACH, INSTALL/LOAD, PRAGMA, SET, CALL or DDL/DML"
)

_FAMILIES: dict[str, str] = {
    "operators": "+ - * / // % ** ^ & | << >> ~ ! !__postfix || ~~ !~~ ~~* !~~* ~~~ !~~~ ^@ "
                 "-> ->> @> <@ && <-> <=> @ = == != <> < <= > >=",
    "math": "abs acos acosh add asin asinh atan atan2 atanh bit_count cbrt ceil ceiling cos cosh "
            "cot degrees divide even exp factorial fdiv floor fmod gamma gcd "
            "greatest_common_divisor isfinite isinf isnan lcm least_common_multiple lgamma ln log "
            "log10 log2 mod multiply nextafter pi pow power radians round round_even "
            "roundbankers sign signbit sin sinh sqrt subtract tan tanh trunc xor greatest least",
    "conditional": "coalesce ifnull nullif if",
    "string": "ascii base64 bit_length char_length character_length chr concat concat_ws contains "
              "ends_with format from_base64 from_hex hex ilike_escape instr lcase left len "
              "length like_escape lower lpad ltrim nfc_normalize not_ilike_escape not_like_escape "
              "octet_length ord position prefix printf repeat replace reverse right rpad rtrim "
              "split starts_with str_split string_split string_to_array strip_accents strlen "
              "strpos substr substring suffix to_base64 to_hex translate trim ucase unhex unicode "
              "upper damerau_levenshtein editdist3 hamming jaccard jaro_similarity "
              "jaro_winkler_similarity levenshtein mismatches",
    "regex": "regexp_escape regexp_extract regexp_extract_all regexp_full_match regexp_matches "
             "regexp_replace regexp_split_to_array str_split_regex string_split_regex",
    "hash": "hash md5 md5_number sha1 sha256",
    "date/time": "age century date_add date_diff date_part date_sub date_trunc datediff datepart "
                 "datesub datetrunc day dayname dayofmonth dayofweek dayofyear days_in_month "
                 "decade epoch epoch_ms epoch_ns epoch_us era hour isodow isoyear julian "
                 "last_day make_date make_time make_timestamp make_timestamp_ms "
                 "make_timestamp_ns make_timestamptz microsecond millennium millisecond minute "
                 "month monthname nanosecond normalized_interval quarter second strftime strptime "
                 "time_bucket timezone timezone_hour timezone_minute to_centuries to_days "
                 "to_decades to_hours to_microseconds to_millennia to_milliseconds to_minutes "
                 "to_months to_quarters to_seconds to_timestamp to_weeks to_years try_strptime "
                 "week weekday weekofyear year yearweek",
    "aggregate": "any_value approx_count_distinct approx_quantile arbitrary arg_max arg_max_null "
                 "arg_min arg_min_null argmax argmin array_agg avg bit_and bit_or bit_xor "
                 "bool_and bool_or corr count count_if count_star countif covar_pop covar_samp "
                 "entropy favg first fsum geomean geometric_mean group_concat histogram "
                 "kahan_sum kurtosis kurtosis_pop last list listagg mad max max_by mean median "
                 "min min_by mode product quantile quantile_cont quantile_disc regr_avgx "
                 "regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy "
                 "regr_syy sem skewness stddev stddev_pop stddev_samp string_agg sum sumkahan "
                 "var_pop var_samp variance wavg weighted_avg",
    "window": "cume_dist dense_rank first_value lag last_value lead nth_value ntile percent_rank "
              "rank row_number",
    "list/array": "list_value list_pack array_value list_extract list_element array_extract "
                  "list_slice array_slice list_concat list_cat array_cat array_concat "
                  "list_contains list_has array_contains array_has list_has_any list_has_all "
                  "array_has_any array_has_all list_position list_indexof array_position "
                  "array_indexof cardinality array_length list_distinct array_distinct "
                  "list_unique array_unique list_sort array_sort list_reverse_sort "
                  "array_reverse_sort list_grade_up array_grade_up grade_up list_transform "
                  "array_transform list_apply array_apply apply list_filter array_filter filter "
                  "list_reduce array_reduce reduce list_aggregate list_aggr array_aggregate "
                  "array_aggr aggregate list_sum list_avg list_min list_max list_count "
                  "list_first list_last list_median list_mode list_stddev_samp list_stddev_pop "
                  "list_var_samp list_var_pop list_product list_string_agg list_bool_and "
                  "list_bool_or list_any_value list_reverse array_reverse flatten list_zip "
                  "array_zip list_select array_select list_where array_where list_resize "
                  "array_resize list_append array_append list_prepend array_prepend "
                  "array_push_back array_push_front array_pop_back array_pop_front "
                  "list_dot_product list_inner_product list_distance list_cosine_similarity "
                  "list_cosine_distance array_dot_product array_inner_product array_distance "
                  "array_cosine_similarity array_cosine_distance array_cross_product "
                  "array_to_string unnest generate_series range",
    "struct/map": "struct_pack struct_extract struct_extract_at struct_insert row map "
                  "map_extract map_extract_value map_keys map_values map_entries "
                  "map_from_entries map_concat map_contains element_at",
    "json": "json json_extract json_extract_string json_extract_path json_extract_path_text "
            "json_value json_exists json_array_length json_keys json_type json_valid "
            "json_contains to_json json_object json_array json_quote from_json from_json_strict "
            "json_transform json_transform_strict json_structure json_merge_patch",
}
ALLOWED_FUNCTIONS: dict[str, frozenset[str]] = {
    family: frozenset(names.split()) for family, names in _FAMILIES.items()}
"""Function (and operator) names a dataset query may call, by family; lower case."""
_ALLOWED = frozenset().union(*ALLOWED_FUNCTIONS.values())
ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
"""Table functions allowed in FROM: they generate rows, they read nothing."""
# FROM-clause kinds that read nothing but hub tables (a TABLE_FUNCTION is checked by name).
_TABLE_REF_TYPES = frozenset({"BASE_TABLE", "JOIN", "SUBQUERY", "TABLE_FUNCTION",
                              "EXPRESSION_LIST", "EMPTY", "PIVOT"})
_TABLE_REF_KEYS = ("from_table", "left", "right", "source")
# Why some well-known functions are missing, for a more useful message than "not allowed".
_HINTS = {
    **dict.fromkeys(("now", "today", "current_date", "current_timestamp", "get_current_time",
                     "get_current_timestamp", "transaction_timestamp", "current_localtime",
                     "current_localtimestamp", "current_time", "localtime", "localtimestamp"),
                    "it returns a different value on every run; use $data_interval_start / "
                    "$data_interval_end (the template's {{ data_interval_start }} macros)"),
    **dict.fromkeys(("random", "uuid", "uuidv4", "uuidv7", "gen_random_uuid", "setseed"),
                    "it is random on every run; for a stable sample filter on "
                    "hash(<key column>) instead"),
}

# Bare names DuckDB binds to a function where no column has that name (parsed as columns).
_VALUE_FUNCTIONS = frozenset({
    "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
    "current_user", "user", "session_user", "current_role", "current_catalog", "current_schema"})
# Aggregates and window functions that depend on the order rows arrive in (measured: 6 runs
# of string_agg over a 16-file table gave 6 strings): they need an ORDER BY of their own.
_ORDER_SENSITIVE = frozenset({
    "string_agg", "group_concat", "listagg", "list", "array_agg", "first", "last",
    "any_value", "arbitrary", "row_number", "lag", "lead", "first_value", "last_value",
    "nth_value", "ntile"})
_RUN_DEPENDENT = ("the same table versions would not give the same rows, and the dataset "
                  "fingerprint would change from run to run")


@dataclass(frozen=True)
class CheckedQuery:
    """A query that passed the check: its one statement and the tables it names."""

    statement: duckdb.Statement
    tables: tuple[str, ...]
    """Table names in FROM/JOIN, in order (possibly qualified, e.g. 'other.t'). A reference to
    a CTE is kept: where it is a hub table too, recording its version is harmless, and missing
    one would not be."""


def shown(query: str) -> str:
    """The query for an error message: whitespace collapsed, at most a short prefix."""
    text = " ".join(query[: _SHOWN_QUERY_CHARS * 4].split())
    if len(text) > _SHOWN_QUERY_CHARS:
        text = text[:_SHOWN_QUERY_CHARS] + "..."
    return repr(text)


def available_text(tables: Collection[str]) -> str:
    return f"tables available: {', '.join(sorted(tables)) or 'none (seed the hub first)'}"


def check_query(query: str, tables: Collection[str] | None = None, *,
                what: str = "the dataset query",
                parameters: Collection[str] | None = None) -> CheckedQuery:
    """Check `query` statically; raise QueryError naming what is wrong and how to fix it.

    Args:
        query: the SQL text (DuckDB dialect), template macros already rewritten to `$name`.
        tables: the hub's table names; None skips the table-name check (lint without a hub).
        what: how messages name the query, e.g. "dataset.replay.query".
        parameters: the named parameters a run may provide; None skips this check (the
            sandbox checks the values it is given instead).
    """
    check_length(query, what)
    statement = _single_select(query, what)
    if parameters is not None:
        unknown = sorted(set(statement.named_parameters) - set(parameters))
        offered = ", ".join("$" + p for p in sorted(parameters)) or "none"
        if unknown:
            raise QueryError(
                f"{what} uses parameter(s) {', '.join('$' + p for p in unknown)}, which the run "
                f"does not provide (available: {offered}). Query: {shown(query)}. Fix: use one "
                "of the available parameters, or write the value into the query")
    names, outside = _walk(_parse_tree(statement.query, what), statement.query, what, tables)
    if tables is not None:
        by_lower = {name.lower() for name in tables}
        unknown = sorted({n for n in outside if n.lower() not in by_lower})
        if unknown:
            raise QueryError(
                f"{what} references {', '.join(repr(n) for n in unknown)}, which "
                f"{'is not a table' if len(unknown) == 1 else 'are not tables'} of the data hub; "
                f"{available_text(tables)}. Query: {shown(query)}. Fix: refer to hub tables by "
                "name; reading files, URLs or other databases is not allowed")
    return CheckedQuery(statement, tuple(names))


def check_length(query: str, what: str = "the dataset query") -> None:
    """Refuse an empty or oversized query; cheap, so it runs before anything parses."""
    if not isinstance(query, str) or not query.strip():
        raise QueryError(f"{what} is empty; write one SELECT over hub tables, "
                         "e.g. SELECT * FROM reach_demos")
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(
            f"{what} is {len(query):,} characters long, over the limit of {MAX_QUERY_CHARS:,}. "
            f"Query starts: {shown(query[:80])}. Fix: shorten it (e.g. join a hub table of ids "
            "instead of a long IN list)")


def _single_select(query: str, what: str) -> duckdb.Statement:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise QueryError(f"{what} is not valid SQL: {exc}. Query: {shown(query)}. "
                         "Fix the syntax (DuckDB dialect)") from exc
    if len(statements) != 1:
        raise QueryError(f"{what} holds {len(statements)} statements, expected exactly one. "
                         f"Query: {shown(query)}. Fix: {_FIX_READ_ONLY}")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        keyword = statement.query.split(None, 1)[0].upper() if statement.query.split() else "?"
        raise QueryError(
            f"{what} is a {keyword} statement (DuckDB type {statement.type.name}), which is not "
            f"allowed. Query: {shown(query)}. Fix: {_FIX_READ_ONLY}")
    return statement


def _parse_tree(query: str, what: str) -> dict[str, Any]:
    """DuckDB's parse tree as JSON. `json_serialize_sql` parses only; it does not bind (binding
    would need the tables and fails on valid queries such as `JOIN ... USING (a)`)."""
    con = duckdb.connect(":memory:", config={"autoload_known_extensions": False,
                                             "autoinstall_known_extensions": False,
                                             "enable_external_access": False})
    try:
        row = con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()
        tree = json.loads(row[0]) if row else {}
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse {what}: {exc}. Query: {shown(query)}") from exc
    except RecursionError:
        raise QueryError(f"{what} nests expressions too deeply to check (e.g. a chain of "
                         f"hundreds of '+'). Query: {shown(query)}. Fix: flatten it, e.g. "
                         "list_sum([a, b, ...])") from None
    finally:
        con.close()
    if tree.get("error"):
        raise QueryError(f"cannot parse {what}: {tree.get('error_message', tree)}. "
                         f"Query: {shown(query)}. Fix the syntax (DuckDB dialect)")
    return tree


def _walk(tree: dict[str, Any], query: str, what: str,
          tables: Collection[str] | None) -> tuple[list[str], list[str]]:
    """(table names in FROM/JOIN, those of them that are not a CTE in scope); refuses
    disallowed functions, FROM kinds and run-dependent constructs. Iterative: a parse tree may
    be deeper than Python's recursion limit. A CTE is in scope in its WITH's query and in the
    CTEs after it, for unqualified names only (as DuckDB scopes it: one query-wide set let
    `(WITH pg_settings AS ...), pg_settings` read DuckDB's settings)."""
    names: list[str] = []
    outside: list[str] = []
    table_functions: set[int] = set()  # ids of FUNCTION nodes already checked as FROM items
    todo: list[tuple[Any, str, frozenset[str]]] = [(tree, "", frozenset())]
    while todo:
        node, key, scope = todo.pop()
        if isinstance(node, list):
            todo.extend((value, key, scope) for value in reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if kind == "RECURSIVE_CTE_NODE":  # its left/right are queries, not FROM items
            raise QueryError(f"{what} uses WITH RECURSIVE, which is not allowed. Query: "
                             f"{shown(query)}. Fix: write the rows without recursion")
        # A FROM item sits under one of _TABLE_REF_KEYS; any classless node typed like one is
        # checked too, wherever a future parse tree puts it.
        if "class" not in node and isinstance(kind, str) and (
                key in _TABLE_REF_KEYS or kind in _TABLE_REF_TYPES | {"SHOW_REF"}):
            _check_table_ref(node, query, what, tables, names, outside, scope)
            table_functions.add(id(node.get("function")))
        elif node.get("class") in ("FUNCTION", "WINDOW") and id(node) not in table_functions:
            _check_function(node, query, what, table_function=False)
            _check_order(node, query, what)
        elif node.get("class") == "COLUMN_REF":
            _check_column(node, query, what)
        if node.get("sample"):
            raise QueryError(
                f"{what} uses USING SAMPLE / TABLESAMPLE, which is not allowed: it picks other "
                "rows on every run (with more than one thread even with REPEATABLE), so the "
                f"same table versions would not give the same shards. Query: {shown(query)}. "
                "Fix: for a stable sample filter on hash(<key column>), e.g. WHERE "
                "hash(episode) % 10 = 0")
        if isinstance(node.get("modifiers"), list):
            _check_modifiers(node["modifiers"], query, what)
        entries = (node.get("cte_map") or {}).get("map") or []
        ctes = [str(entry.get("key", "")).lower() for entry in entries]
        inner = scope | frozenset(ctes)
        for child, value in reversed(list(node.items())):
            if child == "cte_map":  # each CTE body sees the CTEs before it, not itself
                todo.extend((entry.get("value"), "", scope | frozenset(ctes[:i]))
                            for i, entry in reversed(list(enumerate(entries))))
            else:
                todo.append((value, child, inner))
    return names, outside


def _check_table_ref(node: dict[str, Any], query: str, what: str,
                     tables: Collection[str] | None, names: list[str], outside: list[str],
                     scope: frozenset[str]) -> None:
    kind = node["type"]
    if kind not in _TABLE_REF_TYPES:
        raise QueryError(
            f"{what} uses a {kind} in FROM (e.g. DESCRIBE, SHOW, SUMMARIZE), which is not allowed: "
            f"it reads the database's catalog or settings. Query: {shown(query)}. Fix: select "
            "columns of hub tables")
    if kind == "BASE_TABLE" and "table_name" in node:
        parts = [node.get("catalog_name") or "", node.get("schema_name") or "",
                 node["table_name"]]
        # The hub's tables are registered as temporary views: temp.main.<name>.
        if parts[0].lower() in ("", "temp") and parts[1].lower() in ("", "main"):
            names.append(parts[2])
        else:
            names.append(".".join(p for p in parts if p))
        if parts[0] or parts[1] or parts[2].lower() not in scope:  # not a CTE reference
            outside.append(names[-1])
    elif kind == "TABLE_FUNCTION" and isinstance(node.get("function"), dict):
        _check_function(node["function"], query, what, table_function=True, tables=tables)


def _check_function(node: dict[str, Any], query: str, what: str, *, table_function: bool,
                    tables: Collection[str] | None = None) -> None:
    name = str(node.get("function_name", "?"))
    qualified = ".".join(p for p in (node.get("catalog"), node.get("schema"), name) if p)
    allowed = ALLOWED_TABLE_FUNCTIONS if table_function else _ALLOWED
    if qualified == name and name.lower() in allowed:
        return
    if table_function:
        known = f" ({available_text(tables)})" if tables is not None else ""
        raise QueryError(
            f"{what} reads FROM {qualified}(), which is not allowed: a dataset query reads hub "
            f"tables by name{known} or rows of {'(), '.join(sorted(ALLOWED_TABLE_FUNCTIONS))}(); "
            "files, URLs, other databases and DuckDB's catalog and settings are outside the data "
            f"hub. Query: {shown(query)}. Fix: read the hub table by name")
    why = _HINTS.get(name.lower(), "only functions of these families are allowed: "
                     + ", ".join(ALLOWED_FUNCTIONS) + " (arf_trainer.datahub.sqlcheck)")
    raise QueryError(f"{what} calls {qualified}(), which is not allowed: {why}. "
                     f"Query: {shown(query)}. Fix: remove {qualified}() from the query")


def _check_column(node: dict[str, Any], query: str, what: str) -> None:
    parts = node.get("column_names") or []
    if len(parts) == 1 and str(parts[0]).lower() in _VALUE_FUNCTIONS:
        name = str(parts[0])
        why = _HINTS.get(name.lower(), "it reads the sandbox's own session")
        raise QueryError(
            f"{what} uses {name}, which DuckDB reads as the function {name.lower()} where no "
            f"column has that name; it is not allowed: {why}. Query: {shown(query)}. Fix: if "
            f"it is a column, qualify it with its table (e.g. t.{name}); else remove it")


def _check_order(node: dict[str, Any], query: str, what: str) -> None:
    """An order-sensitive aggregate or window function needs an ORDER BY of its own."""
    name = str(node.get("function_name", "")).lower()
    if name not in _ORDER_SENSITIVE:
        return
    window = node.get("class") == "WINDOW"
    example = (f"{name}(...) OVER (PARTITION BY ... ORDER BY <key columns>)" if window
               else f"{name}(<value> ORDER BY <key columns>)")
    if not (node.get("orders") or node.get("arg_orders")
            or (node.get("order_bys") or {}).get("orders")):
        raise QueryError(
            f"{what} calls {name}() without an ORDER BY, which is not allowed: its result "
            f"depends on the order DuckDB's parallel scan delivers rows in, so {_RUN_DEPENDENT}. "
            f"Query: {shown(query)}. Fix: order it by columns that are unique, e.g. {example}")


def _check_modifiers(modifiers: list[Any], query: str, what: str) -> None:
    """LIMIT/OFFSET and DISTINCT ON keep rows in arrival order unless the SELECT orders them."""
    kinds = {m.get("type") for m in modifiers if isinstance(m, dict)}
    distinct_on = any(isinstance(m, dict) and m.get("distinct_on_targets") for m in modifiers)
    construct = ("LIMIT/OFFSET" if kinds & {"LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER"}
                 else "DISTINCT ON" if distinct_on else None)
    if construct and "ORDER_MODIFIER" not in kinds:
        raise QueryError(
            f"{what} uses {construct} in a SELECT without ORDER BY, which is not allowed: it "
            f"keeps whichever rows DuckDB's parallel scan delivers first, so {_RUN_DEPENDENT}. "
            f"Query: {shown(query)}. Fix: add ORDER BY <columns that are unique> to that SELECT")
