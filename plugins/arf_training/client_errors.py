"""The training client's errors and the exit codes the `arf training` CLI maps them to.

One subclass per kind of failure, so that each adapter maps them once: the CLI to exit codes
(`exit_code`), the gRPC service to status codes (`grpc_service.server._STATUS`). `BadInput`
carries the request field it is about, which the gRPC message starts with.
"""

from __future__ import annotations

from arf_training.errors import ArfError

# Exit codes a CI job can rely on (the `arf` CLI uses them for every `training` command).
EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3


class ClientError(ArfError):
    """A training-client call failed; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_RUN_FAILED


class BadInput(ClientError):
    """The request is wrong (argument, conf value, credentials); retrying cannot help."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


class NotFound(BadInput):
    """No such template or job."""


class Conflict(BadInput):
    """The job is in a state that does not allow the request (cancelling a finished job)."""


class AuthFailed(BadInput):
    """Airflow rejected the credentials (401) or the user's permissions (403), or the caller
    gave none where they are required (the gRPC service off loopback)."""


class Unreachable(ClientError):
    """Airflow did not answer (connection refused, timeout, 5xx)."""

    exit_code = EXIT_UNREACHABLE


def airflow_client():
    """`airflow_client.client` (an extra of the Airflow side), or a ClientError naming the
    install command."""
    try:
        import airflow_client.client as ac
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ClientError("the training client needs apache-airflow-client; install it with "
                          "`pip install -e '.[client]'` (or `.[all]`)") from exc
    return ac
