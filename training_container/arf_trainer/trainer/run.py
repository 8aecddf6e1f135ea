"""`arf-trainer train`: parse -> validate -> build -> train -> close, in the shape of torchtitan's
train.py, for the built-in recipes (`training.recipe`: bc, classifier).

Runs as one process or under torchrun (DDP; gloo on CPU, NCCL on GPU). Reads the prepare step's
manifest and Parquet shards (whole or streamed: data.py), writes under ``<workspace>/train/``::

    checkpoints/step-N/   see checkpoint.py; a retried task resumes from the highest one
    base_model/           a fine-tune's base (model.base_model), resolved once and pinned:
                          base_model.json, model.pt, model_info.json (see base_model.py)
    model.pt              final state_dict (CPU tensors, sorted keys)
    model_info.json       what the register step needs to rebuild the module (ModelInfo)
    result.json           written last; its presence with valid weights means "done"

Determinism: the same spec, data, world size and OMP_NUM_THREADS give bit-identical weights,
on either loading path (see loop.py).

Preemption: SIGTERM (Kubernetes, spot instances, torchrun forwarding it) makes every rank
finish its current step, agree to stop after the same step (one tiny all_reduce every ~0.25 s
of training), save a checkpoint and exit 75 (`Preempted`) within ARF_PREEMPTION_GRACE_S;
rerunning the same command resumes bit-identically. See arf_trainer.preemption.

Rank 0 alone tracks (metrics.py). The loop and its parts: loop.py.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from arf_trainer.errors import PREEMPTED_EXIT, Preempted
from arf_trainer.preemption import GRACE_ENV, sigterm_guard
from arf_trainer.spec import StepEnv
from arf_trainer.trainer import dist, loop
from arf_trainer.trainer.config import (  # noqa: F401  (names tests and tools import from here)
    RESULT_KEYS,
    TrainConfig,
    completed_result,
    deterministic,
    seed_all,
    train_dir_of,
)
from arf_trainer.trainer.data import choose_loading, load_manifest
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.finish import reuse_best_trial, with_best_trial
from arf_trainer.trainer.loaders import ShardedBatchSampler, open_source  # noqa: F401

log = logging.getLogger(__name__)


def run_train(env: StepEnv) -> dict[str, Any] | None:
    """Train the template's built-in recipe; return the result on rank 0, None elsewhere.

    On SIGTERM: raises `Preempted` (exit 75) after a checkpoint; see arf_trainer.preemption.
    """
    with sigterm_guard() as guard:
        denv = DistEnv.from_environ()
        hpo = env.spec.inputs.get("hpo")
        if hpo and hpo.get("select") == "best":
            env = with_best_trial(env)
        # Validate before any distributed init, so a bad spec fails at once on every rank.
        cfg = TrainConfig.from_spec(env.spec, denv.world_size)
        manifest = load_manifest(env.workspace / "prepare")
        done = _already_done(env, cfg, denv, manifest.raw["fingerprint"])
        if done is not None:
            return done if denv.is_main else None
        loading = choose_loading(cfg.data_loading, manifest, cfg.memory)
        source = open_source(loading[0], manifest, cfg.recipe, denv)
        # No process group yet, so no collective to agree in: each rank stops on its own.
        guard.check_setup("while loading the data")
        threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None
        if denv.is_main:
            log.info("on SIGTERM: finish the step, checkpoint and exit %d within %g s (%s)",
                     PREEMPTED_EXIT, guard.grace_s, GRACE_ENV)
            log.info("data loading: %s (%s)", *loading)
        with deterministic(threads, cfg.deterministic):
            device = dist.init(denv)
            try:
                # The ranks' parts of the data check: bad data fails every rank here, at once.
                source.agree(denv)
                result = loop.train(loop.build(env, cfg, manifest, source, loading, denv,
                                               device, guard))
            except Preempted:
                # The ranks agreed to stop after the same step and saved collectively: they
                # are in step with each other, so the clean (barrier) teardown is safe.
                dist.teardown(denv)
                raise
            # Any other failure: no teardown; the CLI ends a failed rank without destructors
            # (arf_trainer.cli._exit_failed_worker says why).
            dist.teardown(denv)
        return result


def _already_done(env: StepEnv, cfg: TrainConfig, denv: DistEnv,
                  data_fingerprint: str) -> dict[str, Any] | None:
    """A finished earlier attempt's result, or the best trial's when it trained this config."""
    train_dir = train_dir_of(env.spec)
    done = completed_result(env.workspace, cfg.config_hash, train_dir, data_fingerprint)
    if done is not None:
        if denv.is_main:
            log.info("training already finished for this run (%s); returning its result",
                     env.workspace / train_dir / "result.json")
        return done
    hpo = env.spec.inputs.get("hpo")
    if hpo and hpo.get("select") == "best":
        return reuse_best_trial(env, cfg)
    return None
