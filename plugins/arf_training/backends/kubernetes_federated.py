"""A `federated:` template's tasks on Kubernetes: a prepare Pod per site, then the federation.

    prepare_data   `SitePodOperator`, mapped over `federated.sites` by name: the site's
                   prepare Pod (`kubernetes.federation.render_site_prepare`), mounting only
                   the site's claim; its result (plus the site's name) is the XCom.
    federate       `FederateOperator`: the ClusterIP Service and one SuperNode Pod per site,
                   then the SuperLink Pod run to completion (its job spec carries every
                   site's manifest metadata from the prepare_data XComs: it mounts no site's
                   claim); its exit decides the task, its result JSON is the XCom (plus
                   `lost_sites`: the sites whose SuperNode was lost on the way, and why).
                   The Service and the SuperNodes are deleted afterwards whatever happened
                   (success, failure, kill).

Both are light operators like the other Pod tasks (`kubernetes.PodTask`): the provider's
KubernetesPodOperator, and with it both Kubernetes clients, is loaded only when the task runs
(`kubernetes_federated_pods`). This module is imported by the backend's `site_task` and
`federate_task`, when a federated template's DAG is built.

Why the federation waits on the worker, not in the triggerer: the provider's pod trigger
watches one pod, while a federation is several. A SuperNode that fails for good is deleted, so
that the rounds go on without its site as `federated.min_sites` allows, and fails the task at
once, naming the lost sites, once fewer than min_sites remain, instead of leaving the SuperLink
waiting out its round timeouts; and a killed task deletes the federation it started, which a
deferred task (no `on_kill` while in the triggerer) could not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from arf_training.backends.kubernetes import PodTask

if TYPE_CHECKING:
    from arf_training.templates import LoadedTemplate

# Seconds between two reads of the SuperNodes' status while the SuperLink runs.
NODE_POLL_S = 10.0


class SitePodOperator(PodTask):
    """The prepare step of one site of a `federated:` template, as a Pod.

    :param loaded: the validated template.
    :param site: the site's name (the task is mapped over `federated.sites`).
    """

    def __init__(self, *, loaded: LoadedTemplate, site: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.loaded = loaded
        self.site = site

    def _create_pod_operator(self, pods: Any) -> Any:
        from arf_training.backends import kubernetes_federated_pods

        return kubernetes_federated_pods.SitePod(loaded=self.loaded, site=self.site,
                                                 **self._pod_arguments())

    def render_pod(self, context: Any) -> dict[str, Any]:
        """The v1 Pod of this site and try (a plain dict). Validates the trigger conf first."""
        return self.pod_operator().render_pod(context)


class FederateOperator(PodTask):
    """The federate step: a Flower SuperLink Pod and a SuperNode Pod per site.

    Waits on the worker (see the module docstring): `deferrable` is always False.

    :param loaded: the validated template (with its `federated:` section).
    :param node_poll_s: seconds between two reads of the SuperNodes' status.
    """

    ui_color = "#e8f5e9"

    def __init__(self, *, loaded: LoadedTemplate, node_poll_s: float = NODE_POLL_S,
                 **kwargs: Any):
        kwargs["deferrable"] = False
        super().__init__(**kwargs)
        self.loaded = loaded
        self.node_poll_s = node_poll_s

    def _create_pod_operator(self, pods: Any) -> Any:
        from arf_training.backends import kubernetes_federated_pods

        return kubernetes_federated_pods.SuperLinkPod(
            loaded=self.loaded, node_poll_s=self.node_poll_s, **self._pod_arguments())

    def render_federation(self, context: Any) -> list[dict[str, Any]]:
        """[Service, SuperLink Pod, SuperNode Pods] of this try (plain dicts)."""
        return self.pod_operator().render_federation(context)
