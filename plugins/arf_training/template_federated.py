"""`federated:`: train one model across sites whose data never leaves them (Flower).

Its own module so that `templates.py` only hooks it in. The DAG of such a template maps
`prepare_data` over the sites (each against its own data hub, into its own workspace folder),
then one `federate` task runs a Flower SuperLink and one SuperNode per site; only weights cross
site boundaries (see DESIGN.md "Federated training").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arf_training.template_query import _check_query_size, _check_single_select

MAX_SITES = 64
_SITE_NAME = r"^[a-z][a-z0-9-]{0,30}$"  # a DNS label part: it names pods and claims too


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Site(_Section):
    """One site: its name, its data hub, and optionally its own query."""

    name: str = Field(pattern=_SITE_NAME,
                      description="Site name: lowercase letters, digits and '-', at most 31 "
                                  "characters (it names the site's task, folder and pods).")
    hub: str = Field(min_length=1, pattern=r"^\S(.*\S)?$",
                     description="The site's data hub: an absolute path, a file:// URI, or a "
                                 "path relative to ARF_HOME (e.g. sites/north/datahub). The "
                                 "site's prepare step sees this hub only.")
    query: str | None = Field(
        None, min_length=1,
        description="This site's SELECT, if it differs from dataset.query (same columns).")

    # The same query rules as dataset.query.
    @model_validator(mode="before")
    @classmethod
    def _query_size(cls, data: Any) -> Any:
        return _check_query_size(data, "federated.sites[].query")

    @field_validator("query")
    @classmethod
    def _single_select(cls, query: str | None) -> str | None:
        return None if query is None else _check_single_select(query)


class Federated(_Section):
    """Sites, rounds and the aggregation strategy of a federated training."""

    sites: list[Site] = Field(min_length=2, max_length=MAX_SITES,
                              description="At least two sites, each with its own data hub.")
    rounds: int = Field(ge=1, le=10_000, description="Federated rounds (fit + aggregate).")
    strategy: Literal["fedavg", "fedprox", "fedavgm", "fedmedian", "fedtrimmedavg"] = Field(
        "fedavg", description="Aggregation: 'fedavg' (sample-weighted mean of the sites' "
                              "weights), 'fedprox' (the same, with a proximal term "
                              "proximal_mu/2 * ||w - w_global||^2 in each site's loss), "
                              "'fedavgm' (the mean's update applied with server momentum: "
                              "server_momentum, server_lr), or, robust to a minority of sites "
                              "sending extreme weights, 'fedmedian' (coordinate-wise median) "
                              "and 'fedtrimmedavg' (coordinate-wise mean without the "
                              "trim_beta share of highest and lowest values); these two count "
                              "each site once, whatever its rows.")
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0,
                                description="Fraction of the connected sites sampled each round.")
    min_sites: int = Field(2, ge=1, le=MAX_SITES,
                           description="Fewest sites a round needs: a site lost on the way "
                                       "is left out while at least this many reply; with "
                                       "fewer the federate task fails.")
    local_epochs: int = Field(1, ge=1, le=1000, description="Epochs each site trains per round.")
    proximal_mu: float | None = Field(
        None, gt=0.0, le=1000.0, description="FedProx's proximal weight: required with fedprox, "
                                             "optional with fedavgm (the sites' proximal term "
                                             "under server momentum).")
    server_momentum: float | None = Field(
        None, ge=0.0, lt=1.0, description="FedAvgM's server momentum (e.g. 0.7); fedavgm only.")
    trim_beta: float | None = Field(
        None, gt=0.0, lt=0.5, description="FedTrimmedAvg's share of sites cut at each end of "
                                          "every coordinate (e.g. 0.2); fedtrimmedavg only.")
    server_lr: float | None = Field(
        None, gt=0.0, le=10.0, description="FedAvgM's server learning rate (default 1.0: "
                                           "the plain mean when server_momentum is 0); "
                                           "fedavgm only.")

    @model_validator(mode="after")
    def _consistent(self) -> "Federated":
        problems = []
        names = [site.name for site in self.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"federated.sites: site name(s) {dupes} appear more than once; "
                            "give every site its own name")
        hubs = [site.hub.rstrip("/") for site in self.sites]
        shared = sorted({h for h in hubs if hubs.count(h) > 1})
        if shared:
            problems.append(f"federated.sites: hub(s) {shared} are used by more than one site; "
                            "each site must have its own data hub")
        if self.min_sites > len(self.sites):
            problems.append(f"federated.min_sites is {self.min_sites} but only "
                            f"{len(self.sites)} site(s) are listed; lower min_sites or add sites")
        sampled = int(self.fraction_fit * len(self.sites))
        if sampled < self.min_sites:
            problems.append(f"federated.fraction_fit {self.fraction_fit} samples {sampled} of "
                            f"{len(self.sites)} sites per round, fewer than min_sites "
                            f"({self.min_sites}); raise fraction_fit or lower min_sites")
        if self.strategy == "fedprox" and self.proximal_mu is None:
            problems.append("federated.proximal_mu is required with strategy 'fedprox' "
                            "(e.g. proximal_mu: 0.01)")
        if self.strategy == "fedavg" and self.proximal_mu is not None:
            problems.append(f"federated.proximal_mu ({self.proximal_mu}) is used by strategies "
                            "'fedprox' and 'fedavgm' only; remove it or set strategy: fedprox")
        if self.strategy == "fedavgm" and self.server_momentum is None:
            problems.append("federated.server_momentum is required with strategy 'fedavgm' "
                            "(e.g. server_momentum: 0.7)")
        for name in ("server_momentum", "server_lr"):
            value = getattr(self, name)
            if self.strategy != "fedavgm" and value is not None:
                problems.append(f"federated.{name} ({value}) is used by strategy 'fedavgm' "
                                "only; remove it or set strategy: fedavgm")
        problems += self._robust_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _robust_problems(self) -> list[str]:
        """fedmedian / fedtrimmedavg resist a site only where a round has enough of them."""
        if self.strategy == "fedtrimmedavg" and self.trim_beta is None:
            return ["federated.trim_beta is required with strategy 'fedtrimmedavg' (e.g. "
                    "trim_beta: 0.2 cuts a fifth of the sites at each end)"]
        if self.strategy != "fedtrimmedavg" and self.trim_beta is not None:
            return [f"federated.trim_beta ({self.trim_beta}) is used by strategy "
                    "'fedtrimmedavg' only; remove it or set strategy: fedtrimmedavg"]
        if self.strategy == "fedmedian" and self.min_sites < 3:
            return [f"federated.strategy 'fedmedian' with min_sites {self.min_sites}: the "
                    "median of two sites is their mean, which one site moves anywhere; set "
                    "min_sites: 3 or more (and list as many sites)"]
        if self.strategy == "fedtrimmedavg" and int(self.trim_beta * self.min_sites) < 1:
            # Flower cuts int(beta x replies) at each end: the smallest round that cuts one.
            need = next(n for n in range(self.min_sites, 10**6) if int(self.trim_beta * n))
            fix = f"raise min_sites to {need} (and list as many sites)"
            if 1 / self.min_sites < 0.5:
                fix += f" or trim_beta to {1 / self.min_sites:.3g}"
            return [f"federated.trim_beta {self.trim_beta} cuts int({self.trim_beta} x "
                    f"{self.min_sites}) = 0 sites at each end of a round of min_sites "
                    f"{self.min_sites}, so it resists none; {fix}"]
        return []


def check_federated(template: Any) -> None:
    """Cross-section rules of a template with `federated:` (raise ValueError naming the field)."""
    federated = template.federated
    if federated is None:
        return
    training, problems = template.training, []
    if training.recipe is None:
        problems.append("federated needs a built-in training.recipe (the sites train it "
                        "inside Flower's ClientApp); remove federated or use a recipe")
    elif training.recipe == "classifier":
        # Its output layer has one unit per distinct training label: only the sites' rows
        # know them, and the federate step describes the model from metadata alone.
        problems.append("federated: training.recipe 'classifier' is not supported (its classes "
                        "are the distinct training labels, which only the sites' rows hold); "
                        "use recipe 'bc' or 'bc_pixels', or remove federated")
    if training.distributed.nodes * training.distributed.procs_per_node != 1:
        problems.append("federated: training.distributed must be 1 node x 1 process (each "
                        "site trains in one process)")
    speed = training.loop_options_set()
    if speed:
        problems.append(f"federated: training.{', '.join(speed)} is not supported (the sites "
                        "train in fp32, eager, with deterministic kernels, and keep no "
                        "checkpoints); remove it")
    if training.data_loading == "stream":
        problems.append("federated: training.data_loading: stream is not supported (each site "
                        "reads its split whole into memory); remove it")
    if template.hpo is not None:
        problems.append("federated and hpo cannot be combined yet; remove one of them")
    if template.dataset.allow_query_override:
        problems.append("federated: dataset.allow_query_override is not supported (a trigger "
                        "query would run at every site); set it to false")
    if template.dataset.replay is not None:
        problems.append("federated: dataset.replay is not supported; remove it")
    if problems:
        raise ValueError("; ".join(problems))
