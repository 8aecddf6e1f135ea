"""`arf-trainer datahub ingest | tables | describe | compact | vacuum | restore | seed-sites`:
the container side of `arf datahub`, and the federated demo's site hubs.

    arf-trainer datahub ingest --hub PATH TABLE FILE_OR_FOLDER... [--mode append|overwrite]
                               [--frames png|video]
                               [--partition-by COL] [--type COL=TYPE] [--json]
    arf-trainer datahub tables --hub PATH [--json]
    arf-trainer datahub describe --hub PATH TABLE [--version N] [--json]
    arf-trainer datahub compact --hub PATH TABLE [--target-size-mb N] [--json]
    arf-trainer datahub vacuum --hub PATH TABLE --retain-days N [--dry-run] [--json]
    arf-trainer datahub restore --hub PATH TABLE --version N [--json]
    arf-trainer datahub seed-sites --site NAME=HUB --site NAME=HUB... [--episodes 300]
                                   [--seed 0] [--force]

Errors are `DataHubError`s: the CLI prints them and exits 2 (bad input; nothing was written).
`tables` lists every table it can read even when some are damaged (a commit or data file
missing): those show as DAMAGED with the reason, and it then exits 1.
"""

from __future__ import annotations

import argparse
import json

COMMANDS = ("ingest", "tables", "describe", "compact", "vacuum", "restore", "seed-sites")


def add_parsers(hub_sub: argparse._SubParsersAction) -> None:
    """Add the subcommands of COMMANDS to `arf-trainer datahub`."""
    ingest = hub_sub.add_parser(
        "ingest", help="write Parquet, CSV, Arrow IPC or JSON Lines files or folders (or a "
        "Delta table, or a LeRobot dataset with its videos) into a data hub table as one new "
        "version")
    ingest.add_argument("--hub", required=True, help="data hub root directory")
    ingest.add_argument("table", help="table name, a lower-case identifier (e.g. robot_episodes)")
    ingest.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    ingest.add_argument("--mode", choices=["append", "overwrite"], default="append",
                        help="append (default; same columns required) or overwrite (replace "
                        "rows and schema; older versions stay readable)")
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
    tables = hub_sub.add_parser("tables", help="list the tables: version, rows, columns")
    tables.add_argument("--hub", required=True, help="data hub root directory")
    tables.add_argument("--json", action="store_true", help="print JSON")
    describe = _table_command(hub_sub, "describe", "a table's columns, rows, versions, history")
    describe.add_argument("--version", type=int, help="describe this version (default: latest)")
    _add_maintenance(hub_sub)
    sites = hub_sub.add_parser(
        "seed-sites", help="the federated demo's data: the reach demonstrations split non-IID "
        "(by target sector) over one data hub per site (arf_trainer.datahub.seed_sites)")
    sites.add_argument("--site", action="append", required=True, type=_site, metavar="NAME=HUB",
                       help="a site and its hub directory (repeat, at least twice)")
    sites.add_argument("--episodes", type=int, default=300,
                       help="expert episodes recorded, then split over the sites")
    sites.add_argument("--seed", type=int, default=0, help="RNG seed of the demonstrations")
    sites.add_argument("--force", action="store_true", help="rewrite hubs already seeded")


def _table_command(hub_sub: argparse._SubParsersAction, name: str,
                   help: str) -> argparse.ArgumentParser:
    """A subcommand on one table: --hub, the table and --json; the caller adds the rest."""
    parser = hub_sub.add_parser(name, help=help)
    parser.add_argument("--hub", required=True, help="data hub root directory")
    parser.add_argument("table", help="table name")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _add_maintenance(hub_sub: argparse._SubParsersAction) -> None:
    compact = _table_command(hub_sub, "compact", "rewrite the latest version's small files into "
                             "large ones, as a new version with the same rows (older versions "
                             "stay readable)")
    compact.add_argument("--target-size-mb", type=int, help="file size to aim for (default 100)")
    vacuum = _table_command(hub_sub, "vacuum", "delete the files no version of the last N days "
                            "reads; older versions become unreadable")
    vacuum.add_argument("--retain-days", type=int, required=True,
                        help="keep every version that was the latest in the last N days")
    vacuum.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    restore = _table_command(hub_sub, "restore", "make an older version's rows the latest "
                             "again, as a new version")
    restore.add_argument("--version", type=int, required=True, help="the version to restore")


def _site(text: str) -> tuple[str, str]:
    name, sep, hub = text.partition("=")
    if not sep or not name or not hub:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=HUB, e.g. north=/data/north/hub")
    return name, hub


def run(args: argparse.Namespace) -> int:
    """Run `args.hub_command` (one of COMMANDS); DataHubError propagates to the CLI."""
    from arf_trainer.spec import uri_to_path

    if args.hub_command == "seed-sites":
        from arf_trainer.datahub.seed_sites import seed_sites
        from arf_trainer.errors import DataHubError

        hubs = dict(args.site)
        if len(hubs) != len(args.site):
            raise DataHubError(f"--site names must be unique, got {[n for n, _ in args.site]}")
        summary = seed_sites({n: uri_to_path(h) for n, h in hubs.items()},
                             episodes=args.episodes, seed=args.seed, force=args.force)
        print(json.dumps(summary, indent=2, sort_keys=True), flush=True)
        return 0
    hub = uri_to_path(args.hub)
    if args.hub_command == "ingest":
        from arf_trainer.datahub.column_types import parse_types
        from arf_trainer.datahub.ingest import ingest
        from arf_trainer.datahub.tables import check_new_table_name

        check_new_table_name(hub, args.table)
        result = ingest(hub, args.table, args.paths, mode=args.mode,
                        partition_by=args.partition_by, types=parse_types(args.types),
                        frames=args.frames)
        print(json.dumps(result.as_dict(), sort_keys=True) if args.json else
              f"{args.table}: version {result.version} ({result.mode}, {result.rows:,} rows "
              f"from {result.files} file{'s' if result.files != 1 else ''})", flush=True)
        return 0
    if args.hub_command in ("compact", "vacuum", "restore"):
        from arf_trainer.datahub import maintenance as m

        if args.hub_command == "compact":
            summary = m.compact(hub, args.table, args.target_size_mb)
            text = m.describe_compact(summary)
        elif args.hub_command == "vacuum":
            summary = m.vacuum(hub, args.table, args.retain_days, dry_run=args.dry_run)
            text = m.describe_vacuum(summary)
        else:
            summary = m.restore(hub, args.table, args.version)
            text = m.describe_restore(summary)
        print(json.dumps(summary, sort_keys=True) if args.json else text, flush=True)
        return 0
    from arf_trainer.datahub import describe

    if args.hub_command == "tables":
        summaries = describe.list_summaries(hub)
        print(json.dumps(summaries, indent=2) if args.json
              else describe.format_tables(hub, summaries), flush=True)
        return 1 if any(s.get("damaged") for s in summaries) else 0
    info = describe.describe_table(hub, args.table, args.version)
    print(json.dumps(info, indent=2) if args.json else describe.format_description(info))
    return 0
