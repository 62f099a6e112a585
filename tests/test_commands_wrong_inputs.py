"""Every command fed its wrong inputs, as a user would: one line saying what
is wrong, the documented exit status (watcher.commands.exits), and no
Python in sight (no traceback, no exception class name, no ``None``)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from watcher.catalog import Catalog, NewFile

PYTHON_TEXT = re.compile(r"Traceback|\b[A-Z]\w*(Error|Exception)\b|\bNone\b")


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SUPRSYNC_DB", "WATCHER_STATE_DIR")}
    return subprocess.run(watcher_command(*args), capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})}, cwd=cwd)


@pytest.fixture
def world(setup, tmp_path):
    """A rules file (archive smurf), its catalog with one file, and things that are not catalogs."""
    setup.archive("smurf")
    inbox = setup.rule(archive="smurf")
    (inbox / "a.dat").write_bytes(b"a")
    catalog = setup.catalog()
    catalog.add_file(str(inbox / "a.dat"), "a.dat", "smurf")
    catalog.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a catalog at all\n" * 50)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    return {"config": str(setup.write()), "db": str(setup.database), "inbox": inbox,
            "text": str(text), "other": str(other), "missing": str(tmp_path / "nowhere" / "c.db"),
            "tmp": tmp_path}


def cases(w) -> list[tuple[list[str], int, str]]:
    """(arguments, exit status, a phrase the one line must say)."""
    inbox, cfg = w["inbox"], w["config"]
    a = str(inbox / "a.dat")
    bad_db = [("text", "not a catalog (not a SQLite database)"),
              ("other", "not a catalog"), ("missing", "no catalog at")]
    out = []
    for key, phrase in bad_db:
        db = w[key]
        out += [
            (["status", "--db", db], 1, phrase),
            (["status", "--json", "--db", db], 1, phrase),
            (["check", a, "--db", db], 1, phrase),
            (["list", "smurf", "--db", db], 1, phrase),
            (["retry", "smurf", "--db", db], 1, phrase),
            (["ignore", a, "--db", db], 1, phrase),
        ]
    for key, phrase in bad_db[:2]:  # a missing catalog is created by the commands that register
        out += [(["add", a, "a2.dat", "smurf", "--db", w[key]], 1, phrase),
                (["add-local-files", str(inbox), "smurf", "--db", w[key]], 1, phrase),
                (["add-local-files", str(inbox), "smurf", "--dry-run", "--db", w[key]], 1, phrase)]
    out += [
        (["add", str(inbox / "gone.dat"), "g", "smurf", "--config", cfg], 1, "no such file"),
        (["add", str(inbox), "d", "smurf", "--config", cfg], 1, "a directory"),
        (["add", a, "a.dat", "smurff", "--config", cfg], 2, "unknown archive 'smurff' (known: smurf)"),
        (["add", a, "a.dat", "smurf", "--md5", "abc", "--config", cfg], 2, "32 hexadecimal digits"),
        (["add", a, "../up", "smurf", "--db", str(w["tmp"] / "new.db")], 2, "contains '..'"),
        (["add", a, "a.dat", "smurf", "--config", str(w["tmp"] / "no.yaml")], 2, "cannot read configuration"),
        (["add-local-files", str(inbox / "nope"), "smurf", "--config", cfg], 1, "no such directory"),
        (["add-local-files", a, "smurf", "--config", cfg], 1, "no such directory"),
        (["add-local-files", str(inbox), "smurff", "--config", cfg], 2, "unknown archive"),
        (["add-local-files", str(inbox), "smurf", "--last-edit=-1h", "--config", cfg], 2, "duration"),
        (["add-local-files", str(inbox), "smurf", "--last-edit", "nan", "--config", cfg], 2, "duration"),
        (["status", "--config", w["text"]], 2, "expected a mapping"),
        (["check", str(inbox / "b.dat"), "--config", cfg], 1, "not in the catalog"),
        (["list", "smurff", "--config", cfg], 2, "unknown archive 'smurff'"),
        (["list", "smurff", "--db", w["db"]], 2, "no archive 'smurff' in the catalog"),
        (["list", "smurf", "--failed", "--pending", "--db", w["db"]], 2, "not allowed with"),
        (["retry", "smurff", "--config", cfg], 2, "unknown archive"),
        (["retry", "smurf", "/nope", "--config", cfg], 1, "/nope: not in the catalog for archive smurf"),
        (["ignore", "/nope", "--config", cfg], 1, "/nope: not in the catalog"),
        (["rules", "test", "/nope", "--config", cfg], 1, "ships nowhere"),
        (["rules", "test", "/x", "--config", str(w["tmp"] / "no.yaml")], 2, "cannot read configuration"),
        (["rules", "test", "/x", "--state-dir", str(w["tmp"] / "none")], 1, "does not exist"),
        (["config", "systemd", str(w["tmp"] / "no.yaml")], 2, "cannot read configuration"),
        (["config", "systemd", str(inbox)], 2, "cannot read configuration"),
        (["config", "example", "extra"], 2, "unrecognized arguments"),
        (["status", "--bogus"], 2, "unrecognized arguments"),
        (["frobnicate"], 2, "invalid choice"),
    ]
    return out


def test_no_command_shows_python_for_a_wrong_input(world):
    failures = []
    for args, status, phrase in cases(world):
        done = run(*args, cwd=world["tmp"])
        said = done.stdout + done.stderr
        errors = done.stderr.splitlines()
        if (done.returncode != status or phrase not in said or PYTHON_TEXT.search(said)
                or len(errors) > 1 or not all(e.startswith("watcher") for e in errors)):
            failures.append(f"{args}: exit {done.returncode} (want {status}), said {said!r}")
    assert not failures, "\n".join(failures)
    assert sorted(p.name for p in Path(world["missing"]).parent.parent.iterdir()
                  if p.name.startswith("nowhere")) == []  # no catalog directory made by a failed command


def test_a_catalog_locked_by_another_process_is_one_line_and_exit_1(world):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA locking_mode=EXCLUSIVE'); db.execute('BEGIN EXCLUSIVE')\n"
        "db.execute('UPDATE supersync_v0 SET ignore = ignore')\n"
        "print('locked', flush=True); time.sleep(60)\n"), world["db"]],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        env = {"WATCHER_BUSY_TIMEOUT": "0.3"}
        for args in (["status"], ["status", "--json"], ["list", "smurf"], ["check", str(world["inbox"] / "a.dat")],
                     ["retry", "smurf"], ["ignore", str(world["inbox"] / "a.dat")],
                     ["add", str(world["inbox"] / "a.dat"), "b.dat", "smurf"]):
            done = run(*args, "--db", world["db"], env=env)
            said = done.stdout + done.stderr
            assert done.returncode == 1, (args, said)
            assert "locked" in done.stderr and not PYTHON_TEXT.search(said), (args, said)
            assert len(done.stderr.splitlines()) == 1, (args, said)
    finally:
        holder.kill()
        holder.wait()


def test_output_piped_into_head_stops_quietly(world):
    catalog = Catalog(world["db"])
    now = time.time()
    catalog.add_files([NewFile(f"{world['inbox']}/f{i:05}.dat", f"f{i:05}.dat", "smurf", "1" * 32, now)
                       for i in range(5000)])
    catalog.close()
    tree = world["tmp"] / "tree"
    tree.mkdir()
    for i in range(3000):
        (tree / f"t{i:05}.dat").write_bytes(b"t")
    for args in (["list", "smurf"], ["add-local-files", str(tree), "smurf", "--dry-run"]):
        shell = subprocess.run(["bash", "-c", '"$@" | head -1; exit "${PIPESTATUS[0]}"', "bash",
                                *watcher_command(*args, "--db", world["db"])],
                               capture_output=True, text=True, timeout=60)
        assert shell.stderr == "", (args, shell.stderr)
        assert len(shell.stdout.splitlines()) == 1
        assert shell.returncode == 141, (args, shell.returncode)
