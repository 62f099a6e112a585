"""`watcher status` as an operator runs it: the public face of problems the
agent reports. Tests check degradation through it rather than log wording."""

from __future__ import annotations

import json
import subprocess

from tests.agent_process import watcher_command
from tests.waiting import wait_until

# `watcher status` showed the catalog: all well (0), an archive needing
# attention (3), an agent not running (4); watcher.commands.exits.
SHOWN = (0, 3, 4)


def status(setup, *args: str, by_db: bool = False) -> subprocess.CompletedProcess:
    """`watcher status` on the setup's rules file (``by_db``: on its catalog,
    which needs no watched directory to exist)."""
    where = ["--db", str(setup.database)] if by_db else ["--config", str(setup.root / "rules.yaml")]
    shown = subprocess.run(watcher_command("status", *where, *args), capture_output=True, text=True, timeout=60)
    assert shown.returncode in SHOWN, shown.stderr
    return shown


def problems(setup, archive: str = "arch", by_db: bool = False) -> dict[str, int]:
    """The problem counts `watcher status --json` shows for an archive."""
    return json.loads(status(setup, "--json", by_db=by_db).stdout)[archive]["problems"]


def wait_for_problems(setup, expected: dict[str, int], agent=None, timeout: float = 10,
                      by_db: bool = False) -> None:
    wait = agent.wait_for if agent is not None else wait_until
    wait(lambda: problems(setup, by_db=by_db) == expected, timeout=timeout,
         message=f"status to show problems {expected} (it shows {problems(setup, by_db=by_db)})")
