"""The provider side of a `federated:` template's tasks (`kubernetes_federated`), at run time.

Imported only when a site prepare or the federate task runs, like `kubernetes_pods`: it loads
the provider's KubernetesPodOperator and both Kubernetes clients.

* `SitePod`: a `StepPod` whose pod is its site's prepare Pod. Everything else is a step pod's:
  the result through the xcom sidecar, exit 2 not retried, exit 75 resumed in a new pod.
* `SuperLinkPod`: runs the SuperLink Pod with the provider's machinery (on the worker), around
  a `Federation` (`kubernetes_supernodes`): the Service and SuperNode Pods it creates first and
  deletes last. The
  SuperLink mounts no site claim, so its job spec carries each site's manifest metadata (column
  names and shapes, row counts, table versions, fingerprint: no rows), taken from the site
  prepares' results (`site_manifests`).
* A SuperNode lost for good is logged and deleted; the rounds go on without its site
  (`lost_sites` in the XCom) unless fewer than `federated.min_sites` remain or it never started
  (round 1 waits for every site): then the task fails at once.

Names are per try (`kubernetes.federation`, `ownership.resource_name`), so two tries never share
an object. What an earlier try left behind (its worker died before it could clean up) is deleted
before a try starts; what this very try left (the same try started again) is reused while it
runs, or replaced once finished or when an earlier DagRun of the run id left it (deleted in the
UI, then triggered again: `kubernetes.ownership`). Nothing is ever created twice.
"""

from __future__ import annotations

import time
from typing import Any

from airflow.providers.cncf.kubernetes.utils.container import container_is_completed
from airflow.providers.cncf.kubernetes.utils.pod_manager import (
    detect_pod_terminate_early_issues,
)

from arf_training.backends.kubernetes import (
    XCOM_RESULT_PATH,
    pod_step_spec,
    runtime_settings,
    with_xcom_result,
)
from arf_training.backends.kubernetes_pods import ArfPodOperator, StepPod, elapsed_s
from arf_training.backends.kubernetes_supernodes import TERMINAL_PHASES, Federation
from arf_training.errors import StepFailed
from arf_training.kubernetes import federation, ownership, restarts
from arf_training.kubernetes.pod import CONTAINER_NAME
from arf_training.kubernetes.render import STEP_TASK_IDS, pod_arf_settings
from arf_training.runtime import fail_fast_on_bad_input, run_identity

# The key of the federate result (XCom) that names the sites lost on the way: {site: why}.
LOST_SITES_KEY = "lost_sites"
# The key of a site prepare's result that holds its manifest metadata: the container's
# `arf_trainer.datahub.prepare_result.SITE_METADATA_KEY` (this side must not import arf_trainer), and
# what the SuperLink's `arf_trainer.federated.manifests` checks field by field.
SITE_METADATA_KEY = "manifest_metadata"
SITE_METADATA_FIELDS = ("features", "targets", "train_rows", "val_rows", "tables",
                        "fingerprint")


class SitePod(StepPod):
    """The prepare step of site `site`, in a Pod that mounts only the site's claim; returns
    the step's result with the site's name (as `LocalSiteStepOperator` does)."""

    def __init__(self, *, loaded: Any, site: str, **kwargs: Any):
        super().__init__(loaded=loaded, step="prepare", **kwargs)
        self.site = site

    def render_pod(self, context: Any, start: int = 0) -> dict[str, Any]:
        settings = runtime_settings(self.namespace)
        with fail_fast_on_bad_input():
            spec = pod_step_spec(self.loaded, "prepare", context, settings)
        identity = run_identity(context)
        pod = federation.render_site_prepare(spec, self.loaded, self.site, identity, settings,
                                             pod_arf_settings(settings),
                                             result_path=XCOM_RESULT_PATH)
        if not start:
            return pod
        return restarts.restarted(pod, federation.part_identity(identity, self.site), start,
                                  elapsed_s(context))

    def _finish(self, context: Any, result: Any) -> Any:
        return {"site": self.site, **super()._finish(context, result)}


def site_manifests(context: Any, sites: list[str]) -> dict[str, dict[str, Any]]:
    """{site: its manifest metadata} from the results (XComs) of the mapped site prepares.

    Raises StepFailed (not retryable: another try of federate would read the same XComs)
    naming the first site whose result is missing or carries no usable metadata."""
    task_id = STEP_TASK_IDS["prepare"]
    pulled = context["ti"].xcom_pull(task_ids=task_id)
    # Airflow returns a lone XCom bare, not in a list (e.g. when only one site's is left).
    if pulled is None or isinstance(pulled, dict):
        pulled = [] if pulled is None else [pulled]
    by_site = {r["site"]: r for r in pulled if isinstance(r, dict) and "site" in r}
    manifests = {}
    for index, site in enumerate(sites):
        result = by_site.get(site)
        metadata = result.get(SITE_METADATA_KEY) if result is not None else None
        if result is None:
            why = "has no result (XCom)"
        elif not isinstance(metadata, dict):
            why = (f"has no manifest metadata ({SITE_METADATA_KEY!r}: a prepare by an older "
                   "arf-trainer image?)")
        else:
            missing = [f for f in SITE_METADATA_FIELDS if f not in metadata]
            why = f"has manifest metadata without {missing}" if missing else ""
        if why:
            raise StepFailed(
                f"the {task_id} task of site {site!r} (map index {index}) {why}; the "
                "federation needs every site's manifest metadata, as its SuperLink pod mounts "
                f"no site's data. Clear {task_id} for site {site!r} (with its downstream "
                "tasks) so that it runs again", retryable=False)
        manifests[site] = metadata
    return manifests


class SuperLinkPod(ArfPodOperator):
    """The federate step: `Federation` objects first, then the SuperLink Pod run to its end on
    the worker by the provider, the SuperNodes read between two reads of its log.

    :param loaded: the validated template (with its `federated:` section).
    :param node_poll_s: seconds between two reads of the SuperNodes' status.
    """

    def __init__(self, *, loaded: Any, node_poll_s: float, **kwargs: Any):
        kwargs["deferrable"] = False
        super().__init__(**kwargs)
        self.loaded = loaded
        self.node_poll_s = node_poll_s
        self.federation: Federation | None = None
        # What ended the wait before the SuperLink did (a SuperNode's failure, an API error).
        self.wait_error: BaseException | None = None

    def render_federation(self, context: Any) -> list[dict[str, Any]]:
        """[Service, SuperLink Pod, SuperNode Pods] of this try, the sites' manifest metadata
        in the SuperLink's job spec. Validates the conf and the site prepares' results first."""
        settings = runtime_settings(self.namespace)
        with fail_fast_on_bad_input():
            spec = with_xcom_result(pod_step_spec(self.loaded, "federate", context, settings))
            sites = [s.name for s in self.loaded.template.federated.sites]
            spec = federation.with_site_manifests(spec, site_manifests(context, sites))
        return [ownership.stamped(manifest, context) for manifest in federation.render_federation(
            spec, self.loaded, run_identity(context), settings)]

    def render_pod(self, context: Any) -> dict[str, Any]:
        return self.render_federation(context)[1]

    def execute(self, context: Any) -> Any:
        service, link, *nodes = self.render_federation(context)
        self._use(link)
        self.federation = fed = Federation(self.client, service, nodes,
                                           run_identity(context).task_id, self.log,
                                           self.loaded.template.federated.min_sites,
                                           self.startup_timeout_seconds)
        try:
            fed.clear_earlier_tries()
            fed.start()
            result = self._run(context, super().execute)
        except Exception:
            if fed.lost and self.wait_error is None:  # else the error names them already
                self.log.warning("the SuperLink failed after losing the SuperNodes of sites "
                                 "%s (above)", list(fed.lost))
            raise
        finally:
            fed.tear_down()
        result = self._expect_result(result, "the federation's SuperLink")
        if fed.lost:
            self.log.warning("the federation finished without the sites it lost: %s",
                             "; ".join(f"{site!r}: {why}" for site, why in fed.lost.items()))
        return {**result, LOST_SITES_KEY: dict(fed.lost)}

    def await_pod_completion(self, pod: Any) -> None:
        """The provider's wait (it follows the log to the end), with the SuperNodes' status
        read between two reads of the SuperLink's log."""
        try:
            self._await_superlink(pod)
        except BaseException as exc:
            self.wait_error = exc
            raise

    def _await_superlink(self, pod: Any) -> None:
        since = None
        while True:
            if self.get_logs:
                since = self.pod_manager.fetch_container_logs(
                    pod, CONTAINER_NAME, follow=False, since_time=since,
                    container_name_log_prefix_enabled=self.container_name_log_prefix_enabled,
                    log_formatter=self.log_formatter).last_log_time
            remote = self.pod_manager.read_pod(pod)
            if (container_is_completed(remote, CONTAINER_NAME)
                    or remote.status.phase in TERMINAL_PHASES
                    or detect_pod_terminate_early_issues(remote)):
                return  # the provider reads the outcome (and the result) from here on
            self.federation.check_nodes()
            time.sleep(self.node_poll_s)

    def post_complete_action(self, *, pod: Any, remote_pod: Any, context: Any,
                             result: Any, **kwargs: Any) -> None:
        if self.wait_error is not None:
            # A SuperLink without its SuperNodes (deleted next) cannot finish: stop it now, not
            # at its deadline, and let the error that ended the wait (a SuperNode's, naming its
            # site) fail the task: the provider's clean-up would raise "pod returned a failure"
            # over it.
            self.pod_manager.delete_pod(pod)
            return
        super().post_complete_action(pod=pod, remote_pod=remote_pod, context=context,
                                     result=result, **kwargs)

    def on_kill(self) -> None:
        try:
            super().on_kill()
        finally:
            if self.federation is not None:
                self.federation.tear_down()
