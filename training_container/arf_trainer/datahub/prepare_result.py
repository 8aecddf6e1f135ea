"""What the prepare step returns (its XCom): the manifest's counts, tables and fingerprint, and
for a federated site the manifest's metadata (`site_metadata`), which the federate step reads
where the site's folder is not mounted; and the request a manifest answers (`request_sha256`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REQUEST_KEY = "request_sha256"


def request_sha256(spec: Any, query: str) -> str:
    """What decides a prepare's rows, hashed: the dataset section, the query that runs (the
    trigger's override included), the seed, the run's data interval and logical date (query
    parameters) and the federated site. A prepared folder answering another request is not
    reused: a template edited between two tries of a task, or a DagRun deleted and triggered
    again under the same run id with another conf, would train on the earlier request's rows."""
    from arf_trainer.datahub.dataset_query import INTERVAL_PARAMETERS
    from arf_trainer.tracking import sha256_json

    run = spec.raw.get("run") or {}
    return sha256_json({"dataset": spec.dataset, "query": query, "seed": spec.seed,
                        "site": spec.inputs.get("site"),
                        "run": {name: run.get(name) for name in INTERVAL_PARAMETERS}})


# A federated site's prepare result carries its manifest's metadata under this key: the
# federate step may run where the site's folder is not mounted (Kubernetes: its SuperLink pod),
# and gets each site's metadata from the prepare results instead (arf_trainer.federated
# .manifests; the Airflow side, kubernetes_federated_pods, names the same key).
SITE_METADATA_KEY = "manifest_metadata"


def step_result(manifest: dict[str, Any], manifest_path: Path, reused: bool,
                site: str | None = None) -> dict[str, Any]:
    """The prepare step's result; `site`: the federated site this prepare was for."""
    summary = {
        "rows": manifest["rows"],
        "train_rows": manifest["train_rows"],
        "val_rows": manifest["val_rows"],
        "tables": manifest["tables"],
        "fingerprint": manifest["fingerprint"],
        "manifest": str(manifest_path),
        "reused": reused,
    }
    if site is not None:  # a federated site's prepare (its job spec's inputs.site)
        summary[SITE_METADATA_KEY] = site_metadata(manifest)
    return summary


def site_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the federate step reads of a site's manifest: column names, the feature and target
    columns' types and shapes (and how the frames among them were decoded: a downscaled
    camera's model is served at the camera's size), row counts, table versions and the
    fingerprint. Small, and no rows, shard paths, hub URIs (site paths) or query."""
    wanted = set(manifest["features"]) | set(manifest["targets"])
    decode = {c: d for c, d in (manifest.get("decode") or {}).items() if c in wanted}
    return {
        **({"decode": decode} if decode else {}),
        "features": list(manifest["features"]),
        "targets": list(manifest["targets"]),
        "columns": [c for c in manifest.get("columns", []) if c.get("name") in wanted],
        "rows": manifest["rows"],
        "train_rows": manifest["train_rows"],
        "val_rows": manifest["val_rows"],
        "tables": {name: {"version": t.get("version")}
                   for name, t in manifest["tables"].items()},
        "fingerprint": manifest["fingerprint"],
    }
