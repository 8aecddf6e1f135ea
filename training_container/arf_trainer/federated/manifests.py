"""The federate step's view of each site's prepared data: manifest metadata, never rows.

Two sources, one result (a `data.Manifest` whose fields the plan and the lineage read):

* the job spec: `inputs.sites[i].manifest`, the metadata a site's own prepare reported in its
  result (`datahub.prepare`'s "manifest_metadata"). On Kubernetes the SuperLink pod mounts no
  site claim, so the federate task copies each site's metadata from the prepare XComs into its
  job spec (`kubernetes_federated_pods.SuperLinkPod`);
* the site's `manifest.json` under its `data_dir`, when the job spec gives no metadata (the
  local backend: one machine, every site's folder readable).

No Flower imports, so that tests run in the Airflow venv as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arf_trainer.errors import TrainingError
from arf_trainer.federated.site import column_shapes, model_info
from arf_trainer.spec import StepEnv
from arf_trainer.trainer.data import Manifest, load_manifest
from arf_trainer.trainer.recipes import Hyperparameters, ModelInfo

# The fields of a site's metadata (datahub/prepare_result.py `site_metadata`), with their types.
FIELDS: dict[str, type] = {
    "features": list, "targets": list, "columns": list, "rows": int, "train_rows": int,
    "val_rows": int, "tables": dict, "fingerprint": str}


@dataclass(frozen=True)
class SiteManifest(Manifest):
    """A site's manifest as its prepare reported it: counts, not shards. Its row counts come
    from the metadata; asking for its shards (rows to read) is an error, as this process must
    not read any site's rows."""

    def shards(self, split: str) -> list[dict[str, Any]]:
        raise TrainingError(f"{self.path} is a site's manifest metadata: it lists no shards "
                            "(the federate step reads no site's rows)")

    def rows(self, split: str) -> int:
        return int(self.raw[f"{split}_rows"])


def from_metadata(name: str, raw: Any) -> SiteManifest:
    """Site `name`'s metadata from the job spec, checked as `load_manifest` checks a file."""
    where = f"job spec inputs.sites[{name}].manifest"
    advice = ("clear the site's prepare_data task so that it runs again with a matching "
              "arf-trainer (its result carries the metadata)")
    if not isinstance(raw, dict):
        raise TrainingError(f"{where} is {type(raw).__name__}, not an object; {advice}")
    for key, kind in FIELDS.items():
        value = raw.get(key)
        # bool is an int to isinstance: a count of True is still malformed.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TrainingError(f"{where} lacks the field {key!r} ({kind.__name__}), or it "
                                f"has another type; {advice}")
    manifest = SiteManifest(Path(f"<{where}>"), raw)
    if not manifest.features or not manifest.targets:
        raise TrainingError(f"{where} has features={manifest.features} and targets="
                            f"{manifest.targets}; both must be non-empty "
                            "(dataset.features/targets)")
    if manifest.rows("train") <= 0:
        raise TrainingError(f"{where}: the site's training split has no rows; its dataset "
                            "query selected nothing, or validation_split took every row")
    return manifest


def site_manifest(site: dict[str, Any]) -> Manifest:
    """The metadata the job spec gives for `site` ({name, data_dir, manifest?}), else its file."""
    if site.get("manifest") is not None:
        return from_metadata(site["name"], site["manifest"])
    return load_manifest(Path(site["data_dir"]))


def lineage(sites: list[dict[str, Any]]) -> dict[str, Any]:
    """Every site's table versions and fingerprint (from its manifest: metadata, no rows)."""
    record = {}
    for site in sites:
        raw = site_manifest(site).raw
        record[site["name"]] = {
            "tables": {n: t.get("version") for n, t in raw.get("tables", {}).items()},
            "fingerprint": raw["fingerprint"], "train_rows": raw["train_rows"],
            "val_rows": raw["val_rows"]}
    return record


def _same_decode(first_name: str, first: Manifest, name: str, manifest: Manifest) -> None:
    """The sites' frames come from cameras of one size, made smaller alike (the model is
    served at that size: `dataset.decode.<c>.downscale`)."""
    ours, theirs = (m.raw.get("decode") or {} for m in (first, manifest))
    differ = [f"{c}: {ours.get(c)} vs {theirs.get(c)}" for c in sorted(set(ours) | set(theirs))
              if ours.get(c) != theirs.get(c)]
    if differ:
        raise TrainingError(
            f"sites {first_name!r} and {name!r} decode their frames differently "
            f"({'; '.join(differ)}); every site needs the same dataset.decode (format, camera "
            "shape, downscale)")


def plan(env: StepEnv, sites: list[dict[str, Any]]) -> tuple[dict[str, Any], ModelInfo]:
    """(plan.json for the ServerApp, the model's shape). Every site must have prepared the same
    feature and target columns, of the same per-row shapes: the first site's define the model."""
    spec = env.spec
    recipe = spec.training["recipe"]
    hp = Hyperparameters.parse(recipe, spec.hyperparameters)
    manifests = [site_manifest(s) for s in sites]
    info = model_info(manifests[0], recipe, hp)
    first = column_shapes(manifests[0])
    for site, manifest in zip(sites[1:], manifests[1:]):
        if (manifest.features, manifest.targets) != (info.features, info.targets):
            raise TrainingError(
                f"site {site['name']!r} prepared features {manifest.features} -> "
                f"{manifest.targets}, site {sites[0]['name']!r} {info.features} -> "
                f"{info.targets}; every site's query must return the same columns")
        shapes = column_shapes(manifest)
        differ = [f"{n}: {first[n]} vs {shapes[n]}" for n in first if first[n] != shapes[n]]
        if differ:
            raise TrainingError(
                f"sites {sites[0]['name']!r} and {site['name']!r} prepared columns of "
                f"different per-row shapes ({'; '.join(differ)}); every site's query must "
                "return the same array sizes (the same frame size in dataset.decode, the "
                "same CAST(... AS FLOAT[n]))")
        _same_decode(sites[0]["name"], manifests[0], site["name"], manifest)
    timeout = float(spec.training.get("timeout_minutes", 60)) * 60
    plan_ = {"federated": spec.template["federated"], "model_info": info.to_json(),
             "hyperparameters": spec.hyperparameters, "seed": spec.seed,
             "round_timeout_s": timeout,
             # What each site's updates must weigh (apps: a larger claim is refused).
             "site_rows": [m.rows("train") for m in manifests]}
    return plan_, info
