"""The Service and SuperNode Pods of a federate task on Kubernetes (`Federation`), and what a
SuperNode's pod status says (`supernode_failure`, `supernode_started`).

A SuperNode lost for good (its pod failed, cannot pull its image, crash-loops, vanished, or
did not start within the start timeout) is logged with its last log lines and deleted; the
rounds go on without its site unless fewer than `federated.min_sites` remain or it never
started (round 1 waits for every site): then `check_nodes` fails the task at once.
`kubernetes_federated_pods.SuperLinkPod` drives it around the SuperLink's own pod.
"""

from __future__ import annotations

import time
from typing import Any

from airflow.providers.cncf.kubernetes.utils.pod_manager import (
    detect_pod_terminate_early_issues,
)
from kubernetes.client.exceptions import ApiException

from arf_training.errors import StepFailed
from arf_training.kubernetes import ownership
from arf_training.kubernetes.pod import CONTAINER_NAME, container_exit_code

ROLE_LABEL = "arf.dev/federation-role"
SITE_LABEL = "arf.dev/site"
TERMINAL_PHASES = ("Succeeded", "Failed")
# A SuperNode is restarted in place when it crashes and rejoins (restartPolicy OnFailure); one
# that crashed more often than this keeps crashing, with back-offs growing to minutes, while the
# SuperLink waits out its round timeouts for it: it is deleted instead (see `Federation`).
SUPERNODE_MAX_RESTARTS = 3
RECREATE_WAIT_S = 60  # for a replaced pod's name to be free again


def supernode_failure(pod: Any) -> str | None:
    """Why the SuperNode `pod` (a V1Pod) will not serve its site again, or None while it may."""
    status = pod.status
    if status is None:
        return None
    code = container_exit_code(pod)
    if status.phase == "Failed":  # its deadline, an eviction: OnFailure restarts none of these
        return (f"the pod failed ({status.reason or 'no reason given'}"
                f"{': ' + status.message if status.message else ''}; exit code {code})")
    early = detect_pod_terminate_early_issues(pod)  # e.g. an image that cannot be pulled
    if early:
        return " ".join(early.split())  # "reason\nmessage": one line in a log or a message
    for item in status.container_statuses or []:
        if item.name == CONTAINER_NAME and (item.restart_count or 0) > SUPERNODE_MAX_RESTARTS:
            return f"it crashed {item.restart_count} times (last exit code {code})"
    return None


def supernode_started(pod: Any) -> bool:
    """Whether the SuperNode `pod` (a V1Pod) ever ran its container (running now, ended, or
    restarted): one that never did cannot have joined the federation."""
    for item in (pod.status and pod.status.container_statuses) or []:
        if item.name == CONTAINER_NAME and (
                item.restart_count or (item.state and (item.state.running or
                                                        item.state.terminated))):
            return True
    return False



class Federation:
    """The Service and the SuperNode Pods of one federate try, through the CoreV1Api `client`.

    :param task_id: the federate task's id; an earlier try's objects are found by the run's
        labels and this task id in their `arf.dev/task-id` annotation (`<task_id>:<part>`).
    :param min_sites: `federated.min_sites`: the fewest SuperNodes the federation goes on with.
    :param start_timeout_s: how long a SuperNode may take to start its container (the
        provider's startup timeout for the SuperLink's own pod) before it counts as lost.
    """

    def __init__(self, client: Any, service: dict[str, Any], nodes: list[dict[str, Any]],
                 task_id: str, log: Any, min_sites: int, start_timeout_s: float = 120.0):
        self.client, self.service, self.nodes, self.log = client, service, nodes, log
        self.namespace = service["metadata"]["namespace"]
        self.task_id = task_id
        self.min_sites = min_sites
        self.lost: dict[str, str] = {}  # site -> why its SuperNode was lost, in loss order
        self._pods = {n["metadata"]["labels"][SITE_LABEL]: n["metadata"]["name"] for n in nodes}
        self._started: set[str] = set()  # SuperNode pods seen running their container
        self.start_timeout_s = start_timeout_s
        self._first_seen: dict[str, float] = {}  # SuperNode pod -> when check_nodes first read it

    def clear_earlier_tries(self) -> None:
        """Delete what earlier tries of this task left: Services, SuperNodes and any SuperLink
        still running (the provider would reattach this try to it, a federation it cannot
        reach). A finished SuperLink is kept, like any failed step pod."""
        labels = self.service["metadata"]["labels"]
        selector = ",".join(f"{key}={labels[key]}" for key in ("arf.dev/dag-id",
                                                                "arf.dev/run-id"))
        selector += f",arf.dev/try-number!={labels['arf.dev/try-number']},{ROLE_LABEL}"
        for pod in self.client.list_namespaced_pod(self.namespace,
                                                   label_selector=selector).items:
            role = pod.metadata.labels[ROLE_LABEL]
            if self._ours(pod.metadata.annotations) and (
                    role == "supernode" or (pod.status and pod.status.phase) not in
                    TERMINAL_PHASES):
                self.log.info("deleting %s pod %s of an earlier try", role, pod.metadata.name)
                self._delete("pod", pod.metadata.name)
        for svc in self.client.list_namespaced_service(self.namespace,
                                                       label_selector=selector).items:
            if self._ours(svc.metadata.annotations):
                self.log.info("deleting Service %s of an earlier try", svc.metadata.name)
                self._delete("service", svc.metadata.name)

    def _ours(self, annotations: dict[str, str] | None) -> bool:
        return (annotations or {}).get("arf.dev/task-id", "").startswith(f"{self.task_id}:")

    def start(self) -> None:
        """Create the Service and the SuperNodes (before the SuperLink: they retry until it
        listens, and the SuperLink waits for them)."""
        name = self.service["metadata"]["name"]
        try:
            self.client.create_namespaced_service(self.namespace, body=self.service)
        except ApiException as exc:
            if exc.status != 409:
                raise
            # Same name, same try: its spec is a function of the name, so it is the same.
            self.log.info("reusing Service %s", name)
        for node in self.nodes:
            self._create_node(node)

    def _create_node(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        try:
            self.client.create_namespaced_pod(self.namespace, body=body)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.client.read_namespaced_pod(name, self.namespace)
        # One that an earlier DagRun of this run id left (`kubernetes.ownership`) serves no one.
        theirs = ownership.stale(existing.metadata, body["metadata"])
        if theirs is None and (existing.status and existing.status.phase) not in TERMINAL_PHASES:
            self.log.info("reusing SuperNode pod %s, still running", name)
            return
        self.log.info("replacing SuperNode pod %s, %s", name, "which has finished" if theirs is
                      None else f"created by an earlier DAG run with this run id ({theirs})")
        self._delete("pod", name, grace_period_seconds=0)
        deadline = time.monotonic() + RECREATE_WAIT_S
        while True:
            try:
                self.client.create_namespaced_pod(self.namespace, body=body)
                return
            except ApiException as exc:  # 409 until the old pod is gone
                if exc.status != 409 or time.monotonic() > deadline:
                    raise
            time.sleep(1)

    def check_nodes(self) -> None:
        """Log and delete each SuperNode that will not serve its site again (`lost`); raise
        StepFailed naming the lost sites if fewer than min_sites remain, or if a lost one never
        started (the SuperLink waits for every site before round 1, up to its round timeout)."""
        unstarted = []
        for node in self.nodes:
            name, site = node["metadata"]["name"], node["metadata"]["labels"][SITE_LABEL]
            if site in self.lost:
                continue
            try:
                pod = self.client.read_namespaced_pod(name, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                why = "its pod was deleted"
            else:
                why = supernode_failure(pod)
                if supernode_started(pod):
                    self._started.add(name)
                elif why is None:
                    why = self._stalled(name, pod)
            if why:
                self._lose(site, name, why)
                if name not in self._started:
                    unstarted.append(site)
        remaining = len(self.nodes) - len(self.lost)
        if remaining >= self.min_sites and not unstarted:
            return
        lost = "; ".join(f"site {site!r} (pod {self.namespace}/{self._pods[site]}): {why}"
                         for site, why in self.lost.items())
        reason = (f"site(s) {unstarted} never started, and the SuperLink starts round 1 only "
                  "with every site" if unstarted else
                  f"{remaining} of {len(self.nodes)} sites remain, fewer than "
                  f"federated.min_sites={self.min_sites}")
        raise StepFailed(f"{len(self.lost)} SuperNode(s) lost before the SuperLink finished: "
                         f"{lost}. {reason[0].upper()}{reason[1:]}: the federation was "
                         "stopped; the SuperNodes' last log lines are above")

    def _stalled(self, name: str, pod: Any) -> str | None:
        """Why a SuperNode that has not started yet counts as lost: it waited longer than the
        start timeout. Nothing in its status says why when a Secret or claim it mounts is
        missing or no node has room (the pod's events do), and the SuperLink would wait for it
        until its round timeout."""
        waited = time.monotonic() - self._first_seen.setdefault(name, time.monotonic())
        if waited <= self.start_timeout_s:
            return None
        waiting = [s.state.waiting.reason for s in (pod.status.container_statuses or [])
                   if s.state and s.state.waiting and s.state.waiting.reason]
        return (f"it did not start within {self.start_timeout_s:g} s (phase "
                f"{pod.status.phase}{', ' + waiting[0] if waiting else ''}): `kubectl describe "
                f"pod {name}` shows why, e.g. a missing Secret or claim, or no node with room")

    def _lose(self, site: str, name: str, why: str) -> None:
        self.log.warning("the SuperNode of site %r (pod %s/%s) is lost: %s; the federation goes "
                         "on without the site if federated.min_sites=%d allows. Its last log "
                         "lines:", site, self.namespace, name, why, self.min_sites)
        self._log_tail(name)  # before the delete, which takes the log with it
        # Deleted, not left to crash-loop: restarted under its key it re-activates the same
        # node, which the SuperLink then never marks offline, so the round it was in would wait
        # for its reply up to the round timeout instead of going on without the site.
        self._delete("pod", name)
        self.lost[site] = why

    def _log_tail(self, name: str) -> None:
        try:
            tail = self.client.read_namespaced_pod_log(name, self.namespace,
                                                       container=CONTAINER_NAME, tail_lines=40)
        except ApiException:
            return  # a pod that never started has no log
        for line in str(tail).splitlines():
            self.log.info("[%s] %s", name, line)

    def tear_down(self) -> None:
        """Delete the SuperNodes and the Service (already gone: fine; called more than once)."""
        for node in self.nodes:
            self._delete("pod", node["metadata"]["name"])
        self._delete("service", self.service["metadata"]["name"])

    def _delete(self, kind: str, name: str, **options: Any) -> None:
        delete = (self.client.delete_namespaced_pod if kind == "pod"
                  else self.client.delete_namespaced_service)
        try:
            delete(name, self.namespace, **options)
        except ApiException as exc:
            if exc.status != 404:
                raise
