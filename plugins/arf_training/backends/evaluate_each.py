"""The evaluate task's loop over the model versions of its run, shared by both backends.

Asset events that arrive while `arf_evaluate` is busy are queued into one run, so one task may
evaluate several versions. Each finished evaluation has already tagged its version (with
approval required, `arf.gate.approval=pending`), and the approval tasks learn which versions
to ask about only from this task's return value. So a version whose evaluation fails must not
cost the others their result: every version is evaluated, the results of those that finished
become the task's XCom, and only then does the task fail, naming each failed version and why.

Airflow 3 stores a return value only when `execute` returns; a task that raises has none. The
results are therefore pushed explicitly under `return_value`, the key that
`xcom_pull(task_ids="evaluate")` reads. The push stays when the try fails, and Airflow clears
it when a retry starts (the retry pushes its own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from arf_training.errors import StepFailed

RETURN_VALUE = "return_value"  # Airflow's XCOM_RETURN_KEY


def evaluate_each(context: Any, targets: list[dict[str, str]],
                  evaluate: Callable[[dict[str, str]], dict[str, Any]], log: Any,
                  stopped: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
    """`evaluate(target)` for each target in turn, going on after a failure; the results, or
    (after pushing them) an exception naming every version that failed. `stopped` says
    whether the task was killed: then nothing more is evaluated."""
    results: list[dict[str, Any]] = []
    failed: list[tuple[str, Exception]] = []
    for target in targets:
        ref = f"models:/{target['model_name']}/{target['model_version']}"
        log.info("evaluating %s (from %s)", ref, target.get("source"))
        try:
            results.append(evaluate(target))
        except Exception as exc:
            if stopped():
                _push(context, results)
                raise
            log.error("evaluation of %s failed (the remaining versions are still evaluated): "
                      "%s", ref, exc)
            failed.append((ref, exc))
        except BaseException:
            # The task's time limit, or a deferral (only ever of a run's one version): the
            # versions finished so far are still handed to the approval tasks.
            if results:
                _push(context, results)
            raise
    if failed:
        _push(context, results)
        raise _failure(failed, results)
    return results


def _push(context: Any, results: list[dict[str, Any]]) -> None:
    context["ti"].xcom_push(key=RETURN_VALUE, value=results)


def _why(exc: Exception) -> str:
    """The first and last line of a step's failure: what failed, and (the last line of its
    output) the step's own reason; the whole text is in the task log above."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return f"{lines[0]} ... {lines[-1]}"


def _retryable(exc: Exception) -> bool:
    from airflow.sdk.exceptions import AirflowFailException

    return not isinstance(exc, AirflowFailException) and getattr(exc, "retryable", True)


def _failure(failed: list[tuple[str, Exception]], results: list[dict[str, Any]]) -> Exception:
    from airflow.sdk.exceptions import AirflowFailException

    done = ", ".join(f"models:/{r.get('model_name')}/{r.get('model_version')}" for r in results)
    message = (f"evaluation failed for {len(failed)} of {len(failed) + len(results)} model "
               "version(s): " + "; ".join(f"{ref}: {_why(exc)}" for ref, exc in failed)
               + (f". Evaluated: {done} (their results are this task's XCom; the approval "
                  "tasks ask about them)" if done else ""))
    # A retry evaluates every version again, but the evaluate step reuses a finished
    # evaluation of the same DAG run: only the failed ones roll out again. Worth it only if
    # one of them may pass on a retry (not bad input).
    if any(_retryable(exc) for _, exc in failed):
        return StepFailed(message)
    return AirflowFailException(message)
