#!/usr/bin/env python3
"""Static security scan of what the Kubernetes path ships: hadolint + checkov.

    python tests/k8s_scan/run_scanners.py [EXTRA.yaml ...]

Scans the training image's Dockerfile and the RBAC manifests (helm_values/rbac.yaml) always,
plus any Kubernetes YAML named on the command line (for example a rendered PyTorchJob).

Fails (exit 1) when:
  * hadolint reports anything at level "warning" or above on a Dockerfile;
  * checkov reports a failed check of severity HIGH or CRITICAL; or, because checkov's offline
    OSS run carries no severities, any failed check without a severity that is not listed with
    a reason in tests/k8s_scan/checkov-skips.yaml.
Exit 2 when a scanner is not installed (`make tools` puts both in .tools-venv).

The tools live in their own venv (.tools-venv): checkov pins many libraries that would clash
with Airflow's. Override their paths with ARF_CHECKOV / ARF_HADOLINT. Needs only the standard
library and PyYAML, and no network (checkov runs with --skip-download).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SKIPS_FILE = HERE / "checkov-skips.yaml"
DEFAULT_DOCKERFILES = [REPO / "training_container" / "Dockerfile"]
DEFAULT_MANIFESTS = [REPO / "helm_values" / "rbac.yaml", REPO / "helm_values" / "workspace-janitor.yaml"]
FAILING_SEVERITIES = {"HIGH", "CRITICAL"}
HADOLINT_THRESHOLD = "warning"


@dataclass(frozen=True)
class Skip:
    """One accepted checkov finding: a check id, why it is acceptable, and where (globs)."""

    check_id: str
    reason: str
    files: tuple[str, ...] = ("*",)

    def covers(self, check_id: str, file_path: str) -> bool:
        rel = file_path.lstrip("/")
        return check_id == self.check_id and any(
            fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(file_path, pattern)
            for pattern in self.files)


def load_skips(path: Path = SKIPS_FILE) -> list[Skip]:
    """Read the skip list; every entry must name a check id and give a non-empty reason."""
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("skips") or []
    if not isinstance(entries, list):
        raise SystemExit(f"{path}: 'skips' must be a list, got {type(entries).__name__}")
    skips = []
    for i, entry in enumerate(entries):
        check_id = str((entry or {}).get("id") or "").strip()
        reason = str((entry or {}).get("reason") or "").strip()
        if not check_id or not reason:
            raise SystemExit(f"{path}: skips[{i}] needs both 'id' and a non-empty 'reason' "
                             f"(got id={check_id!r}, reason={reason!r})")
        files = tuple((entry.get("files") or ["*"]))
        skips.append(Skip(check_id, reason, files))
    return skips


def find_tool(name: str, env_var: str) -> str | None:
    override = os.environ.get(env_var)
    if override:
        return override
    local = REPO / ".tools-venv" / "bin" / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def rel(path: Path | str) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def run_hadolint(hadolint: str, dockerfiles: list[Path]) -> list[str]:
    """Return one message per finding at or above the threshold."""
    problems: list[str] = []
    for dockerfile in dockerfiles:
        proc = subprocess.run(
            [hadolint, "--no-color", "-f", "json", "--failure-threshold", HADOLINT_THRESHOLD,
             str(dockerfile)], capture_output=True, text=True, check=False)
        try:
            findings = json.loads(proc.stdout or "[]")
        except json.JSONDecodeError:
            problems.append(f"hadolint {rel(dockerfile)}: unreadable output (rc={proc.returncode}): "
                            f"{(proc.stdout + proc.stderr)[-500:]}")
            continue
        levels = ["error", "warning", "info", "style"]
        cutoff = levels.index(HADOLINT_THRESHOLD)
        for f in findings:
            line = f"hadolint {rel(dockerfile)}:{f.get('line')} {f.get('code')} [{f.get('level')}] {f.get('message')}"
            if f.get("level") in levels[:cutoff + 1]:
                problems.append(line)
            else:
                print(f"  note: {line}")
        print(f"hadolint {rel(dockerfile)}: {len(findings)} finding(s)")
    return problems


def run_checkov(checkov: str, dockerfiles: list[Path], manifests: list[Path],
                skips: list[Skip]) -> list[str]:
    """Run checkov once over every file; return the findings that fail the scan."""
    files = [*dockerfiles, *manifests]
    cmd = [checkov, "--skip-download", "--quiet", "--compact", "-o", "json",
           "--framework", "dockerfile", "kubernetes"]
    for f in files:
        cmd += ["-f", str(f)]
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return [f"checkov: unreadable output (rc={proc.returncode}): "
                f"{(proc.stdout + proc.stderr)[-1500:]}"]
    reports = report if isinstance(report, list) else [report]

    problems: list[str] = []
    used: set[str] = set()
    for r in reports:
        summary = r.get("summary", r)
        print(f"checkov {r.get('check_type', '?')}: passed={summary.get('passed', 0)} "
              f"failed={summary.get('failed', 0)} skipped={summary.get('skipped', 0)} "
              f"parsing_errors={summary.get('parsing_errors', 0)}")
        if summary.get("parsing_errors"):
            problems.append(f"checkov {r.get('check_type')}: {summary['parsing_errors']} file(s) "
                            "could not be parsed")
        for c in (r.get("results") or {}).get("failed_checks", []):
            check_id, path = c.get("check_id", "?"), c.get("file_path", "?")
            severity = (c.get("severity") or "").upper() or None
            where = f"{path} {c.get('resource', '')}".strip()
            line = f"checkov {check_id} [{severity or 'no severity'}] {where}: {c.get('check_name')}"
            skip = next((s for s in skips if s.covers(check_id, path)), None)
            if severity in FAILING_SEVERITIES:
                problems.append(line)
            elif severity is None and skip is None:
                problems.append(line + "  (not in tests/k8s_scan/checkov-skips.yaml)")
            elif skip is not None:
                used.add(skip.check_id)
                print(f"  accepted: {line}\n      reason: {skip.reason}")
            else:
                print(f"  note ({severity}): {line}")
    for s in skips:
        if s.check_id not in used:
            print(f"  note: skip {s.check_id} matched nothing in this run")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("yaml", nargs="*", type=Path,
                        help="extra Kubernetes manifests to scan with checkov")
    args = parser.parse_args(argv)

    hadolint = find_tool("hadolint", "ARF_HADOLINT")
    checkov = find_tool("checkov", "ARF_CHECKOV")
    missing = [n for n, t in (("hadolint", hadolint), ("checkov", checkov)) if not t]
    if missing:
        print(f"not installed: {', '.join(missing)}; run `make tools` (creates .tools-venv)",
              file=sys.stderr)
        return 2

    for p in args.yaml:
        if not p.is_file():
            print(f"no such file: {p}", file=sys.stderr)
            return 2
    manifests = [*DEFAULT_MANIFESTS, *(p.resolve() for p in args.yaml)]
    skips = load_skips()

    problems = run_hadolint(hadolint, DEFAULT_DOCKERFILES)
    problems += run_checkov(checkov, DEFAULT_DOCKERFILES, manifests, skips)
    if problems:
        print(f"\nFAILED: {len(problems)} finding(s)")
        for p in problems:
            print(f"  {p}")
        return 1
    print("\nOK: no failing findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
