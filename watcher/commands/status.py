"""`watcher status`: per archive, counts that add up, health, and an exit
status a monitor can use (watcher.commands.exits: 0, 3 or 4; 1 when the
catalog cannot be read)."""

from __future__ import annotations

import json
import shlex
import time

from watcher.commands.exits import Exit
from watcher.commands.opening import max_attempts, open_catalog
from watcher.archive_report import archive_report
from watcher.health import read_health


def report(args) -> dict:
    """What `status` shows: each archive's counts and health, the catalog's state."""
    catalog, config = open_catalog(args)
    try:
        now = time.time()
        names = list(config.archives) if config else []
        names += [n for n in catalog.reports.archive_names() if n not in names]
        health = read_health(catalog.path) or {}
        out = archive_report(catalog, names, lambda name: max_attempts(config, name), now, health)
    finally:
        catalog.close()
    db_state = health.get("database", {})
    return {"archives": out, "agent_running": bool(health), "database_locked": bool(db_state.get("locked")),
            "database_error": db_state.get("last_error")}


def exit_status(shown: dict) -> Exit:
    """4 if an archive shown has no running agent, else 3 if one needs
    attention (or the agents cannot use the catalog), else 0."""
    archives = shown["archives"].values()
    if not shown["agent_running"] or any(not s["agent"]["running"] for s in archives):
        return Exit.NOT_RUNNING
    if shown["database_error"] or any(needs_attention(s) for s in archives):
        return Exit.ATTENTION
    return Exit.OK


def needs_attention(s: dict) -> bool:
    return bool(s["degraded"] or s["failed"] or s.get("refused") or s["problems"])


def run(args) -> int:
    shown = report(args)
    if args.json:
        for stats in shown["archives"].values():
            del stats["problem_messages"]
        print(json.dumps(shown["archives"], indent=2, default=str))
        return exit_status(shown)
    problem = ("LOCKED" if shown["database_locked"] else "ERROR") if shown["database_error"] else None
    print(f"agent: {_agents(shown)}" + (f"; catalog {problem} ({shown['database_error']})" if problem else ""))
    for name, s in shown["archives"].items():
        for line in describe(name, s):
            print(line)
    if not shown["archives"]:
        print("no archives")
    return exit_status(shown)


def _agents(shown: dict) -> str:
    running = {s["agent"]["pid"] for s in shown["archives"].values() if s["agent"]["running"]}
    if not shown["agent_running"]:
        return "not running"
    if not shown["archives"] or all(s["agent"]["running"] for s in shown["archives"].values()):
        return f"running (pid {', '.join(str(p) for p in sorted(running))})"
    idle = [n for n, s in shown["archives"].items() if not s["agent"]["running"]]
    return (f"running (pid {', '.join(str(p) for p in sorted(running))}); "
            f"no agent serves {', '.join(idle)}")


def describe(name: str, s: dict) -> list[str]:
    """An archive's lines: the files by their one state (they add up), then health."""
    b = s["by_state"]
    parts = [f"{b['pending']} pending ({_size(s['bytes_pending'])})", f"{b['failed']} failed",
             f"{b['verified']} verified"]
    if b["removed"]:
        gone = b["removed"] - b["removed_verified"]
        parts.append(f"{b['removed']} removed ({b['removed_verified']} after verification"
                     + (f", {gone} found gone first" if gone else "") + ")")
    else:
        parts.append("0 removed")
    parts.append(f"{b['ignored']} ignored")
    if b["refused"]:
        parts.append(f"{b['refused']} refused")
    age = s["oldest_pending_age"]
    lines = [f"{name}: {s['files']} files: {', '.join(parts)}"
             + (f"; oldest pending {age:.0f}s old" if age is not None else "")
             + (f"; DEGRADED: {s['last_error']}" if s["degraded"] else "")
             + ("" if s["agent"]["running"] else "; no agent serves it")]
    held = s.get("finalized_until_held_by")  # a failed file: named, with what to do
    lines.append(f"  finalized until {_when(s['finalized_until'])}"
                 + (f" (held back by the failed {held}: {shlex.join(['watcher', 'retry', name, held])})"
                    if held else "")
                 + "; "
                 f"last added {_file(s['last_file_added'], s.get('last_file_added_time'))}; "
                 f"last verified {_file(s['last_file_verified'], s.get('last_file_verified_time'))}")
    if s.get("refused"):
        lines.append(f"  REFUSED: {s['refused']} catalog rows name files outside this archive's roots "
                     "(its rules' watch directories, api_roots, file_root); they are never read, "
                     "shipped or deleted (the log names each)")
    for kind, n in sorted(s["problems"].items()):
        lines.append(f"  PROBLEM: {n} {kind}; latest: {s['problem_messages'][kind]}")
    return lines


def _file(path: str | None, when: float | None) -> str:
    if path is None:
        return "none yet"
    return f"{path} ({_when(when)})" if when else str(path)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
