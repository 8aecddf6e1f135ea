"""`models:/` URIs resolved against the MLflow registry (no torch: the nightly choice and the
custom-command setup use it as well as the trainer)."""

from __future__ import annotations

import re
from typing import Any

from arf_trainer.errors import RegistryError, SpecError
from arf_trainer.tracking import shown_uri

_URI = re.compile(r"^models:/(?P<name>[A-Za-z][A-Za-z0-9_.-]*)"
                  r"(?:/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_-]+))$")


def parse_uri(uri: str, field: str = "model.base_model") -> tuple[str, str | None, str | None]:
    """(name, version or None, alias or None) of a models:/ URI."""
    match = _URI.match(uri or "")
    if match is None:
        raise SpecError(f"{field}={uri!r} is not a registry URI; write "
                        "models:/<name>@<alias> (e.g. models:/reach_bc_policy@champion) or "
                        "models:/<name>/<version>")
    return match["name"], match["version"], match["alias"]


def resolve(client: Any, uri: str, tracking_uri: str, field: str = "model.base_model") -> Any:
    """The ModelVersion behind `uri`, or a SpecError (exit 2) saying how to make it exist."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_uri(uri, field)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST",
                                                  "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"MLflow at {shown_uri(tracking_uri)} failed to resolve {field} "
                                f"{uri!r}: {exc.message}") from exc
        try:
            known = sorted(int(v.version) for v in
                           client.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            known = []
        versions = ", ".join(map(str, known)) or "none (train one from scratch first)"
        if alias is not None:
            raise SpecError(
                f"{field} {uri!r}: registered model {name!r} has no alias {alias!r} "
                f"in the registry at {shown_uri(tracking_uri)} (its versions: {versions}). Point the alias "
                f"at the version to start from: MlflowClient().set_registered_model_alias("
                f"{name!r}, {alias!r}, '<version>')"
                + (" - or evaluate a version with evaluation.promotion_margin set, whose "
                   "promotion gate sets it" if alias == "champion" else "")) from exc
        raise SpecError(f"{field} {uri!r}: {name!r} has no version {version} in the "
                        f"registry at {shown_uri(tracking_uri)} (its versions: {versions}); pin an "
                        "existing version or an alias") from exc
