"""The failure-learning loop, measured: `arf demo failure-loop` and `bench/failure_loop.py`.

Starting from a deliberately weak champion (reach_bc trained on a few demonstrations), every
simulated night runs the platform's loop through the real DAGs and commands:

0. start:    the weak version is named champion by hand when the gate's success threshold
             refuses it (a first version becomes champion through the gate only if it passes);
1. field:    `arf-trainer fleet` rolls the champion out on field seeds (never the evaluation
             seeds) and records the failed episodes in the data hub's `failures` table;
2. correct:  `arf-trainer datahub correct --seeds` relabels those failures with the expert
             (DAgger) into `corrections`, collected inside the night's data interval;
3. fine-tune: `airflow dags test reach_bc_failure_finetune <night>` (logical dates one day
             apart) fine-tunes the champion on that night's corrections plus replay;
4. gate:     `airflow dags test arf_evaluate` with the candidate, as the Asset event would:
             success rate with its 95 % interval on the fixed evaluation seeds, and the
             promotion gate against the champion on the same seeds.

At the end `reach_bc_retrain` trains from scratch on all the data the last night had (the
demonstrations plus every correction) for the compute comparison. Everything runs in a home of
its own (`<ARF_HOME>/failure-loop/<time>`), so the loop starts from the same weak state each
time and never touches the user's registry or data hub. The table, a JSON record and a PNG of
success rate per night are written there and logged to MLflow (experiment `arf-failure-loop`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from arf_training.errors import ArfError, ConfError
from arf_training.failure_loop_report import MODEL, format_table, log_to_mlflow, plot, summarize
from arf_training.settings import ArfSettings, venv_bin

__all__ = ["MODEL", "LoopConfig", "Night", "Loop", "format_table", "plot", "summarize",
           "run_failure_loop"]
SCRATCH_MODEL = "reach_bc_policy_retrain"
BASE_TEMPLATE, FINETUNE_TEMPLATE, SCRATCH_TEMPLATE = (
    "reach_bc", "reach_bc_failure_finetune", "reach_bc_retrain")
# Field seeds: far from the evaluation seeds of reach_bc (100000..100049) and from the
# demonstrations' (drawn from a SeedSequence), one block of `field_episodes` per night.
PARTIAL_RECORD = "failure-loop.partial.json"  # the nights so far; gone once the loop completes
FIELD_SEED0 = 500_000
FIELD_SEEDS_PER_LOOP = 100_000  # --seed k uses field seeds from FIELD_SEED0 + k * this
FIRST_NIGHT = dt.datetime(2026, 12, 1, 2, 0, tzinfo=dt.UTC)  # the first night's logical date


@dataclass(frozen=True)
class LoopConfig:
    nights: int = 4
    demos: int = 50  # expert episodes the weak champion learns from
    field_episodes: int = 150  # field rollouts of the champion per night
    seed: int = 0  # of the demonstrations, and which block of field seeds the nights use
    # Which field states the expert relabels each night: "all" (DAgger: every visited state,
    # successful episodes too) or "failed" (the failed episodes only, the earlier recipe).
    states: str = "all"
    # Let the fine-tune template's `nightly:` rule choose each night between a fine-tune and a
    # retrain on the aggregate (the DAG's choose_recipe task); off: every night fine-tunes.
    adaptive: bool = False
    base_conf: dict[str, Any] = field(default_factory=dict)  # reach_bc trigger conf
    finetune_conf: dict[str, Any] = field(default_factory=dict)  # nightly trigger conf
    scratch_conf: dict[str, Any] = field(default_factory=dict)  # reach_bc_retrain trigger conf
    goal_rate: float = 0.90
    goal_compute: float = 0.25
    goal_gap: float = 0.02

    def check(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed < 100:
            raise ConfError(f"failure loop: --seed {self.seed!r} must be an integer in 0..99")
        for name in ("nights", "demos", "field_episodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfError(f"failure loop: --{name.replace('_', '-')} {value!r} must be "
                                "a positive integer")
        if self.nights * self.field_episodes > FIELD_SEEDS_PER_LOOP:
            raise ConfError(f"failure loop: --nights x --field-episodes = "
                            f"{self.nights * self.field_episodes} field seeds, more than the "
                            f"{FIELD_SEEDS_PER_LOOP} of one --seed's block (they would reuse "
                            "the next seed's); lower one of them")
        if self.states not in ("all", "failed"):
            raise ConfError(f"failure loop: --states {self.states!r} must be 'all' or 'failed'")
        self._check_confs()

    def _check_confs(self) -> None:
        """Each trigger conf against its template's Params now, not at night 1 after the weak
        start has trained (a typo would cost that much)."""
        from arf_training.params import resolve_conf
        from arf_training.settings import templates_dir
        from arf_training.templates import load_folder, template_files

        found = {t.name: t.template for t in load_folder(template_files(templates_dir()))[0]}
        for template, conf, what in ((BASE_TEMPLATE, self.base_conf, "base_conf"),
                                     (FINETUNE_TEMPLATE, self.finetune_conf, "--conf"),
                                     (SCRATCH_TEMPLATE, self.scratch_conf, "scratch_conf")):
            if not isinstance(conf, dict):
                raise ConfError(f"failure loop: {what} {conf!r:.60} must be a JSON object of "
                                f"{template}'s Params, e.g. {{\"epochs\": 5}}")
            if template not in found:
                raise ConfError(f"failure loop: needs the template {template!r}, which is not "
                                f"a valid template in {templates_dir()} (`arf templates lint`)")
            try:
                resolve_conf(found[template], conf)
            except ConfError as exc:
                raise ConfError(f"failure loop: {what}: {exc}") from None


@dataclass
class Night:
    """One row of the table: night 0 is the weak start, `scratch` the from-scratch reference."""

    label: str
    model: str = MODEL
    logical_date: str | None = None
    field_success_rate: float | None = None  # the champion's, on this night's field seeds
    corrected_episodes: int = 0
    corrected_rows: int = 0
    candidate_version: str | None = None
    skipped: str | None = None  # why the fine-tune run was skipped
    recipe: str | None = None  # fine-tune or retrain (adaptive nights), with the reason
    recipe_reason: str | None = None
    success_rate: float | None = None
    ci95: tuple[float, float] | None = None
    champion_rate: float | None = None  # the champion's rate on the gate's paired seeds
    gate_candidate_rate: float | None = None  # the candidate's on the same paired seeds
    gate_p_value: float | None = None
    gate_episodes: int | None = None  # paired seeds the sequential gate used
    promoted: bool | None = None
    by_hand: bool = False  # the weak start, named champion by hand (the gate refused it)
    gate_reason: str | None = None
    champion_after: str | None = None
    champion_after_rate: float | None = None
    train_rows: int | None = None
    steps: int = 0
    train_seconds: float = 0.0  # the train step's own timing (training loop only)
    dag_seconds: float = 0.0  # wall time of the training DAG run (prepare, train, register)
    eval_seconds: float = 0.0


class Loop:
    """Runs the loop in a fresh home; each method is one step of one night."""

    def __init__(self, home: Path, config: LoopConfig, verbose: bool = False) -> None:
        from arf_training.embedded import environment

        config.check()
        self.home, self.config, self.verbose = home, config, verbose
        if home.exists() and any(home.iterdir()):
            raise ConfError(f"failure loop: home {home} is not empty; a loop starts from an "
                            "empty home: give a new folder (or leave it out for a fresh one)")
        home.mkdir(parents=True, exist_ok=True)
        self.settings = ArfSettings(home=home, tracking_uri=f"sqlite:///{home}/mlflow.db",
                                    datahub_uri=str(home / "datahub"),
                                    artifact_root=str(home / "mlartifacts"))
        os.environ.pop("ARF_WORKSPACE_ROOT", None)
        self.env = environment(self.settings)
        # This process reads the Airflow DB and MLflow of the loop's home (before any import).
        os.environ.update(self.env)
        self.log_path = home / "failure-loop.log"
        self.nights: list[Night] = []
        self.champion_rate: float | None = None

    # -- commands ----------------------------------------------------------------------------

    def _trainer(self, *args: str) -> dict[str, Any]:
        """Run `arf-trainer ARGS` (a JSON summary on stdout after the log lines)."""
        proc = self._run([venv_bin("arf-trainer"), *args])
        out = proc.stdout
        start = out.rfind("\n{") + 1 if "\n{" in out else out.find("{")
        return json.loads(out[start:])

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
        proc = subprocess.run(command, env=self.env, capture_output=True, text=True)
        with open(self.log_path, "a") as log:
            log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise ArfError(f"failure loop: `{' '.join(command[:3])} ...` exited "
                           f"{proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}\n"
                           f"full log: {self.log_path}")
        return proc

    def _dag(self, dag_id: str, conf: dict[str, Any], logical_date: str | None = None
             ) -> tuple[Any, float]:
        from arf_training.demo import _dags_test

        return _dags_test(dag_id, conf, self.env, self.log_path, self.verbose,
                          logical_date=logical_date)

    def _workspace(self, dag_id: str, run_id: str) -> Path:
        from arf_training.stepspec import workspace_for

        return workspace_for(self.settings, dag_id, run_id)

    # -- steps -------------------------------------------------------------------------------

    def start(self) -> Night:
        """Seed a few demonstrations, train the weak champion, evaluate it (the gate makes the
        first evaluated version champion)."""
        from arf_training.embedded import migrate

        self._trainer("datahub", "seed", "--hub", self.settings.datahub_uri,
                      "--episodes", str(self.config.demos), "--seed", str(self.config.seed))
        migrate(self.env)
        night = Night(label="start")
        self._train(night, BASE_TEMPLATE, self.config.base_conf)
        self._evaluate(night)
        if not night.promoted:
            # The gate makes a first version champion only if it passes the success threshold,
            # which a weak start does not: name it champion by hand, as an operator would.
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=self.settings.tracking_uri).set_registered_model_alias(
                MODEL, "champion", str(night.candidate_version))
            night.gate_reason = f"{night.gate_reason} -> champion alias set by hand"
            night.by_hand = True
            night.champion_after = str(night.candidate_version)
            self.champion_rate = night.champion_after_rate = night.success_rate
        return night

    def night(self, n: int) -> Night:
        logical = FIRST_NIGHT + dt.timedelta(days=n - 1)
        interval_start = logical - dt.timedelta(days=1)
        night = Night(label=f"night {n}", logical_date=logical.isoformat())
        first = (FIELD_SEED0 + self.config.seed * FIELD_SEEDS_PER_LOOP
                 + (n - 1) * self.config.field_episodes)
        stop = first + self.config.field_episodes
        fleet = self._trainer(
            "fleet", "--model", f"models:/{MODEL}@champion", "--hub", self.settings.datahub_uri,
            "--first-seed", str(first), "--episodes", str(self.config.field_episodes),
            "--label", f"night-{n}", "--tracking-uri", self.settings.tracking_uri,
            "--recorded-at", (interval_start + dt.timedelta(hours=6)).isoformat())
        night.field_success_rate = fleet["success_rate"]
        corrected = self._trainer(
            "datahub", "correct", "--hub", self.settings.datahub_uri, "--model", MODEL,
            "--seeds", f"{first}:{stop}", "--states", self.config.states,
            "--collected-at", (interval_start + dt.timedelta(hours=12)).isoformat())
        night.corrected_episodes, night.corrected_rows = corrected["episodes"], corrected["rows"]
        # The DAG's choose_recipe task applies the template's nightly rule (auto), as on the
        # schedule; without --adaptive the conf asks for a fine-tune every night.
        conf = {"nightly_recipe": "auto" if self.config.adaptive else "fine-tune",
                **self.config.finetune_conf}
        self._train(night, FINETUNE_TEMPLATE, conf, logical.isoformat())
        if night.recipe is not None:
            self._say(f"night {n}: {night.recipe} ({night.recipe_reason})")
        if night.skipped is None:
            self._evaluate(night)
        else:
            night.champion_after_rate = self.champion_rate
        return night

    def scratch(self) -> Night:
        night = Night(label="from scratch")
        self._train(night, SCRATCH_TEMPLATE, self.config.scratch_conf)
        self._evaluate(night)
        return night

    def _train(self, night: Night, dag_id: str, conf: dict[str, Any],
               logical_date: str | None = None) -> None:
        run, wall = self._dag(dag_id, conf, logical_date)
        night.dag_seconds = round(wall, 1)
        ws = self._workspace(dag_id, run.run_id)
        chosen = ws / "choose" / "result.json"
        if chosen.exists():  # a template with a nightly: section
            choice = json.loads(chosen.read_text())
            night.recipe, night.recipe_reason = choice["recipe"], choice["reason"]
        register = ws / "register" / "result.json"
        if not register.exists():
            from arf_training.demo import task_states

            states = task_states(dag_id, run.run_id)
            if states.get("prepare_data") != "skipped":
                raise ArfError(f"failure loop: {dag_id} run {run.run_id} registered nothing "
                               f"(tasks {states}); see {self.log_path}")
            night.skipped = "no corrections in the night's data interval"
            return
        train = json.loads((ws / "train" / "result.json").read_text())
        prepare = json.loads((ws / "prepare" / "result.json").read_text())
        night.train_rows = prepare.get("train_rows")
        night.steps = int(train["steps"])
        night.train_seconds = round(float((train.get("timing") or {}).get("train_seconds", 0)), 2)
        registered = json.loads(register.read_text())
        night.candidate_version = str(registered["model_version"])
        night.model = registered["model_name"]

    def _evaluate(self, night: Night) -> None:
        from arf_training.factory import EVALUATE_DAG_ID

        name = night.model
        run, wall = self._dag(EVALUATE_DAG_ID, {"model_name": name,
                                                "model_version": night.candidate_version})
        night.eval_seconds = round(wall, 1)
        ws = self._workspace(EVALUATE_DAG_ID, run.run_id)
        result = json.loads(next(ws.glob("evaluate-*/result.json")).read_text())
        night.success_rate = result["success_rate"]
        night.ci95 = (result["success_rate_ci95_low"], result["success_rate_ci95_high"])
        gate = result.get("gate") or {}
        night.promoted = gate.get("promoted")
        night.gate_reason = gate.get("reason")
        night.champion_rate = gate.get("champion_rate")
        night.gate_candidate_rate = gate.get("candidate_rate")
        night.gate_p_value, night.gate_episodes = gate.get("p_value"), gate.get("episodes")
        if name != MODEL:  # the from-scratch reference is a model of its own
            return
        if night.promoted:
            self.champion_rate = night.success_rate
        night.champion_after = gate.get("champion_version")
        night.champion_after_rate = self.champion_rate

    # -- the whole loop ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self._say(f"home {self.home} (log {self.log_path})")
        start = self.start()
        self.nights.append(start)
        self._say(_row(start))
        self._record_so_far()
        for n in range(1, self.config.nights + 1):
            self.nights.append(self.night(n))
            self._say(_row(self.nights[-1]))
            self._record_so_far()
        scratch = self.scratch()
        self._say(_row(scratch))
        summary = summarize(self.config, self.nights, scratch)
        summary.update(home=str(self.home), log=str(self.log_path),
                       total_seconds=round(time.monotonic() - t0, 1))
        out = self.home / "failure-loop.json"
        out.write_text(json.dumps(summary, indent=2, default=str))
        png = plot(summary, self.home / "failure-loop.png")
        summary["plot"] = str(png)
        summary["mlflow_run_id"] = log_to_mlflow(self.settings.tracking_uri, summary, out, png)
        out.write_text(json.dumps(summary, indent=2, default=str))
        (self.home / PARTIAL_RECORD).unlink(missing_ok=True)
        return summary

    def _record_so_far(self) -> None:
        """The nights done so far, rewritten after each: a loop that fails at night 3 of 4
        (after an hour) keeps what nights 0-2 measured, not only the console's lines."""
        partial = {"config": asdict(self.config), "nights": [asdict(n) for n in self.nights],
                   "complete": False}
        tmp = self.home / f".{PARTIAL_RECORD}.tmp"
        tmp.write_text(json.dumps(partial, indent=2, default=str))
        os.replace(tmp, self.home / PARTIAL_RECORD)

    def _say(self, text: str) -> None:
        print(f"[failure-loop] {text}", flush=True)


def _row(n: Night) -> str:
    if n.skipped:
        return f"{n.label}: skipped ({n.skipped})"
    ci = f" [{n.ci95[0]:.0%}, {n.ci95[1]:.0%}]" if n.ci95 else ""
    gate = ("named champion by hand" if n.by_hand else
            ("promoted" if n.promoted else "kept champion") if n.promoted is not None else "")
    return (f"{n.label}: v{n.candidate_version} {n.success_rate:.0%}{ci} {gate}; "
            f"{n.steps} steps, train {n.train_seconds:.1f} s, DAG {n.dag_seconds:.0f} s")


def _new_home(parent: Path) -> Path:
    """A new, empty folder under `parent`, made here: loops started in the same second
    (several --seed values in parallel) each get their own (mkdir is the atomic claim)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        home = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            home.mkdir()
            return home
        except FileExistsError:
            continue
    raise ArfError(f"failure loop: 999 homes named {stamp}* exist in {parent}; remove old ones")


def run_failure_loop(config: LoopConfig, home: Path | None = None,
                     verbose: bool = False) -> dict[str, Any]:
    config.check()  # before a home is made for it
    home = home or _new_home(ArfSettings.from_env().home / "failure-loop")
    loop = Loop(home, config, verbose)  # a home of its own (it refuses one that is not empty)
    try:
        summary = loop.run()
    finally:
        # Its `airflow dags test` runs started the home's PostgreSQL detached: stop it, or one
        # server per loop stays up (a later `arf` command in that home starts it on demand).
        from arf_training.postgres import EmbeddedPostgres

        EmbeddedPostgres(home).stop()  # a no-op when none runs (or under ARF_DB=sqlite)
    print(format_table(summary), flush=True)
    print(f"[failure-loop] plot {summary['plot']}; record {home / 'failure-loop.json'}; MLflow "
          f"run {summary['mlflow_run_id']} (experiment arf-failure-loop) in "
          f"{summary['home']}/mlflow.db", flush=True)
    return summary

