"""`arf datahub ingest | tables | describe | compact | vacuum | restore`: users' data in the
embedded data hub.

    arf datahub ingest TABLE FILE_OR_FOLDER... [--mode append|overwrite] [--partition-by COL]
                       [--type COL=TYPE]
    arf datahub tables
    arf datahub describe TABLE [--version N]
    arf datahub compact TABLE [--target-size-mb N]
    arf datahub vacuum TABLE --retain-days N [--dry-run]
    arf datahub restore TABLE --version N

Like `arf datahub seed`, each runs `arf-trainer datahub ...` from this installation as a
subprocess against the hub of ARF_DATAHUB_URI (default `$ARF_HOME/datahub`): the Airflow side
imports nothing heavy (pyarrow, deltalake) and the container side does the reading, so ingest
behaves the same here and in a pod. Exit codes are the container's: 0 done, 2 bad input (the
table is then unchanged); `tables` exits 1 after listing them all when some table is damaged.
A table name starting with '-' (given after `--`) is refused here: the container's parser
would read it as an option.
"""

from __future__ import annotations

import argparse
from pathlib import Path

COMMANDS = ("ingest", "tables", "describe", "compact", "vacuum", "restore")


def add_parsers(hsub: argparse._SubParsersAction) -> None:
    """Add the subcommands to `arf datahub`."""
    ingest = hsub.add_parser(
        "ingest", help="add Parquet, CSV, Arrow IPC or JSON Lines files or folders (or a "
        "Delta table, or a LeRobot dataset with its videos) to a table as one new version, "
        "streamed (any size)")
    ingest.add_argument("table", help="table name, a lower-case identifier (e.g. robot_episodes)")
    ingest.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    ingest.add_argument("--mode", choices=["append", "overwrite"], default="append",
                        help="append (default; the columns must match the table's) or "
                        "overwrite (replace rows and schema; older versions stay readable)")
    ingest.add_argument("--partition-by", action="append", default=[], metavar="COL",
                        help="partition a new table by this column (repeatable)")
    ingest.add_argument("--type", action="append", default=[], metavar="COL=TYPE",
                        dest="types", help="read this column as TYPE (int64, float64, string, "
                        "bool, date, timestamp, ...) instead of inferring it (repeatable)")
    ingest.add_argument("--frames", choices=["png", "video"], default="png",
                        help="a LeRobot dataset's cameras as PNG frames, one per row (png, "
                        "the default), or as its video files, stored once, with a frame "
                        "reference per row (video: the table stays the size of the videos; "
                        "prepare decodes with dataset.decode format video)")
    ingest.add_argument("--json", action="store_true", help="print the result as JSON")
    tables = hsub.add_parser("tables", help="the tables: latest version, rows, columns")
    tables.add_argument("--json", action="store_true", help="print JSON")
    describe = hsub.add_parser("describe", help="a table's columns and types, rows, versions "
                                                "and history")
    describe.add_argument("table", help="table name")
    describe.add_argument("--version", type=int, help="this version (default: the latest)")
    describe.add_argument("--json", action="store_true", help="print JSON")
    compact = hsub.add_parser("compact", help="rewrite the latest version's small files into "
                              "large ones as a new version (every version stays readable)")
    compact.add_argument("table", help="table name")
    compact.add_argument("--target-size-mb", type=int, help="file size to aim for (default 100)")
    compact.add_argument("--json", action="store_true", help="print JSON")
    vacuum = hsub.add_parser("vacuum", help="delete the files no version of the last N days "
                             "reads: older versions (and reproducing runs that read them) break")
    vacuum.add_argument("table", help="table name")
    vacuum.add_argument("--retain-days", type=int, required=True,
                        help="keep every version that was the latest in the last N days")
    vacuum.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    vacuum.add_argument("--json", action="store_true", help="print JSON")
    restore = hsub.add_parser("restore", help="make an older version's rows the latest again, "
                              "as a new version (undo a bad ingest; every version stays readable)")
    restore.add_argument("table", help="table name")
    restore.add_argument("--version", type=int, required=True, help="the version to restore")
    restore.add_argument("--json", action="store_true", help="print JSON")


def _check_table(args: argparse.Namespace) -> None:
    """A table name `arf-trainer`'s parser would take for an option is refused, named."""
    from arf_training.errors import ConfError

    table = getattr(args, "table", None)
    if table is not None and table.startswith("-"):
        raise ConfError(
            f"table name {table!r} starts with '-': data hub table names are lower-case "
            "identifiers (e.g. robot_episodes), and options go before `--`, not after it")


def trainer_command(args: argparse.Namespace, hub: str) -> list[str]:
    """The `arf-trainer datahub ...` command line for `args` (paths made absolute)."""
    from arf_training.settings import venv_bin

    _check_table(args)
    cmd = [venv_bin("arf-trainer"), "datahub", args.sub, "--hub", hub]
    if args.sub == "ingest":
        cmd += ["--mode", args.mode, "--frames", args.frames, args.table]
        cmd += [str(Path(p).expanduser().absolute()) for p in args.paths]
        for column in args.partition_by:
            cmd += ["--partition-by", column]
        for spec in args.types:
            cmd += ["--type", spec]
    elif args.sub == "describe":
        cmd.append(args.table)
        if args.version is not None:
            cmd += ["--version", str(args.version)]
    elif args.sub == "compact":
        cmd.append(args.table)
        if args.target_size_mb is not None:
            cmd += ["--target-size-mb", str(args.target_size_mb)]
    elif args.sub == "vacuum":
        cmd += [args.table, "--retain-days", str(args.retain_days)]
        cmd += ["--dry-run"] if args.dry_run else []
    elif args.sub == "restore":
        cmd += [args.table, "--version", str(args.version)]
    return cmd + (["--json"] if args.json else [])


def run(args: argparse.Namespace) -> int:
    import subprocess

    from arf_training.embedded import environment
    from arf_training.settings import ArfSettings

    settings = ArfSettings.from_env()
    env = environment(settings, start_database=False)  # the hub is files: no database needed
    return subprocess.run(trainer_command(args, settings.datahub_uri), env=env).returncode
