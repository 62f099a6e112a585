"""The operator commands, run as the real `watcher` command on real catalogs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from watcher.catalog import Catalog
from watcher.hashing import md5_of


def watcher(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SUPRSYNC_DB", "WATCHER_STATE_DIR")}
    return subprocess.run([sys.executable, "-m", "watcher.cli", *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)


def ok(result: subprocess.CompletedProcess, status: int = 0) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


NOT_RUNNING = 4  # `watcher status` with no agent serving an archive (watcher.commands.exits)


def rows(db: Path) -> list:
    catalog = Catalog(db)
    try:
        return list(catalog.File.select().order_by(catalog.File.id))
    finally:
        catalog.close()


@dataclass
class Known:
    """A catalog whose files are in states chosen by the test."""

    db: Path
    base: float
    paths: dict[str, str]


@pytest.fixture
def known(tmp_path) -> Known:
    """smurf: 3 pending (10+20+30 bytes), 2 verified, 1 failed, 1 removed, 1 ignored; tuning: 1 verified."""
    db = tmp_path / "catalog.db"
    data = tmp_path / "data"
    data.mkdir()
    now = time.time()
    base = now - 1000
    spec = [  # name, archive, timestamp offset, size, state
        ("removed.dat", "smurf", 0, 1, "removed"),
        ("ignored.dat", "smurf", 5, 2, "ignored"),
        ("verified1.dat", "smurf", 10, 3, "verified"),
        ("verified2.dat", "smurf", 20, 4, "verified"),
        ("failed.dat", "smurf", 30, 5, "failed"),
        ("pending1.dat", "smurf", 40, 10, "pending"),
        ("pending2.dat", "smurf", 50, 20, "pending"),
        ("pending3.dat", "smurf", 60, 30, "pending"),
        ("tune.npy", "tuning", 70, 7, "verified"),
    ]
    catalog = Catalog(db)
    paths = {}
    for name, archive, offset, size, state in spec:
        path = data / name
        path.write_bytes(name.encode()[:1] * size)
        row = catalog.add_file(str(path), f"16750/{name}", archive, timestamp=base + offset)
        paths[name] = str(path)
        F = catalog.File
        changes = {}
        if state in ("verified", "removed"):
            changes = {"remote_md5sum": row.local_md5sum,
                       "copied": now - (500 if state == "removed" else 100 - offset)}
        if state == "removed":
            changes["removed"] = now - 10
        if state == "failed":
            changes = {"failed_copy_attempts": 10, "remote_md5sum": "0" * 32}
        if state == "ignored":
            changes = {"ignore": True}
        if changes:
            F.update(changes).where(F.id == row.id).execute()
    catalog.close()
    return Known(db, base, paths)


# -- status ---------------------------------------------------------------------------


def test_status_json_counts_every_state_of_every_archive(known, tmp_path):
    report = json.loads(ok(watcher("status", "--db", str(known.db), "--json", cwd=tmp_path), NOT_RUNNING))
    assert set(report) == {"smurf", "tuning"}
    smurf = report["smurf"]
    keys = {"files", "pending", "verified", "failed", "removed", "ignored", "bytes_pending",
            "oldest_pending_age", "finalized_until", "last_file_added", "last_file_verified"}
    assert keys <= set(smurf)
    assert {k: smurf[k] for k in ("files", "pending", "verified", "failed", "removed", "ignored",
                                   "bytes_pending")} == {
        # a removed file was verified before it was deleted, so it counts in both
        "files": 8, "pending": 3, "verified": 3, "failed": 1, "removed": 1, "ignored": 1,
        "bytes_pending": 60,
    }
    # the oldest pending file was registered 1000 - 40 seconds ago
    assert 955 <= smurf["oldest_pending_age"] <= 1000
    # the failed file holds finalization back; the ignored, older one does not
    assert smurf["finalized_until"] == pytest.approx(known.base + 30 - 1)
    assert smurf["last_file_added"] == known.paths["pending3.dat"]
    assert smurf["last_file_verified"] == known.paths["verified2.dat"]
    tuning = report["tuning"]
    assert (tuning["files"], tuning["pending"], tuning["verified"], tuning["bytes_pending"]) == (1, 0, 1, 0)
    assert tuning["oldest_pending_age"] is None
    assert tuning["last_file_verified"] == known.paths["tune.npy"]
    assert tuning["finalized_until"] > known.base + 1000 - 60  # all verified: "now"


def test_status_reads_the_catalog_from_the_suprsync_db_variable(known, tmp_path):
    report = json.loads(ok(watcher("status", "--json", cwd=tmp_path, env={"SUPRSYNC_DB": str(known.db)}),
                           NOT_RUNNING))
    assert report["smurf"]["pending"] == 3
    assert not (tmp_path / "watcher-data").exists()


def test_status_in_words_names_each_archive_and_its_counts(known, tmp_path):
    out = ok(watcher("status", "--db", str(known.db), cwd=tmp_path), NOT_RUNNING)
    smurf = next(line for line in out.splitlines() if line.startswith("smurf:"))
    # each file counted once (3 + 1 + 2 + 1 + 1 = 8): the removed one was verified first
    assert ("8 files: 3 pending (60 B), 1 failed, 2 verified, 1 removed (1 after verification), "
            "1 ignored") in smurf
    assert smurf.endswith("; no agent serves it")
    assert any(line.startswith("tuning: 1 files: 0 pending") for line in out.splitlines())
    assert "None" not in out


def test_status_of_a_missing_catalog_is_one_line_and_exit_1_and_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere" / "catalog.db"
    result = watcher("status", "--db", str(missing), "--json", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"watcher: no catalog at {missing} (give --db, --config or set SUPRSYNC_DB)"]
    assert result.stdout == ""
    assert not missing.parent.exists()


def test_status_with_a_bad_config_exits_2_naming_the_problem(tmp_path):
    config = tmp_path / "rules.yaml"
    config.write_text("archives: {}\nrules: []\nbogus: 1\n")
    result = watcher("status", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{config}:3: bogus: unknown key" in result.stderr


def test_status_works_while_a_watched_directory_is_gone_and_run_refuses_a_file_in_its_place(tmp_path):
    """A missing watch root is the running agent's to report (tests/test_safety_degradation.py);
    one that is a file can never be watched: exit 2, one line."""
    inbox, far = tmp_path / "inbox", tmp_path / "far"
    inbox.mkdir()
    config = tmp_path / "rules.yaml"
    config.write_text(f"database: {tmp_path / 'c.db'}\narchives: {{a: {{remote_basedir: {far}}}}}\n"
                      f"rules: [{{watch: {inbox}, archive: a}}]\n")
    # by --db: the rules would refuse a file outside the archive's roots (tests/test_commands_registering.py)
    ok(watcher("add", str(tmp_path / "rules.yaml"), "x.yaml", "a", "--db", str(tmp_path / "c.db"), cwd=tmp_path))
    inbox.rmdir()  # the operator looks at status exactly when something is wrong
    report = json.loads(ok(watcher("status", "--json", "--config", str(config), cwd=tmp_path), NOT_RUNNING))
    assert report["a"]["pending"] == 1
    inbox.write_text("not a directory")
    result = watcher("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{config}:3: rules[0].watch: '{inbox}' is not a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- add ------------------------------------------------------------------------------------


def test_add_registers_a_file_with_its_md5_in_the_catalog_given_by_db(tmp_path):
    local = tmp_path / "x.dat"
    local.write_bytes(b"payload")
    db = tmp_path / "dbs" / "catalog.db"
    out = ok(watcher("add", "x.dat", "16750/x.dat", "smurf", "--db", str(db), cwd=tmp_path))
    assert f"registered {local} -> smurf:16750/x.dat" in out
    [row] = rows(db)
    assert (row.local_path, row.remote_path, row.archive_name) == (str(local), "16750/x.dat", "smurf")
    assert row.local_md5sum == md5_of(local)
    assert row.deletable and not row.ignore and row.failed_copy_attempts == 0
    assert row.remote_md5sum is None and row.removed is None


def test_add_uses_the_suprsync_db_variable_like_socs(tmp_path):
    local = tmp_path / "y.dat"
    local.write_bytes(b"y")
    db = tmp_path / "env.db"
    ok(watcher("add", str(local), "y.dat", "timestreams", "--keep", cwd=tmp_path, env={"SUPRSYNC_DB": str(db)}))
    [row] = rows(db)
    assert (row.local_path, row.archive_name, row.deletable) == (str(local), "timestreams", False)


def test_add_of_a_missing_file_is_one_line_and_exit_1(tmp_path):
    result = watcher("add", "gone.dat", "gone.dat", "smurf", "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"watcher: {tmp_path / 'gone.dat'}: no such file"]


@pytest.mark.parametrize("remote", ["../outside.dat", "/etc/outside.dat", "a/../../outside.dat"])
def test_add_refuses_a_remote_path_that_leaves_the_archive(tmp_path, remote):
    (tmp_path / "x.dat").write_bytes(b"x")
    db = tmp_path / "c.db"
    result = watcher("add", "x.dat", remote, "smurf", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and repr(remote) in result.stderr
    assert rows(db) == []


# -- check, list --------------------------------------------------------------------------------


def test_check_shows_the_state_of_a_files_rows(known, tmp_path):
    out = ok(watcher("check", known.paths["failed.dat"], "--db", str(known.db), cwd=tmp_path))
    [line] = out.splitlines()
    fields = line.split("\t")
    assert fields[1:3] == ["failed", "smurf:16750/failed.dat"]
    assert fields[-1] == known.paths["failed.dat"]
    for name, state in [("pending1.dat", "pending"), ("verified1.dat", "verified"),
                        ("removed.dat", "removed"), ("ignored.dat", "ignored")]:
        out = ok(watcher("check", known.paths[name], "--db", str(known.db), cwd=tmp_path))
        assert out.split("\t")[1] == state, (name, out)


def test_check_of_a_path_the_catalog_does_not_know_exits_1(known, tmp_path):
    result = watcher("check", str(tmp_path / "unknown.dat"), "--db", str(known.db), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [f"{tmp_path / 'unknown.dat'}: not in the catalog",
                                          "rules: give --config to see what the rules would do with it"]


def listed(known: Known, tmp_path: Path, *args: str) -> list[str]:
    out = ok(watcher("list", *args, "--db", str(known.db), cwd=tmp_path))
    return [Path(line.split("\t")[-1]).name for line in out.splitlines()]


def test_list_shows_every_file_of_an_archive_oldest_first(known, tmp_path):
    assert listed(known, tmp_path, "smurf") == [
        "removed.dat", "ignored.dat", "verified1.dat", "verified2.dat", "failed.dat",
        "pending1.dat", "pending2.dat", "pending3.dat"]
    assert listed(known, tmp_path, "tuning") == ["tune.npy"]


def test_list_failed_and_pending_show_only_those(known, tmp_path):
    assert listed(known, tmp_path, "smurf", "--failed") == ["failed.dat"]
    assert listed(known, tmp_path, "smurf", "--pending") == ["pending1.dat", "pending2.dat", "pending3.dat"]
    assert listed(known, tmp_path, "tuning", "--pending") == []


# -- retry, ignore -----------------------------------------------------------------------------------


def test_retry_makes_failed_files_pending_again(known, tmp_path):
    out = ok(watcher("retry", "smurf", "--db", str(known.db), cwd=tmp_path))
    assert out.strip() == "1 failed files of smurf are pending again"
    assert listed(known, tmp_path, "smurf", "--failed") == []
    assert "failed.dat" in listed(known, tmp_path, "smurf", "--pending")
    report = json.loads(ok(watcher("status", "--db", str(known.db), "--json", cwd=tmp_path), NOT_RUNNING))
    assert (report["smurf"]["pending"], report["smurf"]["failed"]) == (4, 0)


def test_retry_with_paths_only_touches_those_files(tmp_path):
    db = tmp_path / "c.db"
    catalog = Catalog(db)
    for name in ("a", "b"):
        row = catalog.add_file(str(tmp_path / name), name, "smurf", local_md5sum="1" * 32, timestamp=1.0)
        catalog.File.update(failed_copy_attempts=10).where(catalog.File.id == row.id).execute()
    catalog.close()
    ok(watcher("retry", "smurf", "a", "--db", str(db), cwd=tmp_path))
    assert {Path(r.local_path).name: r.failed_copy_attempts for r in rows(db)} == {"a": 0, "b": 10}


def test_ignore_stops_waiting_for_a_pending_file(known, tmp_path):
    out = ok(watcher("ignore", known.paths["pending1.dat"], "--db", str(known.db), cwd=tmp_path))
    assert out.strip() == "1 catalog rows now ignored"
    report = json.loads(ok(watcher("status", "--db", str(known.db), "--json", cwd=tmp_path), NOT_RUNNING))
    assert (report["smurf"]["pending"], report["smurf"]["ignored"], report["smurf"]["bytes_pending"]) == (2, 2, 50)
    assert listed(known, tmp_path, "smurf", "--pending") == ["pending2.dat", "pending3.dat"]


def test_ignore_of_an_unknown_path_changes_nothing_and_exits_1(known, tmp_path):
    result = watcher("ignore", str(tmp_path / "unknown"), "--db", str(known.db), cwd=tmp_path)
    assert result.returncode == 1 and result.stdout.strip() == "0 catalog rows now ignored"
    assert result.stderr.splitlines() == [f"watcher: {tmp_path / 'unknown'}: not in the catalog"]


# -- add-local-files ----------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    for rel in ("a.dat", "sub/b.dat", "sub/deeper/c.dat", "sub/with space.dat"):
        (root / rel).write_text(rel)
    return root


def test_add_local_files_registers_a_tree_once(tree, tmp_path):
    db = tmp_path / "c.db"
    out = ok(watcher("add-local-files", str(tree), "smurf", "--db", str(db), cwd=tmp_path))
    assert "4 files under" in out and "0 already registered, 0 excluded by the rules, 4 to add" in out
    found = {r.remote_path: r for r in rows(db)}
    assert set(found) == {"a.dat", "sub/b.dat", "sub/deeper/c.dat", "sub/with space.dat"}
    for remote, row in found.items():
        assert row.local_path == str(tree / remote) and row.archive_name == "smurf"
        assert row.local_md5sum == md5_of(tree / remote)
    out = ok(watcher("add-local-files", str(tree), "smurf", "--db", str(db), cwd=tmp_path))
    assert "4 already registered, 0 excluded by the rules, 0 to add" in out
    assert len(rows(db)) == 4


def test_add_local_files_adds_only_files_new_since_the_last_run(tree, tmp_path):
    db = tmp_path / "c.db"
    ok(watcher("add-local-files", str(tree), "smurf", "--db", str(db), cwd=tmp_path))
    (tree / "sub" / "new.dat").write_text("new")
    out = ok(watcher("add-local-files", str(tree), "smurf", "--db", str(db), cwd=tmp_path))
    assert "1 to add" in out
    assert "sub/new.dat" in {r.remote_path for r in rows(db)}
    assert len(rows(db)) == 5


def test_add_local_files_dry_run_writes_nothing(tree, tmp_path):
    db = tmp_path / "c.db"
    out = ok(watcher("add-local-files", str(tree), "smurf", "--dry-run", "--db", str(db), cwd=tmp_path))
    assert out.count("would add ") == 4
    assert f"would add {tree / 'sub/deeper/c.dat'} -> smurf:sub/deeper/c.dat" in out
    assert not db.exists()
    Catalog(db).close()
    before = db.stat().st_mtime_ns, db.read_bytes()
    ok(watcher("add-local-files", str(tree), "smurf", "--dry-run", "--db", str(db), cwd=tmp_path))
    assert rows(db) == []
    assert (db.stat().st_mtime_ns, db.read_bytes()) == before


def test_add_local_files_last_edit_skips_recently_modified_files(tree, tmp_path):
    old = time.time() - 7200
    for rel in ("a.dat", "sub/b.dat"):
        os.utime(tree / rel, (old, old))
    db = tmp_path / "c.db"
    ok(watcher("add-local-files", str(tree), "smurf", "--last-edit", "3600", "--db", str(db), cwd=tmp_path))
    assert sorted(r.remote_path for r in rows(db)) == ["a.dat", "sub/b.dat"]


def test_add_local_files_of_a_missing_directory_is_one_line_and_exit_1(tmp_path):
    result = watcher("add-local-files", str(tmp_path / "nope"), "smurf", "--db", str(tmp_path / "c.db"),
                     cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"watcher: {tmp_path / 'nope'}: no such directory"]
    assert not (tmp_path / "c.db").exists()
