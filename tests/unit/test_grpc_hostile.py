"""Hostile and odd calls to the gRPC TrainingService and the training client, in front of a small
fake of Airflow's REST API v2 (`FakeAirflow`: just the routes the client uses), so that input
which passes the client's own checks reaches "Airflow" and what is sent there can be inspected.

Each test names what went wrong before it was fixed: a hung Airflow hung the caller, a proxy's
login page surfaced as INTERNAL, credentials in the Airflow URL reached callers, abandoned log
streams kept polling, `.`/`..` ids addressed other endpoints, NUL characters reached Airflow's
PostgreSQL, two authorization entries were silently resolved, and conf errors echoed
whole values."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import grpc
import pytest

from arf_training.client import (BadInput, ClientSettings, TrainingClient, Unreachable,
                                 redacted_url)
from arf_training.errors import ConfError
from arf_training.grpc_service.gen import training_pb2 as pb
from arf_training.grpc_service.gen import training_pb2_grpc as pb_grpc
from arf_training.grpc_service.server import make_server
from arf_training.params import schemas_from_airflow

AUTH = [("authorization", "Bearer caller-jwt")]
PARAMS = {  # GET /api/v2/dags/{id}/details -> params
    "epochs": {"value": 5, "description": "Passes.", "schema": {
        "type": "integer", "minimum": 1, "maximum": 200}},
    "lr": {"value": 0.01, "schema": {"type": "number", "minimum": 0.0, "maximum": 1.0}},
    "seed": {"value": 0, "schema": {"type": "integer", "minimum": 0}},
}
_DAG = {"catchup": False, "concurrency": 1, "file_token": "x", "fileloc": "/dags/x.py",
        "has_import_errors": False, "has_task_concurrency_limits": False,
        "is_backfillable": True, "is_paused": False, "is_stale": False, "max_active_tasks": 1,
        "max_consecutive_failed_dag_runs": 0, "owners": ["arf"],
        "render_template_as_native_obj": False, "timetable_partitioned": False,
        "timetable_periodic": False}


def _dag(dag_id: str) -> dict:
    tags = ["arf"] if dag_id == "digits_smoke" else ["billing"]  # other_team: not a template
    return {**_DAG, "dag_id": dag_id, "dag_display_name": dag_id, "params": PARAMS,
            "tags": [{"name": tag, "dag_id": dag_id, "dag_display_name": dag_id}
                     for tag in tags]}


def _run(dag_id: str, run_id: str, state: str, conf=None, note=None) -> dict:
    return {"dag_id": dag_id, "dag_display_name": dag_id, "dag_run_id": run_id,
            "dag_versions": [], "run_after": "2026-01-01T00:00:00Z", "run_type": "manual",
            "state": state, "conf": conf or {}, "note": note}


class FakeAirflow:
    """Airflow's `/auth/token` and the DAG / DAG run / task instance routes the client calls,
    for a template, `digits_smoke`, and another team's DAG, `other_team`. `requests` records
    (method, path); `hang_s` delays answers; `token_answer` replaces the `/auth/token` body."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.runs: dict[tuple[str, str], dict] = {}
        self.hang_s = 0.0
        self.token_answer: bytes | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append((method, self.path))
                time.sleep(fake.hang_s)
                code, reply = fake.route(method, urlsplit(self.path).path, body)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def do_PATCH(self):
                self._answer("PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        if path == "/auth/token":
            return (200, self.token_answer) if self.token_answer else (201, {"access_token": "t"})
        parts = [unquote(p) for p in path.removeprefix("/api/v2/").split("/")]
        if parts == ["dags"]:
            return 200, {"dags": [_dag("digits_smoke")], "total_entries": 1}
        if parts[0] != "dags" or len(parts) < 2 or parts[1] not in ("digits_smoke",
                                                                     "other_team", "~"):
            return 404, {"detail": "Not Found"}
        if parts[2:] == ["details"]:
            return 200, _dag(parts[1])
        if parts[2:] == ["dagRuns"] and method == "POST":
            sent = json.loads(body)
            run = _run(parts[1], sent["dag_run_id"], "queued", sent.get("conf"), sent.get("note"))
            self.runs[(parts[1], sent["dag_run_id"])] = run
            return 200, run
        if parts[2:] == ["dagRuns"]:
            return 200, {"dag_runs": list(self.runs.values()), "total_entries": len(self.runs)}
        run = self.runs.get((parts[1], parts[3])) if len(parts) > 3 else None
        if run is None:
            return 404, {"detail": "Not Found"}
        if parts[4:] == ["taskInstances"]:
            return 200, {"task_instances": [], "total_entries": 0}
        if method == "PATCH":
            run.update(json.loads(body))
        return 200, run

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def airflow():
    fake = FakeAirflow()
    yield fake
    fake.close()


@contextmanager
def service(url: str, *, anonymous: bool = False, timeout_s: float = 5):
    """A stub for the service on 127.0.0.1 (served as if off loopback unless `anonymous`)."""
    server, port = make_server(ClientSettings(url=url, timeout_s=timeout_s), "127.0.0.1", 0,
                               anonymous=anonymous)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.TrainingServiceStub(channel)
    finally:
        server.stop(0)


def fails(stub, method: str, request, metadata=AUTH) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        reply = getattr(stub, method)(request, metadata=metadata, timeout=30)
        if method.startswith("Stream"):
            list(reply)
    return info.value


def start(**hyperparameters) -> pb.StartTrainingJobRequest:
    return pb.StartTrainingJobRequest(training_script_plugin="digits_smoke",
                                      hyperparameters=hyperparameters)


# -- what held already: the fake is faithful enough that good and bad calls behave ---------------

def test_good_start_reaches_airflow_and_bad_input_does_not(airflow):
    with service(airflow.url) as stub:
        job_id = stub.StartTrainingJob(start(epochs="3"), metadata=AUTH, timeout=30).job_id
        assert job_id.startswith("digits_smoke/arf__")
        [run] = airflow.runs.values()
        assert run["conf"] == {"epochs": 3}  # only the keys given: Params fill in the rest
        for request, field in [(start(lr="NaN"), "lr"), (start(epochs="2.5"), "epochs"),
                               (pb.StartTrainingJobRequest(training_script_plugin="digits_smoke",
                                                           dataset_query="select 1"),
                                "dataset_query")]:
            err = fails(stub, "StartTrainingJob", request)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert err.details().startswith(field), err.details()
        err = fails(stub, "StartTrainingJob", pb.StartTrainingJobRequest(
            training_script_plugin="nope"))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "digits_smoke" in err.details()
    assert len(airflow.runs) == 1


def test_only_training_templates_are_started_or_cancelled(airflow):
    """A DAG without the `arf` tag is not a template (`templates list` leaves it out). Before,
    StartTrainingJob triggered it and CancelTrainingJob failed its runs, for anonymous
    loopback callers with the server's own credentials too."""
    airflow.runs[("other_team", "r1")] = _run("other_team", "r1", "running")
    airflow.runs[("digits_smoke", "r2")] = _run("digits_smoke", "r2", "running")
    with service(airflow.url) as stub:
        err = fails(stub, "StartTrainingJob", pb.StartTrainingJobRequest(
            training_script_plugin="other_team"))
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert "without the 'arf' tag" in err.details() and "digits_smoke" in err.details()
        err = fails(stub, "CancelTrainingJob", pb.CancelTrainingJobRequest(job_id="other_team/r1"))
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        job = stub.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id="digits_smoke/r2"),
                                     metadata=AUTH, timeout=30).job
        assert job.cancelled and job.status == pb.FAILED
    assert airflow.runs[("other_team", "r1")]["state"] == "running"
    assert not [r for r in airflow.requests if r[0] != "GET" and "other_team" in r[1]]


def test_starting_a_known_template_does_not_list_every_template(airflow):
    """Before: every start also read GET /dags, for a NOT_FOUND message it did not send."""
    with service(airflow.url) as stub:
        stub.StartTrainingJob(start(), metadata=AUTH, timeout=30)
    assert [path for _, path in airflow.requests if path.startswith("/api/v2/dags?")] == []


# -- Airflow that hangs, or is not Airflow -------------------------------------------------------

def test_hung_airflow_is_unavailable_after_the_timeout(airflow):
    airflow.hang_s = 20  # before: the call waited for as long as Airflow did
    client = TrainingClient(ClientSettings(url=airflow.url, token="jwt", timeout_s=1))
    began = time.monotonic()
    with pytest.raises(Unreachable, match="unreachable .ReadTimeoutError"):
        client.status("digits_smoke/arf__1")
    assert time.monotonic() - began < 10


def test_a_login_page_at_auth_token_is_a_wrong_url_not_internal(airflow):
    airflow.token_answer = b"<html>Please sign in</html>"  # before: INTERNAL (JSONDecodeError)
    with service(airflow.url, anonymous=True) as stub:
        err = fails(stub, "ListTrainingJobs", pb.ListTrainingJobsRequest(), metadata=None)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "access_token" in err.details() and "ARF_AIRFLOW_URL" in err.details()


@pytest.mark.parametrize("url, shown", [
    pytest.param("http://admin:s3cret@airflow:8080", "http://***@airflow:8080", id="userinfo"),
    pytest.param("https://af.example.com/base?token=s3cret", "https://af.example.com/base",
                 id="query"),
    pytest.param("http://127.0.0.1:8080", "http://127.0.0.1:8080", id="plain"),
    pytest.param("http://[::1", "http:...", id="not-a-url"),
])
def test_redacted_url(url, shown):
    assert redacted_url(url) == shown


def test_credentials_in_the_airflow_url_never_reach_a_caller():
    url = "http://admin:s3cret@127.0.0.1:9"  # nothing listens: UNAVAILABLE, naming the URL
    with service(url, anonymous=True) as stub:  # before: the message quoted the password
        for metadata in (None, AUTH):  # /auth/token with the server's settings; the caller's JWT
            err = fails(stub, "GetTrainingJobStatus",
                        pb.GetTrainingJobStatusRequest(job_id="digits_smoke/arf__1"), metadata)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "127.0.0.1:9" in err.details() and "s3cret" not in err.details()


# -- streams ---------------------------------------------------------------------------------------

def test_an_abandoned_log_stream_stops_polling_airflow(airflow):
    airflow.runs[("digits_smoke", "r1")] = _run("digits_smoke", "r1", "running")
    with service(airflow.url) as stub:
        stream = stub.StreamTrainingJobLogs(pb.StreamTrainingJobLogsRequest(
            job_id="digits_smoke/r1", follow=True), metadata=AUTH, timeout=1)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)  # a running job with no log lines: the deadline ends the call
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)
        before = len(airflow.requests)
        time.sleep(5)  # before: polled every 2 s until the job finished, holding a worker
        assert len(airflow.requests) == before, airflow.requests[before:]


# -- ids that are URL path segments, NUL characters ------------------------------------------------

@pytest.mark.parametrize("method, request_, field", [
    pytest.param("GetTrainingJobStatus", pb.GetTrainingJobStatusRequest(job_id="digits_smoke/.."),
                 "job_id", id="status-run-dotdot"),
    pytest.param("GetTrainingJobStatus", pb.GetTrainingJobStatusRequest(job_id="./x"),
                 "job_id", id="status-template-dot"),
    pytest.param("CancelTrainingJob", pb.CancelTrainingJobRequest(job_id="../x"),
                 "job_id", id="cancel-template-dotdot"),
    pytest.param("CancelTrainingJob", pb.CancelTrainingJobRequest(job_id="digits_smoke/."),
                 "job_id", id="cancel-run-dot"),
    pytest.param("StartTrainingJob", pb.StartTrainingJobRequest(training_script_plugin=".."),
                 "template", id="start-template-dotdot"),
    pytest.param("ListTrainingJobs", pb.ListTrainingJobsRequest(training_script_plugin="."),
                 "template", id="list-template-dot"),
    pytest.param("StreamTrainingJobLogs", pb.StreamTrainingJobLogsRequest(
        job_id="digits_smoke/..", task="train"), "job_id", id="logs-run-dotdot"),
    pytest.param("StartTrainingJob", pb.StartTrainingJobRequest(
        training_script_plugin="digits_smoke", display_name="nightly\x00"), "display_name",
        id="nul-display-name"),
    pytest.param("StartTrainingJob", start(epochs="\x003"), "epochs", id="nul-value"),
    pytest.param("StartTrainingJob", start(**{"ep\x00ochs": "3"}), "hyperparameter name",
                 id="nul-name"),
    pytest.param("StartTrainingJob", pb.StartTrainingJobRequest(
        training_script_plugin="digits_smoke\x00"), "template", id="nul-template"),
    pytest.param("GetTrainingJobStatus", pb.GetTrainingJobStatusRequest(
        job_id="digits_smoke/arf__1\x00"), "job_id", id="nul-job-id"),
])
def test_unaddressable_ids_and_nul_are_refused_before_airflow(airflow, method, request_, field):
    """`.`/`..` would reach another endpoint (the HTTP client resolves them: `t/..` read
    `/api/v2/dags/t/`); PostgreSQL cannot store NUL in Airflow's text and JSONB columns, so
    Airflow answers 500, which reads as UNAVAILABLE. Before: NOT_FOUND, or a created job."""
    with service(airflow.url) as stub:
        err = fails(stub, method, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(field), err.details()
    assert not airflow.requests and not airflow.runs


def test_two_authorization_entries_are_refused(airflow):
    with service(airflow.url) as stub:  # before: the first one acted, silently
        err = fails(stub, "ListTrainingJobs", pb.ListTrainingJobsRequest(),
                    metadata=[("authorization", "Bearer a"), ("authorization", "Bearer b")])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    assert "2 authorization metadata entries" in err.details() and not airflow.requests


# -- conf errors: short, naming the field, the fix kept ------------------------------------------

def test_conf_errors_quote_a_prefix_and_keep_the_fix(airflow):
    with service(airflow.url) as stub:
        err = fails(stub, "StartTrainingJob", start(epochs="9" * 4000))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # before: all 4000 digits, and the cut at 2000 characters lost "Expected ..."
        assert err.details().startswith("epochs") and "(4000 chars)" in err.details()
        assert "Expected epochs (type integer, minimum 1, maximum 200)" in err.details()
        assert len(err.details()) < 500
        err = fails(stub, "StartTrainingJob", start(**{f"k{i}": "1" for i in range(3000)}))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "... and 2990 more" in err.details() and len(err.details()) < 1500
        err = fails(stub, "StartTrainingJob", start(**{"Batch-Size": "1"}))
        # before: "invalid trigger conf ...": the field was found for lower-case names only
        assert err.details().startswith("Batch-Size: "), err.details()
    assert not airflow.runs


def test_a_deeply_nested_conf_value_is_a_conf_error():
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    client = TrainingClient(ClientSettings(url="http://127.0.0.1:9"))
    with pytest.raises(ConfError, match="nested too deeply"):  # before: RecursionError
        client.build_conf("digits_smoke", conf={"lr": nested},
                          schemas=schemas_from_airflow(PARAMS))
    with pytest.raises(BadInput, match="dataset_query contains a NUL"):
        client.start("digits_smoke", dataset_query="select 1\x00")


# -- where the server listens ----------------------------------------------------------------------

def test_ipv6_hosts_listen_and_a_bad_host_is_bad_input():
    """Before: `--host ::1` or `--host ::` (no brackets) crashed with AttributeError while
    formatting a TLS message for a plaintext server."""
    server, port = make_server(ClientSettings(url="http://127.0.0.1:9"), "::1", 0)
    server.start()
    try:
        with grpc.insecure_channel(f"[::1]:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            err = fails(stub, "GetTrainingJobStatus", pb.GetTrainingJobStatusRequest(
                job_id="digits_smoke/arf__1"), metadata=None)  # loopback: anonymous served
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    finally:
        server.stop(0)
    server, port = make_server(ClientSettings(url="http://127.0.0.1:9"), "::", 0)
    server.stop(0)  # every interface: bound, and anonymous calls refused (test_grpc_server)
    with pytest.raises(BadInput, match="cannot listen on :0: gRPC refused the address"):
        make_server(ClientSettings(url="http://127.0.0.1:9"), "", 0)
