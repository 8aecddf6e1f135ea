"""Lost SuperNodes of a federate task on the Kubernetes backend: above `federated.min_sites`
the rounds go on without the site (its pod logged and deleted, `lost_sites` in the result);
below it, or when a lost one never started, the task fails at once naming the sites.

As in test_k8s_federated_operators: the provider's KubernetesPodOperator runs for real and the
Kubernetes API is `fake_k8s`, where the test plays the kubelet.
"""

from __future__ import annotations

import collections
import re

import pytest
from airflow.sdk.exceptions import AirflowException
from fake_k8s import FakeCluster, install
from test_k8s_federated_operators import SITES, Kubelet, _context, _created, _federate, _role
from test_kubernetes_backend import NAMESPACE, context, k8s_dags, k8s_env  # noqa: F401 (fixtures)

from arf_training.errors import StepFailed


def _fail(cluster: FakeCluster, name: str, how: str) -> None:
    if how == "failed":
        cluster.finish_pod(NAMESPACE, name, 1, reason="DeadlineExceeded")
    elif how == "crash-looping":
        cluster.start_pod(NAMESPACE, name, restart_count=4)
    else:
        cluster.pods.pop((NAMESPACE, name))


LOST = {"failed": r"the pod failed \(DeadlineExceeded; exit code 1\)",
        "crash-looping": r"it crashed 4 times \(last exit code 1\)",
        "deleted": r"its pod was deleted"}


class Breaker:
    """`Kubelet`'s `on_running` hook: loses the SuperNode of each site of `at` ({site: n}) `how`
    at the n-th read of it while it runs, after writing a last line into its log."""

    def __init__(self, how: str, at: dict[str, int]):
        self.how, self.at = how, at
        self.reads: collections.Counter = collections.Counter()
        self.broken: dict[str, str] = {}  # site -> its SuperNode pod's name

    def __call__(self, cluster: FakeCluster, name: str) -> None:
        site = cluster.pods[(NAMESPACE, name)].metadata.labels.get("arf.dev/site")
        if _role(cluster, name) != "supernode" or site not in self.at or site in self.broken:
            return
        self.reads[site] += 1
        if self.reads[site] == self.at[site]:
            self.broken[site] = name
            _fail(cluster, name, self.how)
            if (NAMESPACE, name) in cluster.pods:
                cluster.logs[(NAMESPACE, name)] = f"site {site}: CUDA error, giving up\n".encode()


@pytest.mark.parametrize("how", ["failed", "crash-looping", "deleted"])
def test_a_lost_supernode_is_deleted_and_the_federation_goes_on_above_min_sites(
        k8s_dags, monkeypatch, capsys, how):
    cluster = install(monkeypatch, FakeCluster())
    breaker = Breaker(how, {"south": 1})
    kubelet = cluster.kubelet = Kubelet(link_reads=10, on_running=breaker)
    dag, task = _federate(k8s_dags)  # 3 sites, min_sites 2
    result = task.execute(_context(dag, "federate"))

    # The SuperLink's outcome decides; its result names the lost site and why.
    assert {k: v for k, v in result.items() if k != "lost_sites"} == kubelet.result
    assert list(result["lost_sites"]) == ["south"]
    assert re.fullmatch(LOST[how], result["lost_sites"]["south"])
    name = breaker.broken["south"]
    out = capsys.readouterr().out
    assert re.search(rf"the SuperNode of site 'south' \(pod {NAMESPACE}/{name}\) is lost: "
                     rf"{LOST[how]}", out)
    if how != "deleted":  # the pod's last log lines, read before it is deleted
        assert f"[{name}] site south: CUDA error, giving up" in out
    assert "the federation finished without the sites it lost: 'south'" in out
    # Deleted at once, while the SuperLink went on (before its result was read).
    calls = cluster.calls
    (link,) = _created(cluster, "superlink")
    assert calls.index(("delete", "pods", NAMESPACE, name)) < calls.index(
        ("exec", "pods", NAMESPACE, link["metadata"]["name"], "airflow-xcom-sidecar"))
    assert cluster.pods == {} and cluster.services == {}


def test_supernodes_lost_below_min_sites_fail_the_task_at_once_naming_them(
        k8s_dags, monkeypatch, capsys):
    cluster = install(monkeypatch, FakeCluster())
    breaker = Breaker("crash-looping", {"south": 1, "west": 3})  # in two different reads
    # The SuperLink would finish late: the task must not wait for it.
    kubelet = cluster.kubelet = Kubelet(link_reads=10_000, on_running=breaker)
    dag, task = _federate(k8s_dags)  # 3 sites, min_sites 2
    with pytest.raises(StepFailed, match=r"site 'south' \(pod .*site 'west' \(pod .*\. 1 of 3 "
                                         r"sites remain, fewer than federated.min_sites=2"):
        task.execute(_context(dag, "federate"))
    out = capsys.readouterr().out
    for site in ("south", "west"):
        assert f"the SuperNode of site '{site}' (pod {NAMESPACE}/{breaker.broken[site]})" in out
    assert max(kubelet.reads.values()) < 100
    assert cluster.pods == {} and cluster.services == {}


@pytest.mark.parametrize("how", ["failed", "crash-looping", "deleted"])
def test_a_lost_supernode_fails_the_task_at_once_when_every_site_is_needed(
        k8s_dags, monkeypatch, how):
    cluster = install(monkeypatch, FakeCluster())
    breaker = Breaker(how, {"south": 1})
    kubelet = cluster.kubelet = Kubelet(link_reads=10_000, on_running=breaker)
    dag, task = _federate(k8s_dags, min_sites=len(SITES))
    with pytest.raises(StepFailed, match=rf"site 'south' \(pod {NAMESPACE}/.*{LOST[how]}.*2 of "
                                         rf"3 sites remain, fewer than federated.min_sites=3"):
        task.execute(_context(dag, "federate"))
    with pytest.raises(StepFailed, match=breaker.broken["south"]):
        raise task.pod_operator().wait_error
    assert max(kubelet.reads.values()) < 100
    # Everything deleted: the SuperLink too (it cannot finish without the site).
    assert cluster.pods == {} and cluster.services == {}


def test_a_supernode_that_never_started_fails_the_task_at_once(k8s_dags, monkeypatch):
    cluster = install(monkeypatch, FakeCluster())
    kubelet = Kubelet(link_reads=10_000)

    def bad_image_in_south(cluster, namespace, name):
        pod = cluster.pods.get((namespace, name))
        if pod is not None and _role(cluster, name) == "supernode" \
                and pod.metadata.labels["arf.dev/site"] == "south":
            cluster.stall_pod(namespace, name, "ErrImagePull", "manifest unknown")
        else:
            kubelet(cluster, namespace, name)

    cluster.kubelet = bad_image_in_south
    dag, task = _federate(k8s_dags)  # min_sites 2 would allow one site fewer, but not in round 1
    with pytest.raises(StepFailed, match=r"site 'south' .*Image cannot be pulled, unable to "
                                         r"start: ErrImagePull manifest unknown\. Site\(s\) "
                                         r"\['south'\] never started, and the SuperLink starts "
                                         r"round 1 only with every site"):
        task.execute(_context(dag, "federate"))
    assert max(kubelet.reads.values()) < 100
    assert cluster.pods == {} and cluster.services == {}


def test_a_failed_superlink_after_a_lost_site_fails_the_task_naming_it(k8s_dags, monkeypatch,
                                                                         capsys):
    cluster = install(monkeypatch, FakeCluster())
    cluster.kubelet = Kubelet(link_exit=1, link_reads=10,
                              on_running=Breaker("crash-looping", {"south": 1}))
    dag, task = _federate(k8s_dags)
    with pytest.raises(AirflowException, match="returned a failure"):
        task.execute(_context(dag, "federate"))
    assert "the SuperLink failed after losing the SuperNodes of sites ['south']" in \
        capsys.readouterr().out
    (link,) = _created(cluster, "superlink")
    assert list(cluster.pods) == [(NAMESPACE, link["metadata"]["name"])]
    assert cluster.services == {}


def test_a_supernode_that_does_not_start_in_time_is_lost(k8s_dags, monkeypatch):
    """Pending with nothing in its status that says why (a Secret or claim it mounts is
    missing, no node has room): after the start timeout it is lost, and as it never joined,
    round 1 could not start: the task fails at once instead of waiting out the round timeout."""
    cluster = install(monkeypatch, FakeCluster())
    kubelet = Kubelet(link_reads=10_000)

    def south_never_starts(cluster, namespace, name):
        pod = cluster.pods.get((namespace, name))
        if pod is not None and _role(cluster, name) == "supernode" \
                and pod.metadata.labels["arf.dev/site"] == "south":
            cluster.stall_pod(namespace, name, "ContainerCreating")
        else:
            kubelet(cluster, namespace, name)

    cluster.kubelet = south_never_starts
    dag, task = _federate(k8s_dags)
    task.pod_operator().startup_timeout_seconds = 0.5
    with pytest.raises(StepFailed, match=r"site 'south' \(pod .*\): it did not start within 0.5 s "
                                         r"\(phase Pending, ContainerCreating\): `kubectl "
                                         r"describe pod .*Site\(s\) \['south'\] never started"):
        task.execute(_context(dag, "federate"))
    assert cluster.pods == {} and cluster.services == {}
