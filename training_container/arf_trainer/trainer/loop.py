"""The training loop, torchtitan-shaped: `build` assembles the named parts, `train` runs a
short loop over them.

Parts (each with its own state, in its own module):

* data        the loader (loaders.py: in memory, or stream.py): this rank's batches of an
              epoch from an exact position, and its share of the validation split;
* state       model, optimizer, the DDP-wrapped core the step trains, `Progress` (state.py);
* checkpoint  complete-or-absent ``step-N`` saves and the resume (state.py, checkpoint.py);
* metrics     rank 0's MLflow run through the tracking spool (metrics.py);
* preemption  SIGTERM -> all ranks agree to stop after the same step, save, exit 75;
* trial       an HPO trial's per-epoch report and pruning answer (only in trials).

Determinism: every part is seeded from the spec's seed (+rank for per-rank streams),
deterministic algorithms are enforced (config.deterministic; training.deterministic: false
opts out for speed, recorded), data order is a pure function
of (seed, epoch) and the data, a batch's augmentation (`Recipe.augment`) of (seed, rank, step),
and loading stays in the main process.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from arf_trainer import tracking
from arf_trainer.errors import Preempted
from arf_trainer.preemption import PreemptionGuard
from arf_trainer.spec import StepEnv
from arf_trainer.trainer import accel, base_model, dist
from arf_trainer.trainer.config import TrainConfig, seed_all, train_dir_of
from arf_trainer.trainer.data import Manifest, rows_of
from arf_trainer.trainer.dist import DistEnv
from arf_trainer.trainer.finish import finish
from arf_trainer.trainer.metrics import MetricsSink, epoch_line
from arf_trainer.trainer.recipes import ModelInfo, Recipe
from arf_trainer.trainer.state import CheckpointPart, TrainState
from arf_trainer.trainer.testhooks import TestHooks

log = logging.getLogger(__name__)


class Preemption:
    """SIGTERM handling inside the loop (see arf_trainer.preemption for the guard)."""

    def __init__(self, guard: PreemptionGuard, denv: DistEnv, device: torch.device) -> None:
        self.guard, self.denv, self.device = guard, denv, device
        self.agreement: dist.StopAgreement | None = None

    def before_first_step(self, latest: int | None) -> None:
        if dist.any_rank(self.denv, self.guard.requested, self.device):
            resume_point = "none" if latest is None else f"step-{latest}"
            raise Preempted(
                "SIGTERM received during setup, before the first training step; no new "
                f"checkpoint written (resume point: {resume_point}). Rerun the same command "
                "to continue")
        self.agreement = dist.StopAgreement(self.denv, self.device)

    def stop_after(self, step: int) -> bool:
        """Whether every rank stops after `step` (the ranks agree every few steps)."""
        return self.agreement.stop(step, self.guard.requested)

    def stopped(self, step: int, total_steps: int, folder: Any) -> Preempted:
        when = ("on another rank" if self.guard.received_at is None else
                f"{time.monotonic() - self.guard.received_at:.1f} s ago")
        return Preempted(f"SIGTERM received ({when}); stopped after step {step}/{total_steps} "
                         f"and saved {folder}/step-{step}. Rerun the same command to resume")


class TrialPart:
    """An HPO trial: rank 0 reports each epoch and asks the pruner; every rank gets the answer,
    so all of them stop after the same epoch."""

    def __init__(self, env: StepEnv, denv: DistEnv) -> None:
        from arf_trainer.hpo import TrialReporter

        self.denv, self.inputs = denv, env.spec.inputs["hpo"]
        self.reporter = dist.run_on_main(
            denv, lambda: TrialReporter.open(env.spec.template["hpo"], self.inputs),
            "open the trial in the Optuna storage")
        self.pruned = False

    def report(self, epoch: int, epochs: int, metrics: dict[str, float]) -> bool:
        # Not after the last epoch: pruning then saves nothing, and a complete trial tells
        # the sampler more than a pruned one.
        last = epoch == epochs
        stop = dist.run_on_main(
            self.denv, lambda: self.reporter.report(epoch, metrics, ask_pruner=not last),
            "report to the Optuna trial")
        self.pruned = bool(dist.broadcast_from_main(self.denv, stop))
        if self.pruned and self.denv.is_main:
            log.info("trial %s pruned after epoch %d/%d (%s = %g)", self.inputs["trial_number"],
                     epoch, epochs, self.reporter.metric, metrics[self.reporter.metric])
        return self.pruned


@dataclass
class Clock:
    """Wall and CPU seconds of the loop, steps and samples run by this process (not replayed)."""

    start: float = field(default_factory=time.perf_counter)
    cpu_start: float = field(default_factory=time.process_time)
    steps: int = 0
    epoch_start: float = 0.0
    epoch_samples: int = 0


@dataclass
class Parts:
    env: StepEnv
    cfg: TrainConfig
    denv: DistEnv
    device: torch.device
    info: ModelInfo
    data: Any
    state: TrainState
    checkpoint: CheckpointPart
    metrics: MetricsSink
    preemption: Preemption
    trial: TrialPart | None
    hooks: TestHooks
    placement: accel.Placement
    started: tuple[str | None, str | None] | None = None
    train_rows: int = 0  # of the prepared train split: a run's compute, epochs x rows

    @property
    def total_steps(self) -> int:
        return self.cfg.hp.epochs * self.data.steps_per_epoch


def build(env: StepEnv, cfg: TrainConfig, manifest: Manifest, source: Any,
          loading: tuple[str, str], denv: DistEnv, device: torch.device,
          guard: PreemptionGuard) -> Parts:
    recipe, hp = cfg.recipe, cfg.hp
    out_dir = env.workspace / train_dir_of(env.spec)
    hooks = TestHooks.from_environ(
        trial_number=(env.spec.inputs.get("hpo") or {}).get("trial_number"))
    info = recipe.describe_data(manifest, hp, source.labels, source.feature_width)
    base = _pinned_base(env, cfg, manifest, denv, out_dir, info) if cfg.base_model else None
    if base is not None:
        info = base.info  # the base's architecture (and, for a classifier, its classes)
    state = _build_state(cfg, recipe, info, source, base, denv, device)
    data = source.loader(recipe, info, state.model, denv, cfg.per_rank_batch_size, cfg.seed)
    placement = accel.place(data, device)
    if denv.is_main:
        log.info("data placement: %s; precision %s%s%s", placement.label, cfg.precision,
                 ", torch.compile" if cfg.compile else "",
                 "" if cfg.deterministic else ", nondeterministic kernels (not reproducible)")
    checkpoint = CheckpointPart(out_dir / "checkpoints", cfg, denv, hooks,
                                data_fingerprint=manifest.raw["fingerprint"])
    checkpoint.resume(state, data)
    metrics = MetricsSink()

    def start_tracking() -> tuple[str | None, str | None]:
        try:
            with tracking.mlflow_errors(env.tracking_uri, "start the training run"):
                return metrics.start(
                    env, cfg, manifest, source, denv.world_size, loading,
                    extra_tags={**(base.tags if base is not None else {}),
                                "arf.data_placement": placement.label,
                                **accel.bitwise_record(device, cfg.precision, cfg.compile,
                                                       cfg.deterministic)},
                    extra_params={"data_placement": placement.mode,
                                  "precision": cfg.precision, "compile": cfg.compile,
                                  "deterministic": cfg.deterministic})
        except BaseException:
            metrics.end("FAILED")
            raise

    started = dist.run_on_main(denv, start_tracking, "start the MLflow run")
    trial = TrialPart(env, denv) if "trial_number" in (env.spec.inputs.get("hpo") or {}) \
        else None
    return Parts(env, cfg, denv, device, info, data, state, checkpoint, metrics,
                 Preemption(guard, denv, device), trial, hooks, placement, started,
                 manifest.rows("train"))


def _pinned_base(env: StepEnv, cfg: TrainConfig, manifest: Manifest, denv: DistEnv,
                 out_dir: Any, data: ModelInfo) -> base_model.BaseModel:
    # Resolved once (rank 0) and pinned in the workspace: a retry or a resumed run starts
    # from the same version even if the alias has moved since.
    folder = out_dir / base_model.FOLDER
    record = dist.broadcast_from_main(denv, dist.run_on_main(
        denv, lambda: base_model.pin(cfg.base_model, folder, env.tracking_uri),
        "resolve model.base_model"))
    base = base_model.load(record, folder)
    base_model.check_compatible(base, cfg.recipe.name, manifest.features, manifest.targets,
                                env.spec.hyperparameters, data=data)
    return base


def _build_state(cfg: TrainConfig, recipe: Recipe, info: ModelInfo, source: Any,
                 base: Any, denv: DistEnv, device: torch.device) -> TrainState:
    # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
    seed_all(cfg.seed)
    model = recipe.build_model(info)
    if base is None:
        source.set_normalization(recipe, model, info)
    else:
        # The base's weights and its input/output normalization: the fine-tune keeps serving
        # the same units, and the new data is standardized the way the base saw its data.
        model.load_state_dict(base.weights)
        frozen = base_model.freeze(model, cfg.freeze_layers)
        if frozen and denv.is_main:
            log.info("fine-tuning %s version %s with %s frozen", base.uri, base.version,
                     ", ".join(frozen))
    recipe.to_device(model, device)  # bc_pixels: channels_last convolutions on CUDA
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.hp.lr, weight_decay=cfg.hp.weight_decay)
    # The step trains the standardized core on standardized data (Recipe.training_tensors);
    # the normalization buffers live outside it, so DDP has no buffers to broadcast.
    net = accel.compiled(DDP(model.net) if denv.enabled else model.net, cfg.compile,
                         cfg.deterministic)
    seed_all(cfg.seed + denv.rank)  # from here on, per-rank streams
    return TrainState(model, optimizer, net)


def train(parts: Parts) -> dict[str, Any] | None:
    """Run the epochs left, save the final checkpoint, write the model (rank 0)."""
    p, hp = parts, parts.cfg.hp
    # Set-up leaves ~570k long-lived objects (torch, MLflow, SQLAlchemy, pyarrow); a full
    # collection scans all of them: 0.3 s that lands somewhere in the training loop (15% of a
    # short run in bench/harness_overhead.py, and a stall for every other rank under DDP).
    # Frozen, they are out of the collector's way; the loop's own garbage is still collected.
    gc.freeze()
    try:
        p.preemption.before_first_step(p.checkpoint.latest)
        clock = Clock()
        for epoch in range(p.state.progress.epoch, hp.epochs):
            run_epoch(p, epoch, clock)
            metrics = end_epoch(p, clock)
            if p.trial is not None and p.trial.report(epoch + 1, hp.epochs, metrics):
                break
        p.checkpoint.save(p.state, p.data)  # the final checkpoint (skipped if it exists)
        timing = {"checkpoint_seconds": p.checkpoint.seconds,
                  "train_seconds": time.perf_counter() - clock.start,
                  "train_cpu_seconds": time.process_time() - clock.cpu_start}
        return dist.run_on_main(p.denv, lambda: finish(p, timing), "write the trained model")
    except BaseException as exc:
        if p.denv.is_main:
            p.metrics.end("KILLED" if isinstance(exc, Preempted) else "FAILED")
        raise
    finally:
        gc.unfreeze()  # tests and benchmarks call run_train many times in one process


def run_epoch(p: Parts, epoch: int, clock: Clock) -> None:
    state, progress, recipe, move = p.state, p.state.progress, p.cfg.recipe, p.placement.move
    state.net.train()
    clock.epoch_start, clock.epoch_samples = time.perf_counter(), 0
    # Summed on the device: read (one sync) at the epoch's end and before a checkpoint.
    loss_sum = accel.LossSum(progress.loss_sum, p.device)
    for x, y in p.data.batches(epoch, skip=progress.batches_done):
        x, y = move(x), move(y)
        x = recipe.augment(x, p.cfg.hp, (p.cfg.seed, p.denv.rank, progress.step))
        with accel.autocast(p.device, p.cfg.precision):
            loss = recipe.training_loss(state.net(x), y)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        progress.step += 1
        progress.batches_done += 1
        loss_sum.add(loss, len(y))
        progress.samples += len(y)
        clock.epoch_samples += len(y) * p.denv.world_size
        clock.steps += 1
        p.hooks.after_step(progress.step, p.denv.rank)
        if p.checkpoint.due(progress.step):
            progress.loss_sum = loss_sum.value()
            p.checkpoint.save(state, p.data, wait=False)  # async_checkpoint: in the background
        if p.preemption.stop_after(progress.step):
            progress.loss_sum = loss_sum.value()
            p.checkpoint.save(state, p.data)  # no-op if the periodic one ran
            raise p.preemption.stopped(progress.step, p.total_steps, p.checkpoint.folder)
    progress.loss_sum = loss_sum.value()


def end_epoch(p: Parts, clock: Clock) -> dict[str, float]:
    """All-reduce the epoch's loss, validate, log on rank 0; returns the epoch's metrics."""
    progress = p.state.progress
    loss_sum, samples = dist.all_reduce_sum(p.denv, [progress.loss_sum, progress.samples],
                                            p.device)
    metrics = {"train_loss": loss_sum / samples, **evaluate(p)}
    p.state.progress = progress = progress.next_epoch(metrics)
    if p.denv.is_main:
        now = time.perf_counter()
        rate = clock.epoch_samples / max(now - clock.epoch_start, 1e-9)
        per_step = (now - clock.start) / max(clock.steps, 1)
        log.info(epoch_line(progress, p.cfg.hp.epochs, p.total_steps, rate, per_step))
        # An epoch replayed entirely from a checkpoint has no throughput to report.
        throughput = {"samples_per_s": rate} if clock.epoch_samples else {}
        p.metrics.log({**progress.metrics, **throughput}, step=progress.step)
    return metrics


def evaluate(p: Parts) -> dict[str, float]:
    """Validation loss (and accuracy) over the whole val split: each rank scores its share,
    then the sums are all-reduced (exact: no padding). Summed on the device, read once."""
    model, recipe, move = p.state.model, p.cfg.recipe, p.placement.move
    model.eval()
    loss_sum, n = accel.LossSum(0.0, p.device), 0.0
    correct = torch.zeros((), dtype=torch.int64, device=p.device)
    with accel.no_grad_autocast(p.device, p.cfg.precision):
        for x, y in p.data.val_chunks():
            x, y = move(x), move(y)
            out = model(x)
            loss_sum.add(recipe.loss(model, out, y), len(y))
            n += rows_of(x)
            if recipe.reports_accuracy:
                correct += (out.argmax(dim=1) == y).sum()
    loss_sum, n, correct = dist.all_reduce_sum(
        p.denv, [loss_sum.value(), n, float(correct.item())], p.device)
    if n == 0:
        return {}
    metrics = {"val_loss": loss_sum / n}
    if recipe.reports_accuracy:
        metrics["val_accuracy"] = correct / n
    return metrics
