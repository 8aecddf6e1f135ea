"""`arf serve grpc`: the `arf.cloud.v1.TrainingService`, mapped onto `TrainingClient`.

Each RPC is a few lines: request fields -> a `TrainingClient` call -> response message. Client
errors become gRPC status codes (`_STATUS`): bad input INVALID_ARGUMENT (the message names the
field), unknown template/job NOT_FOUND, Airflow unreachable UNAVAILABLE, rejected credentials
UNAUTHENTICATED, cancelling a finished job FAILED_PRECONDITION; anything else INTERNAL (logged
with its traceback). Messages are cut to `limits.MAX_MESSAGE` characters.

Authentication is passed through: a caller's `authorization: Bearer <Airflow JWT>` metadata is
the token used against Airflow. Calls without it act with the server's own settings only on a
loopback-only server or with `--allow-anonymous`; TLS and mutual TLS are optional (both in
`security`). Metadata and credentials are never logged; the access log names the method, the
status code the caller got and the duration. Health checking (`grpc.health.v1`) and server
reflection are enabled.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import replace
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from arf_training.client import (STATUS, AuthFailed, BadInput, ClientError, ClientSettings,
                                 Conflict, Job, NotFound, TrainingClient, Unreachable,
                                 redacted_url)
from arf_training.grpc_service.gen import training_pb2 as pb
from arf_training.grpc_service.gen import training_pb2_grpc as pb_grpc
from arf_training.grpc_service.security import (TlsFiles, anonymous_allowed, caller_token,
                                                refuse_anonymous, startup_warnings)
from arf_training.limits import check_name, clip, quote

log = logging.getLogger("arf.grpc")
SERVICE = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name
# Most specific first: NotFound/Conflict/AuthFailed are BadInput too.
_STATUS: list[tuple[type, grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (AuthFailed, grpc.StatusCode.UNAUTHENTICATED),
    (BadInput, grpc.StatusCode.INVALID_ARGUMENT),
    (Unreachable, grpc.StatusCode.UNAVAILABLE),
    (ClientError, grpc.StatusCode.INTERNAL),
]


def _job_message(job: Job) -> pb.TrainingJob:
    return pb.TrainingJob(
        job_id=job.job_id, training_script_plugin=job.template, display_name=job.display_name,
        status=pb.TrainingJobStatus.Value(job.status), airflow_state=job.state,
        cancelled=job.cancelled, tasks=job.tasks, model_name=job.model_name or "",
        model_version=job.model_version or "", start_time=job.start_date or "",
        end_time=job.end_date or "")


class TrainingService(pb_grpc.TrainingServiceServicer):
    """The RPCs; every one goes through `_run` (caller check, client choice, error mapping,
    access log). `anonymous`: serve calls without authorization metadata with `settings`'
    credentials (`security.anonymous_allowed`); otherwise they get UNAUTHENTICATED."""

    def __init__(self, settings: ClientSettings, *, anonymous: bool = False):
        self.settings = settings
        self.anonymous = anonymous
        self._clients: dict[str | None, TrainingClient] = {}
        self._lock = threading.Lock()

    def _client(self, context: grpc.ServicerContext) -> TrainingClient:
        token = caller_token(context.invocation_metadata())
        if token is None and not self.anonymous:
            raise refuse_anonymous()
        with self._lock:
            client = self._clients.get(token)
            if client is None:
                settings = self.settings if token is None else replace(
                    self.settings, token=token, username=None, password=None)
                client = self._clients[token] = TrainingClient(settings)
                if len(self._clients) > 256:  # a bounded cache of per-caller clients
                    self._clients.pop(next(iter(self._clients)))
            return client

    def _run(self, name: str, context: grpc.ServicerContext,
             fn: Callable[[TrainingClient], Any]) -> Any:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return fn(self._client(context))
        except ClientError as exc:
            code = next(c for kind, c in _STATUS if isinstance(exc, kind))
            field = getattr(exc, "field", "")
            context.abort(code, clip(f"{field}: {exc}" if field and not str(exc).startswith(field)
                                     else str(exc)))
        except Exception:  # a bug of ours: the caller gets INTERNAL, the log the traceback
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", name)
            context.abort(code, f"{name}: internal error of the arf gRPC server (its log has the "
                                "details); please report it")
        finally:
            log.info("%s %s %.0f ms", name, code.name, (time.perf_counter() - start) * 1000)

    def StartTrainingJob(self, request, context):
        def start(client: TrainingClient) -> pb.StartTrainingJobResponse:
            if not request.training_script_plugin:
                raise BadInput("training_script_plugin is empty; give a template name "
                               "(see ListTrainingJobs or `arf training templates list`)",
                               field="training_script_plugin")
            if request.base_model_plugin:
                raise BadInput(f"base_model_plugin {quote(request.base_model_plugin)} is not "
                               "supported yet: a template's base model comes from its file "
                               "(model.base_model); leave it empty", field="base_model_plugin")
            job = client.start(request.training_script_plugin,
                               sets=dict(request.hyperparameters),
                               display_name=request.display_name,
                               dataset_query=request.dataset_query or None)
            return pb.StartTrainingJobResponse(job_id=job.job_id)

        return self._run("StartTrainingJob", context, start)

    def GetTrainingJobStatus(self, request, context):
        def get(client: TrainingClient) -> pb.GetTrainingJobStatusResponse:
            job = client.status(request.job_id)
            return pb.GetTrainingJobStatusResponse(status=pb.TrainingJobStatus.Value(job.status),
                                                   job=_job_message(job))

        return self._run("GetTrainingJobStatus", context, get)

    def ListTrainingJobs(self, request, context):
        def list_jobs(client: TrainingClient) -> pb.ListTrainingJobsResponse:
            status = None
            if request.status:
                if request.status not in pb.TrainingJobStatus.values():
                    raise BadInput(f"status {request.status} is not a TrainingJobStatus; use one "
                                   f"of {', '.join(pb.TrainingJobStatus.keys())} (0 = every "
                                   "status)", field="status")
                status = pb.TrainingJobStatus.Name(request.status)
            jobs = client.list(template=request.training_script_plugin or None, state=status,
                               limit=request.limit or 50)
            return pb.ListTrainingJobsResponse(jobs=[_job_message(j) for j in jobs])

        return self._run("ListTrainingJobs", context, list_jobs)

    def CancelTrainingJob(self, request, context):
        return self._run("CancelTrainingJob", context, lambda client: pb.CancelTrainingJobResponse(
            job=_job_message(client.cancel(request.job_id))))

    def StreamTrainingJobLogs(self, request, context):
        def lines(client: TrainingClient) -> list:
            # Check what can be checked before the first message, so errors are status codes
            # (the task name's length, the job); an unknown task shows with the first lines.
            check_name("task", request.task)
            client.status(request.job_id, tasks=False)
            # Following polls Airflow between lines; stop when the call ends (cancelled, deadline,
            # disconnect), or an abandoned stream polls, holding a worker, until the job ends.
            stop = threading.Event()
            context.add_callback(stop.set)
            return client.logs(request.job_id, task=request.task or None, follow=request.follow,
                               stop=stop)

        stream = self._run("StreamTrainingJobLogs", context, lines)
        try:
            for task_id, line in stream:
                if not context.is_active():
                    return
                yield pb.LogLine(task=task_id, line=line)
        except ClientError as exc:  # while following: after the access log line of the call
            code = next(c for kind, c in _STATUS if isinstance(exc, kind))
            log.info("StreamTrainingJobLogs %s (while streaming)", code.name)
            context.abort(code, clip(str(exc)))
        except Exception:
            log.exception("StreamTrainingJobLogs INTERNAL (while streaming)")
            context.abort(grpc.StatusCode.INTERNAL, "StreamTrainingJobLogs: internal error of "
                                                    "the arf gRPC server (its log has the details)")


def make_server(settings: ClientSettings, host: str = "127.0.0.1", port: int = 50051, *,
                anonymous: bool | None = None,
                tls: TlsFiles | None = None) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server with the service, health and reflection.
    `anonymous`: see `TrainingService` (None: only if `host` is loopback); `tls`: serve TLS
    (mutual TLS with a client CA)."""
    if anonymous is None:
        anonymous = anonymous_allowed(host, allow_anonymous=False)
    credentials = tls.credentials() if tls else None  # bad files fail before anything else
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_TrainingServiceServicer_to_server(
        TrainingService(settings, anonymous=anonymous), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    # An IPv6 address needs brackets before the port (`[::]:50051`), as in a URL.
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials
                 else server.add_insecure_port(address))
    except RuntimeError as exc:  # grpc checks the address, and the certificate and key, here
        if not tls:
            raise BadInput(f"cannot listen on {address}: gRPC refused the address; pass --host "
                           "an IP address or host name of this machine (127.0.0.1, ::1, 0.0.0.0)",
                           field="--host") from exc
        raise ClientError(f"cannot listen on {address} with TLS: gRPC refused --tls-cert "
                          f"{tls.cert} / --tls-key {tls.key} (a key that does not match the "
                          "certificate?)") from exc
    if not bound:
        raise ClientError(f"cannot listen on {address}; is the port in use? pass --port")
    return server, bound


def serve(settings: ClientSettings, host: str = "127.0.0.1", port: int = 50051, *,
          allow_anonymous: bool = False, tls: TlsFiles | None = None) -> int:
    """Run until SIGTERM/SIGINT. Prints `listening on HOST:PORT` once ready (port 0 = any)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    anonymous = anonymous_allowed(host, allow_anonymous)
    server, bound = make_server(settings, host, port, anonymous=anonymous, tls=tls)
    for warning in startup_warnings(host, allow_anonymous, tls):
        log.warning("WARNING: %s", warning)
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on {host}:{bound} (Airflow {redacted_url(settings.url)}; "
          f"{tls.mode if tls else 'plaintext'}"
          f"; anonymous calls {'served' if anonymous else 'refused'})", flush=True)
    stop.wait()
    server.stop(grace=5).wait()
    print("stopped", file=sys.stderr, flush=True)
    return 0


__all__ = ["TrainingService", "make_server", "serve", "STATUS"]
