"""Submission latency of training jobs against a real Airflow 3 (api-server, scheduler,
dag-processor, triggerer; LocalExecutor, SQLite) started on a free port with this repo's DAGs.

    (a) `arf training start digits_smoke --set epochs=1` as a process -> it has printed the job
        id (the DAG run exists); includes the Python start-up and the imports of the CLI
    (b) the same start -> the first task (prepare_data) is running (scheduler + executor)
    (c) a gRPC StartTrainingJob round trip from a client with an open channel (`arf serve grpc`)

plus, for reference, (a') `TrainingClient.start` in-process (what (a) costs without start-up).
Each job is cancelled once its first task runs (or at once for (c)), so runs never queue up
behind one another. Prints median and p95 of each over N submissions (default 20). The platform's
target is under 5 s per submission; the goal here is under 1 s for (a) and (c).

    .venv/bin/python bench/submit_latency.py [-n 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests" / "integration"))


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def line(label: str, values: list[float]) -> str:
    return (f"{label:58} median {statistics.median(values):6.3f} s   p95 {p95(values):6.3f} s   "
            f"(n={len(values)}, min {min(values):.3f}, max {max(values):.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="submissions per measurement")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="arf-bench-submit-"))
    os.environ["ARF_HOME"] = str(home)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from airflow_procs import AirflowProcesses

    from arf_training.client import TrainingClient
    from arf_training.settings import ArfSettings

    subprocess.run([str(BIN / "arf-trainer"), "datahub", "seed", "--hub", str(home / "datahub"),
                    "--episodes", "20"], check=True, capture_output=True)
    base = ArfSettings.from_env()
    (home / "stack").mkdir()
    stack = AirflowProcesses(ArfSettings(home=home / "stack", tracking_uri=base.tracking_uri,
                                         datahub_uri=base.datahub_uri,
                                         artifact_root=base.artifact_root))
    grpc_proc = None
    try:
        stack.start()
        stack.wait_for_dags(["digits_smoke"])
        client = TrainingClient(stack.client_settings())
        env = stack.client_env()

        def cancel(job_id: str) -> None:
            try:
                client.cancel(job_id)
            except Exception:  # noqa: BLE001 - already finished is fine here
                pass

        def wait_idle() -> None:
            # No run of an earlier round still holds the executor.
            deadline = time.monotonic() + 120
            while client.list(template="digits_smoke", state="running", limit=10) or \
                    client.list(template="digits_smoke", state="queued", limit=10):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)

        cli_created, first_running, in_process = [], [], []
        for i in range(args.n):
            wait_idle()
            t0 = time.perf_counter()
            out = subprocess.run([str(BIN / "arf"), "training", "start", "digits_smoke", "--set",
                                  "epochs=1"], env=env, capture_output=True, text=True)
            created = time.perf_counter() - t0
            if out.returncode != 0:
                raise SystemExit(f"arf training start failed: {out.stderr}")
            job_id = out.stdout.strip()
            cli_created.append(created)
            template, run_id = job_id.split("/", 1)
            while True:
                states = client.task_states(template, run_id)
                if any(s not in ("none", "scheduled", "queued") for s in states.values()):
                    first_running.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > 120:
                    raise SystemExit(f"{job_id}: no task started within 120 s: {states}")
                time.sleep(0.05)
            cancel(job_id)
            t0 = time.perf_counter()
            job = client.start("digits_smoke", sets={"epochs": "1"})
            in_process.append(time.perf_counter() - t0)
            cancel(job.job_id)
            print(f"  round {i + 1}/{args.n}: CLI {created:.3f} s, first task running "
                  f"{first_running[-1]:.3f} s, in-process {in_process[-1]:.3f} s", flush=True)

        import grpc

        from arf_training.grpc_service.gen import training_pb2 as pb
        from arf_training.grpc_service.gen import training_pb2_grpc as pb_grpc

        grpc_proc = subprocess.Popen([str(BIN / "arf"), "serve", "grpc", "--port", "0"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        address = grpc_proc.stdout.readline().split("listening on ", 1)[1].split()[0]
        grpc_rtt = []
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            stub.ListTrainingJobs(pb.ListTrainingJobsRequest(limit=1))  # open the channel
            for i in range(args.n):
                wait_idle()
                t0 = time.perf_counter()
                reply = stub.StartTrainingJob(pb.StartTrainingJobRequest(
                    training_script_plugin="digits_smoke", display_name=f"bench {i}",
                    hyperparameters={"epochs": "1"}))
                grpc_rtt.append(time.perf_counter() - t0)
                stub.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id=reply.job_id))

        print()
        print(f"submission latency, {args.n} submissions each (Airflow {stack.url}, LocalExecutor, "
              "SQLite; target < 5 s, goal < 1 s for a and c)")
        print(line("(a)  CLI `arf training start` -> DAG run created", cli_created))
        print(line("(a') TrainingClient.start in-process -> DAG run created", in_process))
        print(line("(b)  CLI start -> first task running", first_running))
        print(line("(c)  gRPC StartTrainingJob round trip", grpc_rtt))
        print(json.dumps({"cli_created": cli_created, "in_process": in_process,
                          "first_task_running": first_running, "grpc": grpc_rtt}))
        return 0
    finally:
        if grpc_proc is not None:
            os.killpg(grpc_proc.pid, signal.SIGTERM)
            grpc_proc.wait(timeout=20)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
