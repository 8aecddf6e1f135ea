"""The local backend's federated tasks: a prepare per site, then `arf-trainer federate`.

Both are `LocalStepOperator`s whose StepSpec is narrowed by `arf_training.federation` (the
site's hub and folder; the federation venv's arf-trainer). The federate process starts the
SuperLink and the SuperNodes itself, as children in its session: a killed task stops them all.
"""

from __future__ import annotations

from typing import Any

from arf_training.backends.local import LocalStepOperator, LocalStepRunner
from arf_training.federation import federate_spec, site_spec
from arf_training.runtime import fail_fast_on_bad_input, run_identity, task_log, trigger_conf
from arf_training.settings import ArfSettings
from arf_training.stepspec import build_step_spec


class LocalSiteStepOperator(LocalStepOperator):
    """The prepare step of one site (mapped over `federated.sites` by name).

    :param site: the site's name; its hub and query come from the template.
    """

    def __init__(self, *, site: str, **kwargs: Any):
        super().__init__(step="prepare", **kwargs)
        self.site = site

    def execute(self, context: Any) -> dict[str, Any]:
        with task_log(context, self.log) as log, fail_fast_on_bad_input():
            settings = ArfSettings.from_env()
            spec = build_step_spec(self.loaded, "prepare", run_identity(context),
                                   trigger_conf(context), settings)
            spec = site_spec(spec, self.loaded.template, self.site, settings)
            self._runner = LocalStepRunner(log)
            return {"site": self.site, **self._runner.run(spec)}


class LocalFederateOperator(LocalStepOperator):
    """`arf-trainer federate` from the federation venv: SuperLink + a SuperNode per site."""

    def __init__(self, **kwargs: Any):
        super().__init__(step="federate", **kwargs)

    def execute(self, context: Any) -> dict[str, Any]:
        with task_log(context, self.log) as log, fail_fast_on_bad_input():
            spec = build_step_spec(self.loaded, "federate", run_identity(context),
                                   trigger_conf(context), ArfSettings.from_env())
            spec = federate_spec(spec, self.loaded.template, local=True)
            self._runner = LocalStepRunner(log)
            return self._runner.run(spec)
