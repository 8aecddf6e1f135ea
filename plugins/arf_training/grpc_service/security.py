"""Who may call `arf serve grpc`, and over what channel. Decided once, when the server starts.

Callers: a call with `authorization: Bearer <Airflow JWT>` metadata acts as that Airflow user.
A call without it would act with the server's own Airflow settings (`ARF_AIRFLOW_*`), so that is
allowed only where it cannot be abused: on a server that listens on loopback only (just local
processes reach it, as under `arf up`), or one started with `--allow-anonymous`, which it warns
about. Anywhere else an anonymous call is refused with UNAUTHENTICATED, and so is malformed
authorization metadata (it is never silently treated as anonymous).

Channel: `--tls-cert` + `--tls-key` serve TLS (PEM files); `--tls-client-ca` also requires every
client to present a certificate signed by that CA (mutual TLS). Without TLS a non-loopback server
warns that callers' tokens cross the network in plain text.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from arf_training.client_errors import AuthFailed, BadInput


def is_loopback(host: str) -> bool:
    """Whether listening on `host` accepts connections from this machine only.

    `localhost` and loopback addresses (127.0.0.0/8, ::1) are; any other name is not, since it
    may resolve anywhere, and neither are the wildcards `0.0.0.0` / `::` (every interface).
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def anonymous_allowed(host: str, allow_anonymous: bool) -> bool:
    """Whether calls without authorization metadata are served (with the server's settings)."""
    return allow_anonymous or is_loopback(host)


def caller_token(metadata: Iterable[tuple[str, str]] | None) -> str | None:
    """The bearer token of a call's metadata; None when it has no `authorization` entry. Two
    entries are refused: which one acts would be a guess (a proxy may have added one)."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) > 1:
        raise AuthFailed(f"the call carries {len(values)} authorization metadata entries; send "
                         "exactly one, 'Bearer <Airflow JWT>'", field="authorization")
    if not values:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthFailed("authorization metadata must be 'Bearer <Airflow JWT>' (get a JWT "
                         "from Airflow's POST /auth/token); other schemes are not accepted",
                         field="authorization")
    return token.strip()


def refuse_anonymous() -> AuthFailed:
    return AuthFailed("this server does not serve anonymous calls: it listens beyond loopback and "
                      "was not started with --allow-anonymous. Send `authorization: Bearer "
                      "<Airflow JWT>` metadata (a JWT from Airflow's POST /auth/token)",
                      field="authorization")


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and key, and optionally the CA that signs client
    certificates (mutual TLS). All PEM."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None,
                   client_ca: str | None) -> TlsFiles | None:
        """None without any TLS flag; `BadInput` for an incomplete set."""
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            missing = "--tls-key" if cert else "--tls-cert"
            raise BadInput(f"TLS needs both --tls-cert (PEM certificate chain) and --tls-key (its "
                           f"PEM private key); {missing} is missing", field=missing)
        return cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)

    def credentials(self):
        """`grpc.ServerCredentials` from the files (read now: a bad path fails at startup)."""
        import grpc

        cert, key = _read_pem("--tls-cert", self.cert), _read_pem("--tls-key", self.key)
        ca = _read_pem("--tls-client-ca", self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    @property
    def mode(self) -> str:
        return "mutual TLS" if self.client_ca else "TLS"


def _read_pem(flag: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{flag} {path}: cannot read it ({exc.strerror}); give a PEM file",
                       field=flag) from exc
    if b"-----BEGIN " not in data:
        raise BadInput(f"{flag} {path} is not PEM (no '-----BEGIN' line); convert it, e.g. "
                       "`openssl x509 -inform der -outform pem` for a DER certificate, "
                       "`openssl pkey ...` for a key", field=flag)
    return data


def startup_warnings(host: str, allow_anonymous: bool, tls: TlsFiles | None) -> list[str]:
    """What an operator must know about a server started this way."""
    warnings = []
    if allow_anonymous:
        warnings.append(f"--allow-anonymous: calls without authorization metadata act with this "
                        f"server's own Airflow credentials; anyone who can reach {host} can "
                        "start and cancel training jobs")
    if tls is None and not is_loopback(host):
        warnings.append(f"listening on {host} without TLS: callers' Airflow tokens cross the "
                        "network in plain text; pass --tls-cert and --tls-key")
    return warnings


__all__ = ["TlsFiles", "anonymous_allowed", "caller_token", "is_loopback", "refuse_anonymous",
           "startup_warnings"]
