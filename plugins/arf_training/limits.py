"""Caps on what a caller sends (CLI, gRPC), and how a caller's value is quoted in a message.

Every name, value and id is checked against its cap before any HTTP call, and messages quote at
most a short prefix of what was sent. Why both: an echoed 1 MB value breaks the reply itself (a
gRPC status message travels in trailing metadata, 8 KiB by default, so the caller would see
RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT) and floods terminals and logs; and values longer
than Airflow stores (ids, notes) are better refused here, naming the field, than by the database.
"""

from __future__ import annotations

from typing import Any

from arf_training.client_errors import BadInput

MAX_NAME = 250
"""Template (= DAG id), run id, task id, Param name: Airflow's ID_LEN."""
MAX_JOB_ID = 2 * MAX_NAME + 1
"""TEMPLATE/RUN_ID."""
MAX_DISPLAY_NAME = 1000
"""The DAG run's note (Airflow's dag_run_note.content)."""
MAX_VALUE = 64 * 1024
"""One Param value as text, a dataset query included."""
MAX_LIST_LIMIT = 1000
"""Jobs one list call returns."""
MAX_MESSAGE = 2000
"""Characters of one error message sent back (well under gRPC's 8 KiB metadata limit)."""
QUOTE_CHARS = 60


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, or for a long value its first `limit` characters and its length."""
    try:
        text = repr(value)
    except RecursionError:  # a conf value nested thousands of levels deep
        return f"<a {type(value).__name__} nested too deeply to show>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value) if isinstance(value, str) else len(text)} chars)"


def check_length(field: str, value: str | None, limit: int) -> str | None:
    """`value` unchanged, or `BadInput` naming the field, the length and the cap. A NUL character
    is refused too: Airflow's PostgreSQL cannot store one (text, JSONB), so Airflow would fail
    with HTTP 500, which reads as "Airflow is down" instead of "fix your input"."""
    if value is not None and len(value) > limit:
        raise BadInput(f"{field} is too long: {len(value)} characters, its limit is {limit} "
                       f"({quote(value)}); shorten it", field=field)
    at = -1 if value is None else value.find("\x00")
    if at >= 0:
        raise BadInput(f"{field} contains a NUL character (\\x00) at position {at} "
                       f"({quote(value)}); remove it", field=field)
    return value


def check_name(field: str, value: str | None) -> str | None:
    """A template, run or task id: within `MAX_NAME`, and not `.` or `..`, which would address
    another REST endpoint (URL path segments; the HTTP client resolves them)."""
    check_length(field, value, MAX_NAME)
    if value in (".", ".."):
        raise BadInput(f"{field} {value!r} is not a usable id (it is a relative URL path "
                       "segment); give the real one, as `arf training list` prints it",
                       field=field)
    return value


def clip(message: str, limit: int = MAX_MESSAGE) -> str:
    """A message cut to `limit` characters: the last guard before a reply leaves the process."""
    return message if len(message) <= limit else message[:limit - 20] + "... (message cut)"
