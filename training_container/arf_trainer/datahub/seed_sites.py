"""Demo data for a federation: the reach demonstrations split non-IID over site hubs.

Each site gets its own data hub with a `reach_demos` table holding only the episodes whose
target lies in that site's sector of the plane (target angle atan2(obs_5, obs_4), split into
as many equal sectors as there are sites). So every site sees a different region of targets,
as fleets at different customer sites would: a model trained on one site alone has never seen
the other regions, which is what federated training has to make up for.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from arf_trainer.datahub.seed import REACH_TABLE, _reach_rows, check_collected_at
from arf_trainer.datahub.tables import list_tables, make_hub, write_table
from arf_trainer.errors import DataHubError

log = logging.getLogger(__name__)


def sector_of(table: pa.Table, sites: int) -> np.ndarray:
    """Per row, the site index of its episode: the sector of the episode's target angle."""
    angle = np.arctan2(table["obs_5"].to_numpy(), table["obs_4"].to_numpy())
    return np.minimum(((angle + math.pi) / (2 * math.pi) * sites).astype(np.int64), sites - 1)


def seed_sites(hubs: dict[str, Path], episodes: int = 300, seed: int = 0,
               force: bool = False, collected_at: dt.datetime | None = None) -> dict[str, Any]:
    """Write `reach_demos` into each hub of `hubs` (site name -> hub path), by target sector.

    Idempotent: hubs that already hold the table are left alone unless `force`. `collected_at`
    as in `seed_demo` (default: the fixed `SEEDED_AT`). Returns
    {site: {"rows", "episodes", "action"}}.
    """
    if len(hubs) < 2:
        raise DataHubError(f"a federation needs at least 2 site hubs, got {list(hubs)}")
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < len(hubs):
        raise DataHubError(f"episodes={episodes!r} must be an integer >= the number of sites "
                           f"({len(hubs)}), e.g. --episodes 300")
    todo = {name: Path(hub) for name, hub in hubs.items()
            if force or REACH_TABLE not in list_tables(Path(hub))}
    summary: dict[str, Any] = {name: {"action": "unchanged"} for name in hubs}
    if not todo:
        return summary
    for hub in todo.values():  # every site's folder before any site is written
        make_hub(hub)
    rows = _reach_rows(episodes, seed, 0, check_collected_at(collected_at))
    site_of_row = sector_of(rows, len(hubs))
    for index, name in enumerate(hubs):
        if name not in todo:
            continue
        part = rows.filter(pa.array(site_of_row == index))
        write_table(todo[name], REACH_TABLE, part, mode="overwrite")
        n_episodes = len(set(part["episode"].to_pylist()))
        summary[name] = {"rows": part.num_rows, "episodes": n_episodes, "action": "written"}
        log.info("site %s: %d episodes (%d rows) in %s", name, n_episodes, part.num_rows,
                 todo[name])
    return summary
