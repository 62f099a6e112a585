"""Rules files for configuration tests: GOOD, a file the agent accepts, and
ways to read what ``load_config`` or the real command makes of a variant.
Shared by the modules that test refusals of settings."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from watcher.config import ConfigError, load_config

GOOD = """\
database: catalog.db
instance_id: test-instance
archives:
  arch:
    remote_basedir: far
    delete_local_after: 7d
rules:
  - watch: inbox
    archive: arch
    remote_path: "{timecode}/{relpath}"
"""
# GOOD's lines: 3 archives, 4 arch, 5 remote_basedir, 6 delete_local_after,
# 7 rules, 8 watch, 9 archive, 10 remote_path; a key appended to the rule is line 11.


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    """``text`` (dedented) as tmp_path/name, beside the ``inbox`` its rules watch."""
    (tmp_path / "inbox").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def with_archive_key(key_and_value: str) -> str:
    """GOOD with a line in place of the archive's delete_local_after (line 6)."""
    return GOOD.replace("    delete_local_after: 7d\n", f"    {key_and_value}\n")


def parse(problem: str, path: Path) -> tuple[int, str, str]:
    """(line, key path, message) of one problem, which must name ``path``."""
    m = re.fullmatch(rf"{re.escape(str(path))}:(\d+): ([^:]+): (.+)", problem, re.S)
    assert m, f"not FILE:LINE: key.path: problem: {problem!r}"
    return int(m.group(1)), m.group(2), m.group(3)


def problems_of(path: Path) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [parse(p, path) for p in caught.value.problems]


def only_problem(path: Path) -> tuple[int, str, str]:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


def run_cli(command: str, path: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SUPRSYNC_DB", "WATCHER_STATE_DIR")}
    return subprocess.run(watcher_command(command, "--config", str(path)), cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def refused_by_cli(command: str, path: Path, timeout: float = 30) -> list[tuple[int, str, str]]:
    """Run the command and check it refused the file properly; its problems."""
    result = run_cli(command, path, timeout)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("watcher: ") for line in lines), lines
    return [parse(line.removeprefix("watcher: "), path) for line in lines]


def accepted(path: Path):
    return load_config(path)
