"""A `federated:` template on the Kubernetes backend: the DAG, the site prepare Pods, and the
federate task's objects (Service, SuperNode Pods, SuperLink Pod) from creation to clean-up.

The provider's KubernetesPodOperator runs for real; the Kubernetes API is `fake_k8s` (the only
fake), where the test plays the kubelet: it starts pods and ends them with an exit code.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import kubernetes_validate
import pytest
from airflow.sdk.exceptions import AirflowException
from fake_k8s import FakeCluster, install
from test_k8s_render import K8S_VERSIONS
from test_kubernetes_backend import NAMESPACE, context, k8s_dags, k8s_env  # noqa: F401 (fixtures)

DAG_ID = "reach_bc_federated"
SITES = ["north", "south", "west"]
ROLE = "arf.dev/federation-role"
XCOM_RESULT = "/airflow/xcom/return.json"


def _metadata(index: int, site: str) -> dict[str, Any]:
    """A site's manifest metadata, as its prepare reports it (arf_trainer.datahub.prepare);
    different per site, so that a mix-up shows."""
    names = [f"obs_{i}" for i in range(10)] + ["act_0", "act_1"]
    return {"features": names[:10], "targets": names[10:],
            "columns": [{"name": n, "type": "float", "dtype": "float32", "shape": []}
                        for n in names],
            "rows": 500 + index, "train_rows": 450 + index, "val_rows": 50,
            "tables": {"reach_demos": {"version": index}}, "fingerprint": f"sha-{site}"}


def _prepared(sites: list[str] = SITES) -> list[dict[str, Any]]:
    """The mapped prepare_data XComs: `SitePod`'s result, the site's name plus its step's."""
    return [{"site": s, "rows": 500 + i, "fingerprint": f"sha-{s}", "reused": False,
             "manifest": f"/site/{DAG_ID}/run/prepare/manifest.json",
             "manifest_metadata": _metadata(i, s)} for i, s in enumerate(sites)]


def _context(dag, task_id: str, *, try_number: int = 1, map_index: int = -1,
             prepared: Any = "all") -> dict[str, Any]:
    ctx = context(dag, task_id, try_number=try_number)
    ctx["ti"].map_index = map_index
    ctx["ti"].xcom_push = lambda key, value: None  # the pod's name, pushed by the provider
    prepared = _prepared() if prepared == "all" else prepared
    pulls: list[dict[str, Any]] = []
    ctx["ti"].pulls = pulls

    def xcom_pull(task_ids=None, **kwargs):
        # Airflow's xcom_pull for a mapped task: every instance's value in a list, or a lone
        # one bare, or None when there is none.
        pulls.append({"task_ids": task_ids, **kwargs})
        return prepared if task_ids == "prepare_data" and not kwargs else None

    ctx["ti"].xcom_pull = xcom_pull
    return ctx


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _claims(pod: dict[str, Any]) -> list[str]:
    return [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v]


def _role(cluster: FakeCluster, name: str) -> str | None:
    pod = cluster.pods.get((NAMESPACE, name))
    return pod.metadata.labels.get(ROLE) if pod else None


def _created(cluster: FakeCluster, role: str) -> list[dict[str, Any]]:
    return [p for p in cluster.created_pods if p["metadata"]["labels"].get(ROLE) == role]


def _federate(k8s_dags, min_sites: int | None = None):
    """The DAG and its federate task, as Airflow builds it for each try (nothing carried over
    in memory); `min_sites` replaces the template's `federated.min_sites` (2 of 3 sites)."""
    dag = k8s_dags[DAG_ID]
    task = dag.get_task("federate")
    loaded = task.loaded
    if min_sites is not None:
        federated = loaded.template.federated.model_copy(update={"min_sites": min_sites})
        loaded = dataclasses.replace(loaded, template=loaded.template.model_copy(
            update={"federated": federated}))
    fresh = type(task)(task_id=task.task_id, loaded=loaded, namespace=NAMESPACE, node_poll_s=0)
    return dag, fresh


class Kubelet:
    """Starts every pod it is asked about; ends the SuperLink after `link_reads` reads while
    it runs, with `link_exit` (and the result in its xcom volume); `on_running` is called with
    each pod's name at each read once it runs (a test's hook: fail a node, kill the task)."""

    def __init__(self, link_exit: int = 0, link_reads: int = 4, on_running=None):
        self.link_exit, self.link_reads, self.on_running = link_exit, link_reads, on_running
        self.reads: collections.Counter = collections.Counter()
        self.result = {"mlflow_run_id": "run-1", "weights": "train/model.pt",
                       "federated": {"rounds": 30}}

    def __call__(self, cluster: FakeCluster, namespace: str, name: str) -> None:
        pod = cluster.pods.get((namespace, name))
        if pod is None or pod.status.phase in ("Succeeded", "Failed"):
            return
        if pod.status.phase == "Pending":
            cluster.start_pod(namespace, name)
            return
        if self.on_running is not None:
            self.on_running(cluster, name)
        if _role(cluster, name) != "superlink" or name not in [n for (_, n) in cluster.pods]:
            return
        self.reads[name] += 1
        if self.reads[name] == self.link_reads:
            if self.link_exit == 0:
                cluster.finish_with_result(namespace, name, 0, json.dumps(self.result),
                                           log="round 30: loss 0.01\n")
            else:
                cluster.finish_pod(namespace, name, self.link_exit, log="ServerApp failed\n")


# --- the DAG ----------------------------------------------------------------------------------


def test_the_federated_dag_is_built_on_kubernetes(k8s_dags):
    from arf_training.backends.kubernetes import StepPodOperator
    from arf_training.backends.kubernetes_federated import FederateOperator, SitePodOperator

    dag = k8s_dags[DAG_ID]
    assert set(dag.task_ids) == {"prepare_data", "federate", "register_model"}
    prepare = dag.get_task("prepare_data")
    assert prepare.operator_class is SitePodOperator
    assert prepare.expand_input.value == {"site": SITES}  # one mapped instance per site
    assert prepare.partial_kwargs["namespace"] == NAMESPACE
    federate = dag.get_task("federate")
    assert isinstance(federate, FederateOperator) and federate.deferrable is False
    assert federate.upstream_task_ids == {"prepare_data"}
    register = dag.get_task("register_model")
    assert isinstance(register, StepPodOperator) and register.upstream_task_ids == {"federate"}
    assert [o.uri.rstrip("/") for o in register.outlets] == [
        "arf-model://reach_bc_federated_policy"]


# --- the site prepare -------------------------------------------------------------------------


@pytest.mark.parametrize("index, site", list(enumerate(SITES)))
def test_a_site_task_runs_its_own_sites_pod_only(k8s_dags, monkeypatch, index, site):
    from arf_training.backends.kubernetes_federated import SitePodOperator

    cluster = install(monkeypatch, FakeCluster())
    result = {"rows": 100 + index, "fingerprint": f"sha-{site}"}

    def kubelet(cluster, namespace, name):
        if cluster.pods[(namespace, name)].status.phase == "Pending":
            cluster.finish_with_result(namespace, name, 0, json.dumps(result))

    cluster.kubelet = kubelet
    dag = k8s_dags[DAG_ID]
    partial = dag.get_task("prepare_data").partial_kwargs
    task = SitePodOperator(task_id="prepare_data", loaded=partial["loaded"], site=site,
                           namespace=NAMESPACE, deferrable=False)
    assert task.execute(_context(dag, "prepare_data", map_index=index)) == {"site": site,
                                                                           **result}
    (pod,) = cluster.created_pods
    assert pod["metadata"]["labels"]["arf.dev/site"] == site
    assert _claims(pod) == [f"arf-site-{site}"]  # no workspace, no other site, no shared hub
    env = _env(pod["spec"]["containers"][0])
    assert env["ARF_DATAHUB_URI"] == f"/site/sites/{site}/datahub"
    assert env["ARF_RESULT_PATH"] == XCOM_RESULT
    job = json.loads(env["ARF_JOB_SPEC_JSON"])
    assert [s["name"] for s in job["template"]["federated"]["sites"]] == [site]
    for version in K8S_VERSIONS:
        assert kubernetes_validate.validate(pod, version, strict=True) == version
    assert cluster.pods == {}  # succeeded: deleted, as any step pod


# --- the federation ---------------------------------------------------------------------------


def test_federate_runs_the_superlink_and_cleans_up(k8s_dags, monkeypatch):
    cluster = install(monkeypatch, FakeCluster())
    kubelet = cluster.kubelet = Kubelet()
    dag, task = _federate(k8s_dags)
    assert task.execute(_context(dag, "federate")) == {**kubelet.result, "lost_sites": {}}

    (link,) = _created(cluster, "superlink")
    nodes = _created(cluster, "supernode")
    assert [n["metadata"]["labels"]["arf.dev/site"] for n in nodes] == SITES
    for node, site in zip(nodes, SITES):
        assert _claims(node) == [f"arf-site-{site}"]
    # The Service and the SuperNodes exist before the SuperLink, whose Service selects it.
    creates = [c[1:] for c in cluster.verbs("create")]
    service = creates[0][2]
    assert creates == [("services", NAMESPACE, service),
                       *[("pods", NAMESPACE, n["metadata"]["name"]) for n in nodes],
                       ("pods", NAMESPACE, link["metadata"]["name"])]
    selector = {"arf.dev/federation": service, ROLE: "superlink"}
    assert selector.items() <= link["metadata"]["labels"].items()
    assert _env(link["spec"]["containers"][0])["ARF_RESULT_PATH"] == XCOM_RESULT
    for version in K8S_VERSIONS:
        for pod in (link, *nodes):
            assert kubernetes_validate.validate(pod, version, strict=True) == version
    # SuperNodes and Service deleted; the SuperLink succeeded, so it is deleted too.
    assert cluster.pods == {} and cluster.services == {}
    assert kubelet.reads[link["metadata"]["name"]] >= kubelet.link_reads


def test_the_superlink_job_spec_carries_every_sites_manifest_metadata(k8s_dags, monkeypatch):
    from arf_trainer.federated.launch import site_dirs
    from arf_trainer.federated.manifests import lineage
    from arf_trainer.spec import StepEnv

    cluster = install(monkeypatch, FakeCluster())
    cluster.kubelet = Kubelet()
    dag, task = _federate(k8s_dags)
    # In another order than the sites (map indexes finish in any order): matched by name.
    ctx = _context(dag, "federate", prepared=list(reversed(_prepared())))
    task.execute(ctx)
    assert ctx["ti"].pulls == [{"task_ids": "prepare_data"}]

    (link,) = _created(cluster, "superlink")
    env = _env(link["spec"]["containers"][0])
    job = json.loads(env["ARF_JOB_SPEC_JSON"])
    assert job["inputs"]["sites"] == [{"name": s, "manifest": _metadata(i, s)}
                                      for i, s in enumerate(SITES)]
    # Only the metadata crosses: not the site's prepare result or its folder.
    assert "/site/" not in env["ARF_JOB_SPEC_JSON"]
    # What the SuperLink's `arf-trainer federate` makes of it (it mounts no site claim).
    step = StepEnv.from_environ({**env, "ARF_TRACKING_URI": "sqlite:///unused.db"})
    assert lineage(site_dirs(step)) == {
        s: {"tables": {"reach_demos": i}, "fingerprint": f"sha-{s}", "train_rows": 450 + i,
            "val_rows": 50} for i, s in enumerate(SITES)}
    # The SuperNodes get no job spec at all (their sites' data is mounted).
    for node in _created(cluster, "supernode"):
        assert "ARF_JOB_SPEC_JSON" not in _env(node["spec"]["containers"][0])


def _without_south_metadata() -> list[dict[str, Any]]:
    results = _prepared()
    del results[1]["manifest_metadata"]
    return results


def _south_metadata_without_targets() -> list[dict[str, Any]]:
    results = _prepared()
    del results[1]["manifest_metadata"]["targets"]
    return results


@pytest.mark.parametrize("prepared, site, why", [
    (_prepared(["north", "west"]), "south", "has no result"),
    (None, "north", "has no result"),  # no site's XCom at all
    (_prepared(["south"])[0], "north", "has no result"),  # a lone XCom comes back bare
    (_without_south_metadata(), "south", "has no manifest metadata .*an older arf-trainer"),
    (_south_metadata_without_targets(), "south",
     r"has manifest metadata without \['targets'\]"),
])
def test_a_missing_site_result_fails_the_task_naming_the_site(k8s_dags, monkeypatch, prepared,
                                                              site, why):
    from airflow.sdk.exceptions import AirflowFailException

    cluster = install(monkeypatch, FakeCluster())
    cluster.kubelet = Kubelet()
    dag, task = _federate(k8s_dags)
    # Not retried (another try reads the same XComs): clearing prepare_data is the fix.
    with pytest.raises(AirflowFailException,
                       match=rf"prepare_data task of site '{site}' \(map index "
                             rf"{SITES.index(site)}\) {why}.*Clear prepare_data for site "
                             rf"'{site}'"):
        task.execute(_context(dag, "federate", prepared=prepared))
    assert not cluster.verbs("create")  # failed before creating anything


def test_a_failed_superlink_fails_the_task_and_still_cleans_up(k8s_dags, monkeypatch):
    cluster = install(monkeypatch, FakeCluster())
    cluster.kubelet = Kubelet(link_exit=1)
    dag, task = _federate(k8s_dags)
    with pytest.raises(AirflowException, match="returned a failure"):
        task.execute(_context(dag, "federate"))
    (link,) = _created(cluster, "superlink")
    # Only the failed SuperLink is kept (for `kubectl`), as any failed step pod.
    assert list(cluster.pods) == [(NAMESPACE, link["metadata"]["name"])]
    assert cluster.services == {}


def test_on_kill_deletes_the_federation(k8s_dags, monkeypatch):
    cluster = install(monkeypatch, FakeCluster())
    dag, task = _federate(k8s_dags)
    killed: list[bool] = []

    def on_running(cluster, name):
        if _role(cluster, name) == "superlink" and not killed:
            killed.append(True)
            task.on_kill()  # Airflow's task runner, on SIGTERM

    cluster.kubelet = Kubelet(link_reads=10_000, on_running=on_running)
    with pytest.raises(Exception):  # noqa: B017 (whatever the next read meets: all is gone)
        task.execute(_context(dag, "federate"))
    assert killed
    assert cluster.pods == {} and cluster.services == {}
    (link,) = _created(cluster, "superlink")
    assert ("delete", "pods", NAMESPACE, link["metadata"]["name"]) in cluster.calls


def _leave(cluster: FakeCluster, service: dict[str, Any] | None, pods: list[dict[str, Any]],
           phase: str) -> None:
    """Objects as a try whose worker died would leave them (created, never cleaned up)."""
    if service is not None:
        cluster.create_service(AirflowException, NAMESPACE, service)
    for pod in pods:
        cluster.create_pod(AirflowException, NAMESPACE, pod)
        if phase == "Running":
            cluster.start_pod(NAMESPACE, pod["metadata"]["name"])
        else:
            cluster.finish_pod(NAMESPACE, pod["metadata"]["name"], 1)


def test_a_retry_replaces_what_an_earlier_try_left(k8s_dags, monkeypatch):
    cluster = install(monkeypatch, FakeCluster())
    dag, task = _federate(k8s_dags)
    first = task.render_federation(_context(dag, "federate", try_number=1))
    _leave(cluster, first[0], first[1:], "Running")
    cluster.calls.clear()
    cluster.kubelet = Kubelet()
    _, fresh = _federate(k8s_dags)
    assert fresh.execute(_context(dag, "federate", try_number=2))["mlflow_run_id"] == "run-1"
    old = {m["metadata"]["name"] for m in first}
    new = {p["metadata"]["name"] for p in cluster.created_pods[len(first) - 1:]}
    assert not old & new  # per try names
    deleted = {c[3] for c in cluster.verbs("delete")}
    assert old <= deleted  # the Service, the SuperNodes and the running SuperLink of try 1
    assert cluster.pods == {} and cluster.services == {}


def test_the_same_try_started_again_reuses_or_replaces_its_objects(k8s_dags, monkeypatch):
    cluster = install(monkeypatch, FakeCluster())
    dag, task = _federate(k8s_dags)
    ctx = _context(dag, "federate", try_number=2)
    service, link, *nodes = task.render_federation(ctx)
    _leave(cluster, service, [nodes[0]], "Running")
    _leave(cluster, None, [nodes[1]], "Failed")
    cluster.calls.clear()
    cluster.kubelet = Kubelet()
    _, fresh = _federate(k8s_dags)
    assert fresh.execute(ctx)["mlflow_run_id"] == "run-1"
    created = collections.Counter(c[3] for c in cluster.verbs("create"))
    running, finished, untouched = (n["metadata"]["name"] for n in nodes)
    # Reused: one refused create (409), never deleted before the end; replaced: deleted, then
    # created again; never two of one name.
    assert created[running] == 1 and created[service["metadata"]["name"]] == 1
    assert created[finished] == 2 and created[untouched] == 1
    deletes = [c[3] for c in cluster.verbs("delete")]
    assert deletes.count(finished) == 2 and deletes.count(running) == 1
    assert cluster.pods == {} and cluster.services == {}
