"""The failure loop's report: goals computed from the rows, the table, the plot, the MLflow
record (`arf_training.failure_loop` runs the loop; this module only reads its rows)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

MODEL = "reach_bc_policy"


def summarize(config: Any, nights: list[Any], scratch: Any) -> dict[str, Any]:
    """The figures the issue asks for, from the rows; goals checked, not assumed."""
    finetunes = [n for n in nights[1:] if not n.skipped]
    ft_steps = sum(n.steps for n in finetunes)
    ft_seconds = sum(n.train_seconds for n in finetunes)
    final = nights[-1].champion_after_rate
    reached = next((i for i, n in enumerate(nights)
                    if i > 0 and (n.champion_after_rate or 0) >= config.goal_rate), None)
    # "No worse model promoted": every promotion beat the champion it replaced on the paired
    # seeds (the gate's own comparison), and the champion's rate never went down.
    promoted = [n for n in nights[1:] if n.promoted]
    worse = [n.label for n in promoted
             if n.champion_rate is not None and n.success_rate is not None
             and (n.gate_candidate_rate if n.gate_candidate_rate is not None
                  else n.success_rate) <= n.champion_rate]
    rates = [n.champion_after_rate for n in nights if n.champion_after_rate is not None]
    monotone = all(b >= a for a, b in zip(rates, rates[1:]))
    compute = ft_steps / scratch.steps if scratch.steps else None
    gap = (final - scratch.success_rate) if final is not None and scratch.success_rate is not None \
        else None
    goals = {
        f"champion >= {config.goal_rate:.0%} within {config.nights} nights": reached is not None,
        f"fine-tunes <= {config.goal_compute:.0%} of from-scratch steps":
            compute is not None and compute <= config.goal_compute,
        f"final champion within {config.goal_gap * 100:.0f} points of from scratch (or better)":
            gap is not None and gap >= -config.goal_gap,
        "no worse model promoted": not worse and monotone,
    }
    return {
        "config": asdict(config),
        "nights": [asdict(n) for n in nights],
        "scratch": asdict(scratch),
        "finetune_steps": ft_steps,
        "finetune_train_seconds": round(ft_seconds, 1),
        "scratch_steps": scratch.steps,
        "scratch_train_seconds": scratch.train_seconds,
        "compute_ratio_steps": compute,
        "compute_ratio_seconds": (ft_seconds / scratch.train_seconds
                                  if scratch.train_seconds else None),
        "start_rate": nights[0].success_rate,
        "final_champion_rate": final,
        "scratch_rate": scratch.success_rate,
        "gap_to_scratch": gap,
        "first_night_at_goal": reached,
        "worse_promotions": worse,
        "goals": goals,
    }


def format_table(summary: dict[str, Any]) -> str:
    head = (f"{'night':<13} {'date':<10} {'field':>6} {'corr':>5} {'ver':>4} "
            f"{'success [95% CI]':>18} {'paired':>9} {'n':>4} {'p':>7} {'gate':<9} "
            f"{'champion':>9} {'steps':>6} "
            f"{'train s':>8} {'DAG s':>6}")
    lines = [head, "-" * len(head)]
    for n in [*summary["nights"], summary["scratch"]]:
        date = (n["logical_date"] or "")[:10]
        fld = f"{n['field_success_rate']:.0%}" if n["field_success_rate"] is not None else ""
        corr = str(n["corrected_episodes"]) if n["logical_date"] else ""
        if n["skipped"]:
            lines.append(f"{n['label']:<13} {date:<10} {fld:>6} {corr:>5}  skipped: "
                         f"{n['skipped']}")
            continue
        ci = n["ci95"] or (0, 0)
        rate = f"{n['success_rate']:.0%} [{ci[0]:.0%},{ci[1]:.0%}]"
        # Candidate vs champion on the gate's paired seeds, how many, and the p-value.
        champ = (f"{n.get('gate_candidate_rate') or 0:.0%}/{n['champion_rate']:.0%}"
                 if n["champion_rate"] is not None else "-")
        used = str(n.get("gate_episodes") or "-")
        p = f"{n['gate_p_value']:.2g}" if n.get("gate_p_value") is not None else "-"
        gate = "by hand" if n["by_hand"] else {True: "promoted", False: "rejected",
                                                None: "-"}[n["promoted"]]
        if n["model"] != MODEL:  # the from-scratch reference: a model of its own, no gate
            gate = champ = used = p = "-"
        after = (f"v{n['champion_after']} {n['champion_after_rate']:.0%}"
                 if n["champion_after"] and n["champion_after_rate"] is not None else "-")
        lines.append(f"{n['label']:<13} {date:<10} {fld:>6} {corr:>5} "
                     f"{'v' + str(n['candidate_version']):>4} {rate:>18} {champ:>9} {used:>4} "
                     f"{p:>7} {gate:<9} "
                     f"{after:>9} {n['steps']:>6} {n['train_seconds']:>8.1f} "
                     f"{n['dag_seconds']:>6.0f}")
    s = summary
    ratio = s["compute_ratio_steps"]
    lines += [
        "",
        f"fine-tunes: {s['finetune_steps']} optimizer steps, {s['finetune_train_seconds']} s of "
        f"training; from scratch: {s['scratch_steps']} steps, {s['scratch_train_seconds']} s "
        f"-> {ratio:.1%} of the steps" if ratio is not None else "compute ratio: n/a",
        f"success: start {s['start_rate']:.0%} -> champion {s['final_champion_rate']:.0%} after "
        f"{s['config']['nights']} nights; from scratch on all data {s['scratch_rate']:.0%} "
        f"(gap {s['gap_to_scratch'] * 100:+.0f} points)",
    ]
    lines += [f"{n['label']}: {n['recipe']} ({n['recipe_reason']})" for n in s["nights"]
              if n.get("recipe")]
    lines += [f"  [{'x' if ok else ' '}] {goal}" for goal, ok in s["goals"].items()]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nights = summary["nights"]
    xs = list(range(len(nights)))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    cand = [(x, n) for x, n in zip(xs, nights, strict=True) if n["success_rate"] is not None]
    ax.errorbar([x for x, _ in cand], [n["success_rate"] for _, n in cand],
                # max(0, ...): a Wilson bound of a 0 % or 100 % rate can round past the rate.
                yerr=[[max(0.0, n["success_rate"] - n["ci95"][0]) for _, n in cand],
                      [max(0.0, n["ci95"][1] - n["success_rate"]) for _, n in cand]],
                fmt="o", capsize=3, color="tab:blue", label="candidate (95% CI)")
    for x, n in cand:
        if n["promoted"]:
            ax.plot([x], [n["success_rate"]], "o", mfc="none", ms=12, color="tab:green")
    champ = [(x, n["champion_after_rate"]) for x, n in zip(xs, nights, strict=True)
             if n["champion_after_rate"] is not None]
    ax.step([x for x, _ in champ], [r for _, r in champ], where="post", color="tab:green",
            label="champion (circled: promoted)")
    if summary["scratch_rate"] is not None:
        ax.axhline(summary["scratch_rate"], ls="--", color="tab:gray",
                   label=f"from scratch on all data ({summary['scratch_rate']:.0%})")
    ax.axhline(summary["config"]["goal_rate"], ls=":", color="tab:red", label="goal")
    ax.set_xticks(xs, ["start", *[f"night {i}" for i in xs[1:]]])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("success rate (evaluation seeds)")
    ax.set_title("reach_bc_policy: nightly fine-tunes on corrected failures")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_to_mlflow(tracking_uri: str, summary: dict[str, Any], record: Path, png: Path) -> str:
    """One MLflow run with the per-night rates as a metric series, the table and the plot."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("arf-failure-loop")
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment("arf-failure-loop"))
    run = client.create_run(experiment_id, run_name="failure-loop")
    now = int(time.time() * 1000)
    metrics = [Metric("champion_success_rate", n["champion_after_rate"], now, i)
               for i, n in enumerate(summary["nights"]) if n["champion_after_rate"] is not None]
    metrics += [Metric("candidate_success_rate", n["success_rate"], now, i)
                for i, n in enumerate(summary["nights"]) if n["success_rate"] is not None]
    for key in ("compute_ratio_steps", "scratch_rate", "final_champion_rate", "gap_to_scratch"):
        if summary[key] is not None:
            metrics.append(Metric(key, float(summary[key]), now, 0))
    client.log_batch(run.info.run_id, metrics=metrics)
    client.log_artifact(run.info.run_id, str(record))
    client.log_artifact(run.info.run_id, str(png))
    client.log_text(run.info.run_id, format_table(summary), "failure-loop.txt")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
