"""`arf-trainer datahub ingest | tables | describe`: the container side of `arf datahub`.

    arf-trainer datahub ingest --hub PATH TABLE FILE_OR_FOLDER... [--mode append|overwrite]
                               [--partition-by COL] [--json]
    arf-trainer datahub tables --hub PATH [--json]
    arf-trainer datahub describe --hub PATH TABLE [--version N] [--json]

Errors are `DataHubError`s: the CLI prints them and exits 2 (bad input; nothing was written).
"""

from __future__ import annotations

import argparse
import json

COMMANDS = ("ingest", "tables", "describe")


def add_parsers(hub_sub: argparse._SubParsersAction) -> None:
    """Add the three subcommands to `arf-trainer datahub`."""
    ingest = hub_sub.add_parser(
        "ingest", help="write Parquet, CSV or Arrow IPC files or folders (or a Delta table) "
        "into a data hub table as one new version")
    ingest.add_argument("--hub", required=True, help="data hub root directory")
    ingest.add_argument("table", help="table name, a lower-case identifier (e.g. robot_episodes)")
    ingest.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    ingest.add_argument("--mode", choices=["append", "overwrite"], default="append",
                        help="append (default; same columns required) or overwrite (replace "
                        "rows and schema; older versions stay readable)")
    ingest.add_argument("--partition-by", action="append", default=[], metavar="COL",
                        help="partition a new table by this column (repeatable)")
    ingest.add_argument("--json", action="store_true", help="print the result as JSON")
    tables = hub_sub.add_parser("tables", help="list the tables: version, rows, columns")
    tables.add_argument("--hub", required=True, help="data hub root directory")
    tables.add_argument("--json", action="store_true", help="print JSON")
    describe = hub_sub.add_parser("describe", help="a table's columns, rows, versions, history")
    describe.add_argument("--hub", required=True, help="data hub root directory")
    describe.add_argument("table", help="table name")
    describe.add_argument("--version", type=int, help="describe this version (default: latest)")
    describe.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    """Run `args.hub_command` (one of COMMANDS); DataHubError propagates to the CLI."""
    from arf_trainer.spec import uri_to_path

    hub = uri_to_path(args.hub)
    if args.hub_command == "ingest":
        from arf_trainer.datahub.ingest import ingest

        result = ingest(hub, args.table, args.paths, mode=args.mode,
                        partition_by=args.partition_by)
        print(json.dumps(result.as_dict(), sort_keys=True) if args.json else
              f"{args.table}: version {result.version} ({result.mode}, {result.rows:,} rows "
              f"from {result.files} file{'s' if result.files != 1 else ''})", flush=True)
        return 0
    from arf_trainer.datahub import describe

    if args.hub_command == "tables":
        summaries = describe.list_summaries(hub)
        print(json.dumps(summaries, indent=2) if args.json
              else describe.format_tables(hub, summaries))
        return 0
    info = describe.describe_table(hub, args.table, args.version)
    print(json.dumps(info, indent=2) if args.json else describe.format_description(info))
    return 0
