"""What `watcher status` says of each archive, built once for every face
that shows it (the `status` command, the OCS agent's `status` task).

Numbers come from the catalog (constant time: SQLite keeps the counts),
health from the running agents' files beside it.
"""

from __future__ import annotations

from typing import Callable

from watcher.catalog import Catalog
from watcher.health import read_health


def archive_report(catalog: Catalog, names: list[str], max_attempts: Callable[[str], int],
                   now: float, health: dict | None = None) -> dict[str, dict]:
    """``{archive: its numbers and health}`` for these archives; ``health``:
    read_health's merged answer, read here when not given."""
    if health is None:
        health = read_health(catalog.path) or {}
    out = {}
    for name in names:
        limit = max_attempts(name)
        stats = catalog.reports.stats(name, limit, now)
        stats["by_state"] = catalog.reports.by_state(name, limit)
        stats["last_file_added_time"], stats["last_file_verified_time"] = catalog.reports.last_times(name)
        served = read_health(catalog.path, [name])
        stats["agent"] = {"running": served is not None, "pid": served.get("pid") if served else None}
        state = health.get("archives", {}).get(name)
        stats["degraded"] = bool(state and state.get("degraded"))
        stats["last_error"] = state.get("last_error") if state else None
        problems = health.get("problems", {}).get(name, {})
        stats["problems"] = {kind: entry["count"] for kind, entry in problems.items()}
        stats["problem_messages"] = {kind: entry["message"] for kind, entry in problems.items()}
        out[name] = stats
    return out
