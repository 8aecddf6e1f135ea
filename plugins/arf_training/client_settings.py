"""Where the training client finds Airflow and how it authenticates (`ClientSettings`).

First found wins: arguments/flags, the environment (`ARF_AIRFLOW_URL`, `ARF_AIRFLOW_USERNAME`,
`ARF_AIRFLOW_PASSWORD`, `ARF_AIRFLOW_TOKEN`), a YAML file (`--config`, `ARF_CLIENT_CONFIG`,
default `~/.config/arf/client.yaml` with keys `url`, `username`, `password`, `token`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arf_training.client_errors import BadInput

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
