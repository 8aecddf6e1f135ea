"""What the evaluate step and `arf-trainer fleet` check before they roll anything out.

In the order they run:

1. the job spec's model reference and `evaluation` settings (`model_ref`, `read_settings`):
   the Airflow side validates templates, but a job spec is a contract of its own, and a bad
   seed found by gymnasium or by the failures table's int64 column would fail the step only
   after every episode was rolled out;
2. the version exists (`check_version`);
3. the loaded weights are the ones the register step recorded (`verify_weights`): the
   version's `arf.weights_sha256` tag against `state_dict_sha256` of the loaded module, the
   same function over the same state_dict the publisher hashed (a pt2 export keeps its
   parameters and buffers under their names). A swapped or damaged artifact would otherwise
   be evaluated, and could be promoted, under the version's name;
4. field seeds stay clear of evaluation seeds (`check_field_seeds`): corrections of an episode
   the promotion gate measures on would leak its test set into training. Each evaluation
   records the seeds it may use, the gate's whole budget included, as `arf.eval.seeds`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from arf_trainer.errors import EvaluationError, SpecError

log = logging.getLogger(__name__)

ENVIRONMENTS = ("reach", "reach_pixels")  # reach_pixels: evaluator_pixels.py
WEIGHTS_TAG = "arf.weights_sha256"
SEEDS_TAG = "arf.eval.seeds"
# The failures table stores seeds as int64; gymnasium refuses negative ones.
MAX_SEED = 2**63 - 1
MAX_EPISODES = 100_000  # the template's bound (arf_training.template_sections.Evaluation)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def model_ref(inputs: dict[str, Any]) -> tuple[str, str]:
    name, version = inputs.get("model_name"), inputs.get("model_version")
    if not isinstance(name, str) or not name:
        raise SpecError(f"job spec inputs.model_name must be a registered model name, got "
                        f"{name!r}; the evaluate step is started with the model to evaluate")
    text = str(version) if isinstance(version, int | str) and not isinstance(version, bool) else ""
    if not (text.isascii() and text.isdigit()):  # '²'.isdigit(), but int('²') fails
        raise SpecError(f"job spec inputs.model_version must be a model version number "
                        f"(e.g. 3), got {version!r}")
    return name, str(int(text))


def _whole(value: Any, field: str, low: int, high: int, example: int) -> int:
    # int(2.7) would quietly evaluate 2 episodes, int(True) one.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"evaluation.{field}={value!r} must be a whole number from {low} to "
                        f"{high}; set it in the template's evaluation section (e.g. {example})")
    return value


def seed_range(first: int, count: int, field: str) -> range:
    """Seeds first .. first+count-1, or a SpecError naming `field` if one is out of range."""
    if first + count - 1 > MAX_SEED:
        raise SpecError(f"{field}={first} with {count} episode(s) reaches seed "
                        f"{first + count - 1}, past {MAX_SEED} (the failures table stores "
                        "seeds as int64); pick a smaller first seed, e.g. 100000")
    return range(first, first + count)


def read_settings(spec: Any) -> tuple[str, int, int, float]:
    """(environment, episodes, seed, success_threshold) of the template's evaluation section."""
    evaluation = spec.evaluation
    if not evaluation:
        raise EvaluationError(
            f"template {spec.name!r} has no evaluation section; add one "
            "(evaluation: {environment: reach, episodes: 50}) to evaluate its models"
        )
    environment = evaluation.get("environment")
    if environment not in ENVIRONMENTS:
        raise EvaluationError(
            f"evaluation.environment is {environment!r}, which this arf-trainer cannot simulate; "
            f"use one of: {', '.join(ENVIRONMENTS)}"
        )
    episodes = _whole(evaluation.get("episodes", 50), "episodes", 1, MAX_EPISODES, 50)
    seed = _whole(evaluation.get("seed", 100_000), "seed", 0, MAX_SEED, 100_000)
    seed_range(seed, episodes, "evaluation.seed")
    threshold = float(evaluation.get("success_threshold", 0.8))
    return environment, episodes, seed, threshold


def check_version(client: Any, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        try:
            known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        except MlflowException:
            known = []
        raise EvaluationError(
            f"model version models:/{name}/{version} is not in the registry; versions of "
            f"{name!r}: {', '.join(map(str, known)) or 'none'}. Evaluate a registered version"
        ) from exc


def verify_weights(model: Any, name: str, version: str) -> None:
    """Refuse `model` unless its state_dict hashes to the version's `arf.weights_sha256`; a
    version without the tag (registered before it existed, or by hand) only gets a warning."""
    from mlflow import MlflowClient

    from arf_trainer.trainer.checkpoint import state_dict_sha256

    uri = f"models:/{name}/{version}"
    expected = MlflowClient().get_model_version(name, version).tags.get(WEIGHTS_TAG)
    if expected is None:
        log.warning("%s has no %s tag (registered by hand or by an older release): its weights "
                    "are evaluated unverified", uri, WEIGHTS_TAG)
        return
    if not _SHA256.fullmatch(expected):
        raise EvaluationError(
            f"{uri} has {WEIGHTS_TAG}={expected!r}, which is not a sha256 (64 lowercase hex "
            "digits), so its weights cannot be verified; register the model again "
            "(arf-trainer register) or set the tag to the training run's weights_sha256")
    state_dict = getattr(model, "state_dict", None)
    if not callable(state_dict):
        raise EvaluationError(f"{uri} loaded as {type(model).__name__}, which has no "
                              f"state_dict to check against {WEIGHTS_TAG}")
    actual = state_dict_sha256(state_dict())
    if actual != expected:
        raise EvaluationError(
            f"{uri}: the weights loaded from its artifact have sha256 {actual}, but the version "
            f"was registered with {WEIGHTS_TAG}={expected}: the artifact was replaced or "
            "damaged after registration. Nothing was evaluated; register the training run's "
            "model again (arf-trainer register) and evaluate the new version")


def _evaluated_seeds(version: Any) -> range | None:
    """The seeds an evaluation of `version` used or may use (`arf.eval.seeds`, else what an
    older evaluation recorded: its first seed and the episodes it and its gate rolled out)."""
    tags = version.tags
    try:
        if SEEDS_TAG in tags:
            start, stop = (int(part) for part in tags[SEEDS_TAG].split(":"))
            return range(start, stop)
        if "arf.eval.seed" not in tags:
            return None
        count = max(int(tags.get("arf.eval.episodes", "0")),
                    int(tags.get("arf.gate.episodes", "0")))
        return range(int(tags["arf.eval.seed"]), int(tags["arf.eval.seed"]) + count)
    except ValueError:
        raise SpecError(
            f"{version.name} v{version.version} has malformed evaluation tags "
            f"({ {k: v for k, v in tags.items() if k.startswith(('arf.eval.', 'arf.gate.ep'))} }),"
            " so the field seeds cannot be checked against its evaluation seeds; evaluate the "
            f"version again to rewrite them (or correct {SEEDS_TAG}: START:STOP)") from None


def check_field_seeds(client: Any, name: str, seeds: range) -> None:
    """Refuse field seeds that overlap the evaluation seeds of any version of `name` (the
    versions of one model share their template's evaluation seeds)."""
    clashes = []
    for version in client.search_model_versions(f"name = '{name}'"):
        used = _evaluated_seeds(version)
        if used is not None and used.start < seeds.stop and seeds.start < used.stop:
            clashes.append((int(version.version), used))
    if not clashes:
        return
    clashes.sort(key=lambda item: item[0])
    stop = max(used.stop for _, used in clashes)
    listed = ", ".join(f"v{v} on {used.start}:{used.stop}" for v, used in clashes)
    raise SpecError(
        f"field seeds {seeds.start}:{seeds.stop} overlap the evaluation seeds of {name} "
        f"({listed}); failures on them would leak the promotion gate's test episodes into "
        f"training. Pick --first-seed {stop} or above (or a range ending before "
        f"{min(used.start for _, used in clashes)})")
