"""Where the training client finds Airflow and how it authenticates (`ClientSettings`).

First found wins: arguments/flags, the environment (`ARF_AIRFLOW_URL`, `ARF_AIRFLOW_USERNAME`,
`ARF_AIRFLOW_PASSWORD`, `ARF_AIRFLOW_TOKEN`), a YAML file (`--config`, `ARF_CLIENT_CONFIG`,
default `~/.config/arf/client.yaml` with keys `url`, `username`, `password`, `token`).
`fetch_token` gets the JWT the REST API wants; `redacted_url` is the URL as messages show it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arf_training.client_errors import AuthFailed, BadInput, Unreachable

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONFIG = Path("~/.config/arf/client.yaml")


@dataclass(frozen=True)
class ClientSettings:
    """Where Airflow is and how to authenticate. `repr` never shows secrets."""

    url: str = DEFAULT_URL
    username: str | None = field(default=None)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0

    @classmethod
    def resolve(cls, *, url: str | None = None, username: str | None = None,
                password: str | None = None, token: str | None = None,
                config_file: str | None = None) -> "ClientSettings":
        path = Path(config_file or os.environ.get("ARF_CLIENT_CONFIG") or DEFAULT_CONFIG)
        path = path.expanduser()
        from_file: dict[str, Any] = {}
        if path.is_file():
            import yaml

            try:
                from_file = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise BadInput(f"client config {path} is not valid YAML ({exc}); write keys url, "
                               "username, password, token", field="config") from exc
            unknown = set(from_file) - {"url", "username", "password", "token"}
            if unknown:
                raise BadInput(f"client config {path}: unknown key(s) {sorted(unknown)}; allowed: "
                               "url, username, password, token", field="config")
        elif config_file:
            raise BadInput(f"--config {config_file}: no such file", field="config")

        def pick(value: str | None, env: str, key: str) -> str | None:
            return value or os.environ.get(env) or from_file.get(key)

        return cls(url=(pick(url, "ARF_AIRFLOW_URL", "url") or DEFAULT_URL).rstrip("/"),
                   username=pick(username, "ARF_AIRFLOW_USERNAME", "username"),
                   password=pick(password, "ARF_AIRFLOW_PASSWORD", "password"),
                   token=pick(token, "ARF_AIRFLOW_TOKEN", "token"))


def redacted_url(url: str) -> str:
    """`url` without what may be a secret (`user:password@`, a query): what messages show. A
    gRPC caller reads them, and credentials in ARF_AIRFLOW_URL are not theirs to see."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, ("***@" if "@" in parts.netloc else "") + host,
                           parts.path, "", ""))
    except ValueError:  # not a URL at all: show its scheme only
        return url.split(":", 1)[0] + ":..."


def fetch_token(s: ClientSettings) -> str:
    """A JWT for the REST API (Airflow 3: `/auth/token`, not part of the generated client):
    the given token, one for username + password, or the all-admins one (no credentials)."""
    import urllib3

    if s.token:
        return s.token
    url = redacted_url(s.url)
    http = urllib3.PoolManager(timeout=urllib3.Timeout(total=s.timeout_s), retries=False)
    try:
        if s.username:
            resp = http.request("POST", f"{s.url}/auth/token",
                                body=json.dumps({"username": s.username,
                                                 "password": s.password or ""}),
                                headers={"Content-Type": "application/json"})
        else:
            resp = http.request("GET", f"{s.url}/auth/token")
    except urllib3.exceptions.HTTPError as exc:
        raise Unreachable(f"Airflow at {url} is unreachable ({type(exc).__name__}); start "
                          "it (`make up`) or pass --url / set ARF_AIRFLOW_URL") from exc
    if resp.status >= 500:
        raise Unreachable(f"Airflow at {url} answered HTTP {resp.status} to /auth/token")
    if resp.status >= 300:
        how = (f"user {s.username!r} was rejected" if s.username else
               "this deployment needs credentials")
        raise AuthFailed(f"Airflow at {url}: {how} (HTTP {resp.status} from /auth/token); "
                         "pass --username/--password, set ARF_AIRFLOW_USERNAME/"
                         "ARF_AIRFLOW_PASSWORD or ARF_AIRFLOW_TOKEN", field="credentials")
    try:
        return json.loads(resp.data)["access_token"]
    except (ValueError, TypeError, KeyError) as exc:  # a proxy's login page, another service
        raise BadInput(f"{url}/auth/token answered HTTP {resp.status} without an "
                       "access_token in JSON: is this Airflow 3's API server? Check --url / "
                       "ARF_AIRFLOW_URL", field="url") from exc
