"""The gRPC TrainingService in-process on 127.0.0.1, in front of an Airflow that is not there:
who may call (anonymous callers, malformed authorization), TLS and mutual TLS, bad input caught
before any HTTP call (INVALID_ARGUMENT, not UNKNOWN or RESOURCE_EXHAUSTED), and an access log
that records the status code the caller got. An RPC that reached Airflow would be UNAVAILABLE."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from arf_training.cli import main
from arf_training.client import BadInput, ClientError, ClientSettings
from arf_training.grpc_service.gen import training_pb2 as pb
from arf_training.grpc_service.gen import training_pb2_grpc as pb_grpc
from arf_training.grpc_service.security import (TlsFiles, anonymous_allowed, is_loopback,
                                                startup_warnings)
from arf_training.grpc_service.server import make_server

AUTH = [("authorization", "Bearer some-caller-jwt")]
MB = 1024 * 1024


def unreachable_airflow() -> ClientSettings:
    with socket.socket() as sock:  # a port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ClientSettings(url=f"http://127.0.0.1:{port}", timeout_s=5)


@contextmanager
def running(settings: ClientSettings | None = None, *, anonymous: bool | None = False,
            tls: TlsFiles | None = None):
    """A server on 127.0.0.1; `anonymous=False` (the default here) makes it behave as one that
    listens beyond loopback, None lets it decide from its (loopback) host as `serve` does."""
    server, port = make_server(settings or unreachable_airflow(), "127.0.0.1", 0,
                               anonymous=anonymous, tls=tls)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def call(channel: grpc.Channel, method: str, request, metadata=AUTH) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        reply = getattr(pb_grpc.TrainingServiceStub(channel), method)(
            request, metadata=metadata, timeout=30)
        if method.startswith("Stream"):
            list(reply)
    return info.value


# -- who may call ---------------------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
    ("[2001:db8::1]", False), ("trainer.example.com", False), ("", False),
])
def test_loopback_rule(host, loopback):
    assert is_loopback(host) is loopback
    assert anonymous_allowed(host, allow_anonymous=False) is loopback
    assert anonymous_allowed(host, allow_anonymous=True) is True


def test_anonymous_call_refused_off_loopback(caplog):
    caplog.set_level(logging.INFO, logger="arf.grpc")
    job = pb.GetTrainingJobStatusRequest(job_id="digits_smoke/arf__1")
    with running(anonymous=False) as address, grpc.insecure_channel(address) as channel:
        err = call(channel, "GetTrainingJobStatus", job, metadata=None)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        assert "authorization" in err.details() and "--allow-anonymous" in err.details()
        # A malformed header is not treated as "no header" (= the server's own credentials).
        err = call(channel, "GetTrainingJobStatus", job,
                   metadata=[("authorization", "Basic dXNlcjpwdw==")])
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        # A caller with a token gets through to Airflow (which is down here).
        assert call(channel, "GetTrainingJobStatus", job).code() == grpc.StatusCode.UNAVAILABLE
    assert "GetTrainingJobStatus UNAUTHENTICATED" in caplog.text
    assert "dXNlcjpwdw" not in caplog.text and "some-caller-jwt" not in caplog.text


def test_anonymous_call_served_on_loopback():
    job = pb.GetTrainingJobStatusRequest(job_id="digits_smoke/arf__1")
    with running(anonymous=None) as address, grpc.insecure_channel(address) as channel:
        err = call(channel, "GetTrainingJobStatus", job, metadata=None)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()  # served: reached "Airflow"


def test_startup_warnings():
    [anon] = startup_warnings("127.0.0.1", allow_anonymous=True, tls=None)
    assert "--allow-anonymous" in anon and "start and cancel" in anon
    [plain] = startup_warnings("0.0.0.0", allow_anonymous=False, tls=None)
    assert "without TLS" in plain
    assert startup_warnings("0.0.0.0", False, TlsFiles(Path("c"), Path("k"))) == []
    assert startup_warnings("127.0.0.1", False, None) == []


def test_allow_anonymous_is_announced_by_the_server_process():
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "arf"), "serve", "grpc", "--port", "0",
         "--allow-anonymous", "--url", unreachable_airflow().url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "listening on 127.0.0.1:" in line and "anonymous calls served" in line, line + err
    assert "WARNING: --allow-anonymous" in err


# -- TLS --------------------------------------------------------------------------------------------

def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool = False, ip: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_name or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("pki")
    files = {}

    def write(name: str, cert, key=None) -> None:
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            files[f"{name}_key"] = folder / f"{name}.key"
            files[f"{name}_key"].write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("arf test CA", None, None, ca_key, ca=True)
    write("ca", ca)
    for name, ip in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, _cert(f"arf test {name}", ca_key, ca.subject, key, ip=ip), key)
    return files


def tls_channel(address: str, pki: dict[str, Path], client_cert: bool = False) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes() if client_cert else None,
        certificate_chain=pki["client"].read_bytes() if client_cert else None)
    return grpc.secure_channel(address, creds)


BAD_JOB = pb.GetTrainingJobStatusRequest(job_id="nonsense")  # INVALID_ARGUMENT from the service


def test_tls_server_refuses_plaintext_and_serves_tls(pki):
    tls = TlsFiles(pki["server"], pki["server_key"])
    with running(tls=tls) as address:
        with grpc.insecure_channel(address) as plain:
            err = call(plain, "GetTrainingJobStatus", BAD_JOB)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        with tls_channel(address, pki) as channel:  # the service answers: the channel works
            err = call(channel, "GetTrainingJobStatus", BAD_JOB)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert "TEMPLATE/RUN_ID" in err.details()


def test_mutual_tls_requires_a_client_certificate(pki):
    tls = TlsFiles(pki["server"], pki["server_key"], client_ca=pki["ca"])
    with running(tls=tls) as address:
        with tls_channel(address, pki, client_cert=False) as channel:
            err = call(channel, "GetTrainingJobStatus", BAD_JOB)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        with tls_channel(address, pki, client_cert=True) as channel:
            err = call(channel, "GetTrainingJobStatus", BAD_JOB)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


def test_tls_flags_checked_at_startup(tmp_path, capsys, pki):
    with pytest.raises(BadInput, match="--tls-key is missing"):
        TlsFiles.from_flags("cert.pem", None, None)
    with pytest.raises(BadInput, match="--tls-cert is missing"):
        TlsFiles.from_flags(None, None, "ca.pem")
    der = tmp_path / "cert.der"
    der.write_bytes(b"\x30\x82binary")
    with pytest.raises(BadInput, match=r"--tls-cert .*cert.der is not PEM"):
        TlsFiles(der, der).credentials()
    with pytest.raises(BadInput, match=r"--tls-key .*missing.key: cannot read it"):
        TlsFiles(pki["server"], tmp_path / "missing.key").credentials()
    with pytest.raises(ClientError, match="cannot listen on 127.0.0.1:0 with TLS"):
        make_server(unreachable_airflow(), "127.0.0.1", 0,  # the client's key, not the server's
                    tls=TlsFiles(pki["server"], pki["client_key"]))
    code = main(["serve", "grpc", "--port", "0", "--tls-cert", str(der)])
    assert code == 2 and "--tls-key is missing" in capsys.readouterr().err


# -- bad input: INVALID_ARGUMENT before any HTTP call, short messages ------------------------------

@pytest.mark.parametrize("request_fields, field", [
    pytest.param({"status": 99}, "status", id="status-99"),
    pytest.param({"limit": -1}, "limit", id="limit-negative"),
    pytest.param({"limit": 10**6}, "limit", id="limit-huge"),
    pytest.param({"training_script_plugin": "x" * MB}, "template", id="template-1MB"),
])
def test_list_bad_input_is_invalid_argument_and_logged_so(caplog, request_fields, field):
    caplog.set_level(logging.INFO, logger="arf.grpc")
    with running() as address, grpc.insecure_channel(address) as channel:
        err = call(channel, "ListTrainingJobs", pb.ListTrainingJobsRequest(**request_fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(field) and len(err.details()) < 500
    assert "ListTrainingJobs INVALID_ARGUMENT" in caplog.text
    assert "ListTrainingJobs OK" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("method, message, field", [
    pytest.param("StartTrainingJob", pb.StartTrainingJobRequest(
        training_script_plugin="t" * MB), "template", id="template"),
    pytest.param("StartTrainingJob", pb.StartTrainingJobRequest(
        training_script_plugin="digits_smoke", hyperparameters={"lr": "1" * MB}), "lr",
        id="hyperparameter-value"),
    pytest.param("StartTrainingJob", pb.StartTrainingJobRequest(
        training_script_plugin="digits_smoke", hyperparameters={"n" * MB: "1"}),
        "hyperparameter name", id="hyperparameter-name"),
    pytest.param("StartTrainingJob", pb.StartTrainingJobRequest(
        training_script_plugin="digits_smoke", display_name="d" * MB), "display_name",
        id="display-name"),
    pytest.param("StartTrainingJob", pb.StartTrainingJobRequest(
        training_script_plugin="digits_smoke", base_model_plugin="b" * MB),
        "base_model_plugin", id="base-model"),
    pytest.param("GetTrainingJobStatus", pb.GetTrainingJobStatusRequest(job_id="j" * MB),
                 "job_id", id="job-id"),
    pytest.param("CancelTrainingJob", pb.CancelTrainingJobRequest(job_id="t/" + "r" * MB),
                 "job_id", id="cancel-job-id"),
    pytest.param("StreamTrainingJobLogs", pb.StreamTrainingJobLogsRequest(
        job_id="digits_smoke/arf__1", task="t" * MB), "task", id="log-task"),
])
def test_oversized_input_is_refused_with_a_short_message(caplog, method, message, field):
    caplog.set_level(logging.INFO, logger="arf.grpc")
    with running() as address, grpc.insecure_channel(address) as channel:
        err = call(channel, method, message)
    assert f"{method} INVALID_ARGUMENT" in caplog.text
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details()[:200])
    assert err.details().startswith(field), err.details()[:200]
    assert len(err.details()) < 500


def test_unexpected_error_is_internal_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="arf.grpc")
    # A setting no code path checks: urllib3 raises ValueError, which is no ClientError.
    broken = ClientSettings(url=unreachable_airflow().url, timeout_s=-1)
    with running(broken, anonymous=True) as address, grpc.insecure_channel(address) as channel:
        err = call(channel, "GetTrainingJobStatus",
                   pb.GetTrainingJobStatusRequest(job_id="digits_smoke/arf__1"), metadata=None)
    assert err.code() == grpc.StatusCode.INTERNAL, err.details()
    assert "its log has the details" in err.details()
    assert "GetTrainingJobStatus INTERNAL" in caplog.text and "Traceback" in caplog.text
