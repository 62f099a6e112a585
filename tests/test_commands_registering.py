"""`watcher add` and `add-local-files` as an operator runs them: arguments
checked against the rules file, the rules' excludes applied, `--keep`, and
when the local copies will be deleted said at the end."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from watcher.catalog import Catalog


def watcher(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SUPRSYNC_DB", "WATCHER_STATE_DIR")}
    done = subprocess.run(watcher_command(*args), capture_output=True, text=True, timeout=60, cwd=cwd, env=env)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def rows(db: Path) -> list:
    if not db.exists():
        return []
    catalog = Catalog(db)
    try:
        return list(catalog.File.select().order_by(catalog.File.id))
    finally:
        catalog.close()


@pytest.fixture
def site(setup):
    """Archive smurf (retention 7d) watching inbox/; rules file written."""
    setup.archive("smurf", delete_local_after="7d")
    inbox = setup.rule(archive="smurf")
    setup.write()
    return setup, inbox


def test_add_of_an_unknown_archive_names_the_known_ones_and_writes_nothing(site):
    setup, inbox = site
    (inbox / "a.dat").write_bytes(b"a")
    done = watcher("add", str(inbox / "a.dat"), "a.dat", "smurff", "--config", str(setup.root / "rules.yaml"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["watcher: unknown archive 'smurff' (known: smurf)"]
    assert not setup.database.exists()


def test_the_socs_api_keeps_accepting_any_archive_name(tmp_path):
    from watcher.db import add_file

    local = tmp_path / "a.dat"
    local.write_bytes(b"a")
    add_file(str(local), "a.dat", "smurff", db_path=str(tmp_path / "c.db"))
    assert [r.archive_name for r in rows(tmp_path / "c.db")] == ["smurff"]


def test_add_says_when_the_local_copy_is_deleted_and_keep_keeps_it(site):
    setup, inbox = site
    rules = str(setup.root / "rules.yaml")
    (inbox / "a.dat").write_bytes(b"a")
    (inbox / "b.dat").write_bytes(b"b")
    done = watcher("add", str(inbox / "a.dat"), "a.dat", "smurf", "--config", rules)
    assert done.returncode == 0, done.stderr
    [row] = rows(setup.database)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.timestamp + 7 * 86400))
    assert done.stdout.splitlines()[1] == (
        f"local copy: deleted 7d after registration ({when}), once verified on the archive "
        "(archive smurf's delete_local_after; --keep: never)")
    assert row.deletable
    done = watcher("add", str(inbox / "b.dat"), "b.dat", "smurf", "--keep", "--config", rules)
    assert done.returncode == 0
    assert done.stdout.splitlines()[1] == "local copy: kept (--keep): watcher never deletes the local copy"
    assert [r.deletable for r in rows(setup.database)] == [True, False]


def test_add_refuses_a_second_row_a_bad_md5_a_directory_and_an_excluded_file(site):
    setup, inbox = site
    rules = str(setup.root / "rules.yaml")
    (inbox / "a.dat").write_bytes(b"a")
    (inbox / "x.tmp").write_bytes(b"x")
    assert watcher("add", str(inbox / "a.dat"), "a.dat", "smurf", "--config", rules).returncode == 0
    done = watcher("add", str(inbox / "a.dat"), "a2.dat", "smurf", "--config", rules)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"watcher: {inbox / 'a.dat'}: already registered for smurf (catalog row 1, far name a.dat): "
        f"see watcher check {inbox / 'a.dat'}"]
    done = watcher("add", str(inbox / "a.dat"), "a3.dat", "smurf", "--md5", "abc", "--config", rules)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["watcher: --md5 'abc': expected 32 hexadecimal digits (md5sum's output)"]
    done = watcher("add", str(inbox), "d", "smurf", "--config", rules)
    assert done.returncode == 1 and f"{inbox}: a directory" in done.stderr
    done = watcher("add", str(inbox / "x.tmp"), "x.tmp", "smurf", "--config", rules)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"watcher: {inbox / 'x.tmp'}: not registered: rules[0] (watch {inbox}) excluded by its glob '*.tmp'"]
    assert len(rows(setup.database)) == 1


def test_add_takes_an_md5_in_capitals_as_md5sum_would_print_it(site):
    setup, inbox = site
    (inbox / "a.dat").write_bytes(b"a")
    md5 = "0CC175B9C0F1B6A831C399E269772661"  # md5 of "a"
    done = watcher("add", str(inbox / "a.dat"), "a.dat", "smurf", "--md5", md5,
                   "--config", str(setup.root / "rules.yaml"))
    assert done.returncode == 0
    assert [r.local_md5sum for r in rows(setup.database)] == [md5.lower()]


@pytest.fixture
def mixed(site):
    """The inbox with files the rules exclude beside files they take."""
    setup, inbox = site
    (inbox / "sub").mkdir()
    for rel in ("a.dat", "sub/b.dat", ".hidden", "x.tmp", "sub/.f.swp", ".git/config"):
        (inbox / rel).parent.mkdir(exist_ok=True)
        (inbox / rel).write_text(rel)
    return setup, inbox


def test_add_local_files_applies_the_rules_excludes_and_says_which_glob(mixed):
    setup, inbox = mixed
    rules = str(setup.root / "rules.yaml")
    done = watcher("add-local-files", str(inbox), "smurf", "--dry-run", "--config", rules)
    assert done.returncode == 0, done.stderr
    assert f"6 files under {inbox}: 0 already registered, 4 excluded by the rules, 2 to add" in done.stdout
    assert f"would skip {inbox / 'x.tmp'}: rules[0] (watch {inbox}) excluded by its glob '*.tmp'" in done.stdout
    assert f"would skip {inbox / 'sub/.f.swp'}: rules[0] (watch {inbox}) excluded by its glob '.*'" in done.stdout
    assert not setup.database.exists()
    done = watcher("add-local-files", str(inbox), "smurf", "--config", rules)
    assert done.returncode == 0, done.stderr
    assert sorted(r.remote_path for r in rows(setup.database)) == ["a.dat", "sub/b.dat"]
    assert done.stdout.splitlines()[-1] == (
        "local copies of 2 files: deleted 7d after registration, once verified on the archive "
        "(archive smurf's delete_local_after; --keep: never)")


def test_add_local_files_keep_and_a_rule_that_keeps_files_forever(setup):
    setup.archive("smurf", delete_local_after="1d")
    kept = setup.rule("kept", archive="smurf", delete_local_after=None)
    other = setup.rule("other", archive="smurf")
    for d in (kept, other):
        (d / f"{d.name}.dat").write_text(str(d))
    rules = str(setup.write())
    done = watcher("add-local-files", str(kept), "smurf", "--config", rules)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "local copies of 1 files: kept: rules[0]'s delete_local_after is not set (never delete)"
    done = watcher("add-local-files", str(other), "smurf", "--keep", "--config", rules)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == ("local copies of 1 files: kept (--keep): watcher never deletes "
                                            "the local copy")
    assert [r.deletable for r in rows(setup.database)] == [False, False]


def test_add_local_files_without_a_rules_file_applies_the_default_excludes(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("a.dat", ".hidden", "x.tmp", "y.part"):
        (tree / name).write_text(name)
    done = watcher("add-local-files", str(tree), "smurf", "--db", str(tmp_path / "c.db"))
    assert done.returncode == 0
    assert "3 excluded by the rules, 1 to add" in done.stdout
    assert [r.remote_path for r in rows(tmp_path / "c.db")] == ["a.dat"]


def test_durations_are_read_as_the_rules_file_reads_them_and_v_goes_before_or_after(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name, age in (("old.dat", 7200), ("new.dat", 0)):
        (tree / name).write_text(name)
        os.utime(tree / name, (time.time() - age, time.time() - age))
    db = str(tmp_path / "c.db")
    done = watcher("-v", "add-local-files", str(tree), "smurf", "--last-edit", "1h", "--dry-run", "--db", db)
    assert done.returncode == 0 and "1 to add" in done.stdout
    done = watcher("add-local-files", str(tree), "smurf", "--last-edit", "90", "--db", db, "-v")
    assert done.returncode == 0 and [r.remote_path for r in rows(Path(db))] == ["old.dat"]
    # -vv (its SQL among the debug lines) counted across both places
    for args in (["-vv", "list", "smurf"], ["list", "smurf", "-vv"], ["-v", "list", "smurf", "-v"]):
        done = watcher(*args, "--db", db)
        assert done.returncode == 0 and " DEBUG peewee: " in done.stderr, args
    assert " DEBUG " not in watcher("list", "smurf", "--db", db).stderr
    done = watcher("add-local-files", str(tree), "smurf", "--last-edit", "1 fortnight", "--db", db)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "watcher add-local-files: argument --last-edit: expected a duration such as 90, 30m, 12h or 7d, "
        "got '1 fortnight' (see watcher add-local-files --help)"]
