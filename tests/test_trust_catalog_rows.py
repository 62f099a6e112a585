"""Catalog rows are requests, not orders: a producer in the catalog group
writes rows (every column) with its own process, and the agent (root)
reads, ships, hashes or deletes only files below the row's archive's roots,
and deletes only files it hashed itself (a seal the producer cannot forge).

Real parts: a second local account writing the catalog with plain sqlite3,
root-only files, a real agent, real rsync, a real key file the producer
deletes, replaces or plants.
"""
from __future__ import annotations

import grp
import hashlib
import json
import logging
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from tests.status_command import SHOWN
from tests.conftest import Setup
from tests.waiting import wait_until
from watcher.catalog import Catalog
from watcher.seal import KEY_BYTES, Sealer, key_path, load_key

SECRET = b"root only: the producer may not read, ship or delete this\n"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Deployment:
    """An agent's state directory in a shared directory, group-writable by
    the catalog group, with the catalog writable by that group (as socs
    producers need), a watched inbox and a root-only file outside every root."""

    def __init__(self, shared: Path, group: grp.struct_group, producer, **archive):
        self.producer = producer
        self.setup = Setup(shared)
        self.setup.top["catalog_group"] = group.gr_name
        os.chown(shared, 0, group.gr_gid)
        os.chmod(shared, 0o2775)
        self.far = self.setup.archive(delete_local_after=1, **archive)
        self.far.mkdir()
        self.inbox = self.setup.rule()
        self.outside = shared / "outside"  # no root of any archive
        self.outside.mkdir()
        self.secret = self.outside / "secret.dat"
        self.secret.write_bytes(SECRET)
        os.chmod(self.secret, 0o600)
        catalog = Catalog(self.setup.database)  # made by the agent's account, then shared
        catalog.close()
        os.chown(self.setup.database, 0, group.gr_gid)
        os.chmod(self.setup.database, 0o664)

    @property
    def database(self) -> Path:
        return self.setup.database

    def insert(self, **columns) -> int:
        """A row written by the producer's own process with plain sqlite3."""
        row = {"archive_name": "arch", "remote_path": "stolen.dat", "local_md5sum": "0" * 32,
               "timestamp": 0.0, "failed_copy_attempts": 0, "deletable": 1, "ignore": 0, **columns}
        code = (
            "import json, sqlite3, sys\n"
            "row = json.loads(sys.argv[2])\n"
            "con = sqlite3.connect(sys.argv[1], timeout=30)\n"
            "names = ', '.join('\"%s\"' % k for k in row)\n"
            "cur = con.execute('INSERT INTO supersync_v0 (%s) VALUES (%s)' % (names, ', '.join('?' * len(row))),"
            " list(row.values()))\n"
            "con.commit()\n"
            "print(cur.lastrowid)\n")
        done = self.producer.python(code, str(self.database), json.dumps(row))
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    def row(self, row_id: int) -> dict:
        con = sqlite3.connect(self.database, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return dict(con.execute("SELECT * FROM supersync_v0 WHERE id = ?", (row_id,)).fetchone())
        finally:
            con.close()

    def far_names(self) -> set[str]:
        return {str(p.relative_to(self.far)) for p in self.far.rglob("*")}

    def a_file_ships_and_goes(self, name: str) -> None:
        """A file dropped in the inbox is shipped, verified and deleted:
        transfer and retention rounds ran after whatever came before."""
        path = self.inbox / name
        path.write_bytes(name.encode())
        wait_until(lambda: not path.exists() and (self.far / name).exists(), timeout=20,
                   message=f"{name} to be shipped and deleted")

    def status(self, *args: str) -> subprocess.CompletedProcess:
        shown = subprocess.run(watcher_command("status", "--config", str(self.setup.root / "rules.yaml"),
                                               *args), capture_output=True, text=True, timeout=60)
        assert shown.returncode in SHOWN, shown.stderr
        return shown


@pytest.fixture
def deployment(shared_dir, catalog_group, producer) -> Deployment:
    return Deployment(shared_dir, catalog_group, producer)


def refusals(caplog, row_id: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and f"refusing catalog row {row_id} " in r.getMessage()]


# -- 1. only paths below the row's archive's roots --------------------------------------------

def _outside(d: Deployment) -> str:
    return str(d.secret)


def _climbing(d: Deployment) -> str:  # starts with the inbox, lands outside it
    return f"{d.inbox}/../outside/secret.dat"


def _doubled_slash(d: Deployment) -> str:
    return f"{d.inbox}//../outside/secret.dat"


def _dot(d: Deployment) -> str:
    return f"{d.inbox}/./../outside/secret.dat"


def _relative(d: Deployment) -> str:  # to the agent's working directory
    return os.path.relpath(d.secret, os.getcwd())


def _other_archives_root(d: Deployment) -> str:
    return str(d.other_root / "secret.dat")


@pytest.mark.parametrize("where", [_outside, _climbing, _doubled_slash, _dot, _relative,
                                   _other_archives_root])
@pytest.mark.parametrize("claimed_removal", [False, True], ids=["expired", "flagged-deleting"])
def test_a_row_outside_its_archives_roots_is_refused_never_read_shipped_or_deleted(
        deployment, start_agent, caplog, where, claimed_removal):
    """The producer's row says: this root-only file, registered at time 0,
    verified (or being deleted by an agent that stopped). Before, the agent
    hashed it (its md5 then in the catalog), shipped it and deleted it."""
    d = deployment
    d.setup.archive("other")  # a second archive, whose watched tree is no root of "arch"
    d.other_root = d.setup.rule("other-inbox", archive="other", deletable=False)
    (d.other_root / "secret.dat").write_bytes(SECRET)
    os.chmod(d.other_root / "secret.dat", 0o600)
    target = Path(os.path.normpath(os.path.join(os.getcwd(), where(d))))
    extra = {"deleting": 1, "removed": 1.0} if claimed_removal else {}
    row_id = d.insert(local_path=where(d), remote_md5sum="0" * 32, copied=1.0, **extra)
    caplog.set_level(logging.INFO)
    start_agent(d.setup)
    d.a_file_ships_and_goes("after.dat")  # rounds of transfer and retention ran since
    d.a_file_ships_and_goes("after2.dat")
    assert target.exists() and target.read_bytes() == SECRET  # not deleted
    assert "stolen.dat" not in d.far_names()  # not shipped
    wait_until(lambda: d.row(row_id).get("refused") == 1, timeout=5, message="the row to be refused")
    row = d.row(row_id)
    assert row["local_md5sum"] == "0" * 32  # never hashed: its md5 is no oracle
    assert row["removed"] is None and row["deleting"] is None
    assert len(refusals(caplog, row_id)) == 1, refusals(caplog, row_id)  # once, not per round


def test_refused_rows_are_counted_in_status_and_readmitted_when_a_root_is_added(
        deployment, start_agent, caplog):
    d = deployment
    produced = d.setup.root / "produced"  # where a producer puts files, not configured yet
    produced.mkdir()
    os.chown(produced, d.producer.uid, d.producer.gid)
    wrote = d.producer.run(["sh", "-c", f"printf 'mine' > '{produced}/p.dat'"])
    assert wrote.returncode == 0, wrote.stderr
    mine = d.insert(local_path=str(produced / "p.dat"), remote_path="p.dat", local_md5sum=md5(b"mine"),
                    timestamp=1e9)
    stolen = d.insert(local_path=str(d.secret), remote_path="s.dat", timestamp=1e9)
    agent = start_agent(d.setup)
    wait_until(lambda: d.row(mine).get("refused") == 1 and d.row(stolen).get("refused") == 1,
               timeout=15, message="both rows to be refused")
    assert json.loads(d.status("--json").stdout)["arch"]["refused"] == 2
    shown = d.status().stdout
    assert "REFUSED: 2 catalog rows name files outside this archive's roots" in shown, shown
    assert "0 pending" in shown, shown  # refused rows wait for nothing
    agent.stop()
    d.setup.archives["arch"]["api_roots"] = [str(produced)]  # the admin adds the producer's root
    start_agent(d.setup)
    wait_until(lambda: (d.far / "p.dat").exists() and d.row(mine)["remote_md5sum"] == md5(b"mine"),
               timeout=15, message="the readmitted row to be shipped")
    assert (d.far / "p.dat").read_bytes() == b"mine"
    assert d.row(mine)["refused"] is None and d.row(stolen)["refused"] == 1
    assert not (d.far / "s.dat").exists() and d.secret.read_bytes() == SECRET


# -- 2. a row's md5 and identity are never trusted for deletion --------------------------------

def _no_seal(d: Deployment, values: tuple) -> dict:
    return {}


def _made_up_seal(d: Deployment, values: tuple) -> dict:
    return {"seal": Sealer(os.urandom(KEY_BYTES)).seal(*values)}


def _seal_of_another_row(d: Deployment, values: tuple) -> dict:
    """A genuine seal, of another file's row (the agent's key, as root)."""
    other = d.inbox / "legit.dat"
    other.write_bytes(b"legit")
    st = os.stat(other)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return {"seal": Sealer(load_key(d.database)).seal("arch", str(other), values[2], values[3], identity)}


def _key_replaced_by_the_producer(d: Deployment, values: tuple) -> dict:
    """The producer removes the agent's key (the directory is the group's),
    plants a 0600 key of its own and seals the row with it."""
    load_key(d.database)  # the agent's key exists
    key = os.urandom(KEY_BYTES)
    code = ("import os, sys\n"
            "path = sys.argv[1]\n"
            "os.unlink(path)\n"
            "fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)\n"
            "os.write(fd, bytes.fromhex(sys.argv[2]))\n"
            "os.close(fd)\n")
    done = d.producer.python(code, key_path(d.database), key.hex())
    assert done.returncode == 0, done.stderr
    return {"seal": Sealer(key).seal(*values)}


def _key_a_link_to_the_producers_file(d: Deployment, values: tuple) -> dict:
    key = os.urandom(KEY_BYTES)
    mine = d.setup.root / "producers-key"
    code = ("import os, sys\n"
            "open(sys.argv[2], 'wb').write(bytes.fromhex(sys.argv[3]))\n"
            "os.chmod(sys.argv[2], 0o600)\n"
            "os.symlink(sys.argv[2], sys.argv[1])\n")
    done = d.producer.python(code, key_path(d.database), str(mine), key.hex())
    assert done.returncode == 0, done.stderr
    return {"seal": Sealer(key).seal(*values)}


def _key_deleted(d: Deployment, values: tuple) -> dict:
    load_key(d.database)
    done = d.producer.run(["rm", "-f", key_path(d.database)])
    assert done.returncode == 0, done.stderr
    return {}


@pytest.mark.parametrize("forge", [_no_seal, _made_up_seal, _seal_of_another_row,
                                   _key_replaced_by_the_producer, _key_a_link_to_the_producers_file,
                                   _key_deleted])
def test_a_forged_verified_row_never_deletes_a_file_before_it_is_shipped_for_real(
        deployment, start_agent, forge):
    """An unshipped file in the watched tree; the producer's row says it is
    verified as an existing far file (its md5), registered at time 0, with
    the file's own identity copied from stat. Before, retention deleted it
    at once: its far name held other content, and it was never shipped."""
    d = deployment
    (d.far / "old").mkdir()
    (d.far / "old" / "a.dat").write_bytes(b"an earlier file's far copy\n")
    far_md5 = md5(b"an earlier file's far copy\n")
    victim = d.inbox / "victim.dat"
    victim.write_bytes(b"never shipped\n")
    st = os.stat(victim)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    values = ("arch", str(victim), "old/a.dat", far_md5, identity)
    columns = forge(d, values)
    row_id = d.insert(local_path=str(victim), remote_path="old/a.dat", local_md5sum=far_md5,
                      remote_md5sum=far_md5, copied=1.0, dev=st.st_dev, ino=st.st_ino, size=st.st_size,
                      mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, **columns)
    start_agent(d.setup)
    wait_until(lambda: not victim.exists(), timeout=20, message="the file to be shipped, then deleted")
    assert (d.far / "old" / "a.dat").read_bytes() == b"never shipped\n"  # shipped before deletion
    assert replaced_copies(d, "old/a.dat") == [b"an earlier file's far copy\n"]  # and nothing destroyed
    row = d.row(row_id)
    assert row["local_md5sum"] == row["remote_md5sum"] == md5(b"never shipped\n")
    key = os.lstat(key_path(d.database))  # whatever the producer did, the key is the agent's
    assert stat.S_ISREG(key.st_mode) and key.st_uid == os.geteuid() and stat.S_IMODE(key.st_mode) == 0o600


def test_a_file_the_agent_hashed_and_sealed_is_deleted_without_hashing_it_again(
        deployment, start_agent):
    """The seal's point: the agent's own rows keep their proof across rounds."""
    d = deployment
    agent = start_agent(d.setup)
    path = d.inbox / "mine.dat"
    path.write_bytes(b"registered by the agent")
    wait_until(lambda: [r for r in agent.catalog.files.rows_for_path(str(path)) if r.verified],
               timeout=15, message="the file to be verified")
    row = agent.catalog.files.rows_for_path(str(path))[0]
    assert agent.catalog.sealed(row) and agent.catalog.trusted_identity(row) == row.identity
    assert not Catalog(d.database).sealed(row)  # without the key (socs, a producer), nothing is
    wait_until(lambda: not path.exists(), timeout=15, message="the file to be deleted")


# -- 3. a shipped file is never wider than its local mode, unless chmod says so ----------------

@pytest.mark.parametrize("chmod, widest", [("", 0o600), ("u=rw,g=r,o=", 0o640), (None, 0o664)])
def test_a_root_only_file_in_a_root_is_not_shipped_wider_than_its_mode(
        shared_dir, catalog_group, producer, start_agent, chmod, widest):
    """The producer cannot read the file; its row has a wrong md5. Shipped
    (inside a root, that is the agent's job), the far copy keeps the local
    mode (masked by the far umask), or exactly what the configured chmod says."""
    produced = shared_dir / "produced"
    produced.mkdir()
    # "": no chmod; None: the default, socs' g+rwX,o+rX
    options = {"api_roots": [str(produced)]} | ({"chmod": chmod} if chmod is not None else {})
    d = Deployment(shared_dir, catalog_group, producer, **options)
    secret = produced / "secret.dat"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    assert producer.run(["cat", str(secret)]).returncode != 0
    row_id = d.insert(local_path=str(secret), remote_path="s/secret.dat", timestamp=1e9)
    start_agent(d.setup)
    wait_until(lambda: (d.row(row_id)["failed_copy_attempts"] or 0) >= 1, timeout=15,
               message="the copy to be made and found not to match the row")
    far = d.far / "s" / "secret.dat"
    assert far.read_bytes() == SECRET
    mode = stat.S_IMODE(os.stat(far).st_mode)
    assert mode & ~widest == 0, oct(mode)
    if chmod:
        assert mode == widest, oct(mode)


# -- the catalog's side: refused rows cost nothing per batch ----------------------------------

def test_refused_rows_leave_the_pending_index_and_are_found_again_through_their_own(tmp_path):
    catalog = Catalog(tmp_path / "c.db")
    for i in range(50):
        catalog.db.execute_sql(
            "INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, timestamp, refused) "
            "VALUES (?, ?, 'a', ?, ?, ?)", (f"/x/{i}", "0" * 32, f"{i}", float(i), 1 if i % 2 else None))
    assert [r[0] for r in catalog.shipping.pending("a", 100, 10)] == list(range(1, 51, 2))  # ids of even i
    sql = "SELECT id, archive_name, local_path FROM supersync_v0 WHERE refused IS NOT NULL AND id > ? ORDER BY id LIMIT ?"
    plan = [row[3] for row in catalog.db.execute_sql("EXPLAIN QUERY PLAN " + sql, (0, 10))]
    assert any("watcher_refused" in step for step in plan), plan
    assert catalog.files.readmit(lambda archive, path: path.endswith("1")) == 5  # /x/1, 11, 21, 31, 41
    assert len(catalog.shipping.pending("a", 100, 10)) == 30
    catalog.close()


def test_a_refused_row_holds_no_timecode_directory_open_and_no_far_name(tmp_path):
    """A row never acted on must not act either: it does not keep its
    timecode directory from finalizing, is not listed in a finalization
    file, and holds no far name (else a producer's row for /nonexistent
    could make any verified file undeletable and take any name)."""
    catalog = Catalog(tmp_path / "c.db")
    md5s = {"good": "1" * 32, "forged": "2" * 32}

    def insert(local: str, md5: str, remote: str, verified: bool, refused: bool) -> int:
        return catalog.db.execute_sql(
            "INSERT INTO supersync_v0 (local_path, local_md5sum, remote_md5sum, archive_name, remote_path, "
            "timestamp, refused) VALUES (?, ?, ?, 'a', ?, 1e9, ?)",
            (local, md5, md5 if verified else None, remote, 1 if refused else None)).lastrowid

    insert("/in/root/good.dat", md5s["good"], "17000/good.dat", verified=True, refused=False)
    insert("/etc/shadow", md5s["forged"], "17000/forged.dat", verified=False, refused=True)
    insert("/etc/forged", md5s["forged"], "17000/good.dat", verified=True, refused=True)
    assert not catalog.timecode_dirs.has_unverified("a", 17000)
    assert catalog.timecode_dirs.remote_paths("a", 17000) == ["17000/good.dat"]
    assert catalog.far_names.contested("a", ["17000/good.dat"]) == set()
    later = insert("/in/root/later.dat", "3" * 32, "17000/forged.dat", verified=False, refused=False)
    claims = catalog.far_names.claims_for_rows("a", catalog.shipping.pending("a", 10, 10))
    assert [row.id for row in catalog.shipping.pending("a", 10, 10)] == [later]
    assert claims.taken == {} and claims.versioned == {}
    catalog.close()


def _wide_mode(path: str) -> None:
    os.chmod(path, 0o644)


def _hard_linked(path: str) -> None:
    os.link(path, path + ".elsewhere")


def _wrong_length(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"x")


@pytest.mark.parametrize("spoil", [_wide_mode, _hard_linked, _wrong_length])
def test_a_seal_key_that_others_could_have_read_or_written_is_replaced(tmp_path, spoil, caplog):
    database = tmp_path / "catalog.db"
    first = load_key(database)
    assert load_key(database) == first  # kept while it is trustworthy
    spoil(key_path(database))
    second = load_key(database)
    assert second != first and len(second) == KEY_BYTES
    st = os.lstat(key_path(database))
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 1
    assert any("seal key" in r.getMessage() and "replacing it" in r.getMessage() for r in caplog.records)


# -- 4. a producer's row never overwrites another file's far copy ------------------------------

def replaced_copies(d: Deployment, remote: str) -> list[bytes]:
    """The far copies of ``remote`` that later copies replaced, oldest first."""
    kept = sorted((d.far / ".watcher-replaced").glob(f"*/{remote}"), key=lambda p: p.stat().st_mtime_ns)
    return [p.read_bytes() for p in kept]


@pytest.mark.parametrize("erase", ["DELETE FROM supersync_v0 WHERE id = ?",
                                   "UPDATE supersync_v0 SET remote_md5sum = NULL WHERE id = ?",
                                   "UPDATE supersync_v0 SET archive_name = 'elsewhere' WHERE id = ?"])
def test_a_producer_that_erases_a_far_copys_history_still_destroys_no_far_copy(
        deployment, start_agent, erase):
    """The far-name rules read the catalog, which a producer can rewrite:
    with the row of a.dat's only copy erased, its row for other content
    takes the name, and the copy it replaces is kept in the archive."""
    d = deployment
    produced = _producers_root(d)
    agent = start_agent(d.setup)
    d.a_file_ships_and_goes("a.dat")
    [first] = [r.id for r in agent.catalog.files.rows_for_path(str(d.inbox / "a.dat"))]
    done = d.producer.python("import sqlite3, sys\ncon = sqlite3.connect(sys.argv[1], timeout=30)\n"
                             "con.execute(sys.argv[2], (int(sys.argv[3]),))\ncon.commit()\n",
                             str(d.database), erase, str(first))
    assert done.returncode == 0, done.stderr
    _produce(d, produced / "b.dat", b"junk")
    row_id = d.insert(local_path=str(produced / "b.dat"), remote_path="a.dat", local_md5sum=md5(b"junk"),
                      timestamp=1e9 + 1)
    wait_until(lambda: d.row(row_id)["remote_md5sum"] == md5(b"junk"), timeout=20,
               message="the producer's row to be shipped")
    assert (d.far / "a.dat").read_bytes() == b"junk"
    assert replaced_copies(d, "a.dat") == [b"a.dat"]


def _producers_root(d: Deployment) -> Path:
    """A directory the producer writes, listed as the archive's api_roots."""
    produced = d.setup.root / "produced"
    produced.mkdir(exist_ok=True)
    os.chown(produced, d.producer.uid, d.producer.gid)
    d.setup.archives["arch"]["api_roots"] = [str(produced)]
    return produced


def _produce(d: Deployment, path: Path, data: bytes) -> None:
    wrote = d.producer.run(["sh", "-c", 'printf "%s" "$1" > "$2"', "sh", data.decode(), str(path)])
    assert wrote.returncode == 0, wrote.stderr


@pytest.mark.parametrize("same_content", [False, True], ids=["other-content", "same-content"])
def test_a_producers_row_for_a_name_whose_only_copy_is_far_gets_a_numbered_name(
        deployment, start_agent, same_content):
    """socs' own add_file (and any writer) inserts rows without the agent's
    claim on far names: a name whose verified copy's local file is gone
    holds the only copy, and a row of other content must not overwrite it."""
    d = deployment
    produced = _producers_root(d)
    agent = start_agent(d.setup)
    d.a_file_ships_and_goes("a.dat")  # far a.dat is now the only copy of b"a.dat"
    data = b"a.dat" if same_content else b"later content"
    _produce(d, produced / "b.dat", data)
    row_id = d.insert(local_path=str(produced / "b.dat"), remote_path="a.dat", local_md5sum=md5(data),
                      timestamp=1e9 + 1)
    wait_until(lambda: d.row(row_id)["remote_md5sum"] == md5(data), timeout=20,
               message="the producer's row to be shipped")
    assert (d.far / "a.dat").read_bytes() == b"a.dat"
    if same_content:
        assert d.row(row_id)["remote_path"] == "a.dat"
        assert not (d.far / "a.dat.~2~").exists()
    else:
        assert d.row(row_id)["remote_path"] == "a.dat.~2~"
        assert (d.far / "a.dat.~2~").read_bytes() == data
    agent.stop()


def test_a_producers_row_for_a_name_an_older_live_row_holds_waits_and_is_counted(
        deployment, start_agent, caplog):
    d = deployment
    produced = _producers_root(d)
    _produce(d, produced / "one.dat", b"one")
    _produce(d, produced / "two.dat", b"two")
    first = d.insert(local_path=str(produced / "one.dat"), remote_path="x.dat", local_md5sum=md5(b"one"),
                     timestamp=1e9 + 1)
    second = d.insert(local_path=str(produced / "two.dat"), remote_path="x.dat",
                      local_md5sum=md5(b"two"), timestamp=1e9)  # older timestamp: fetched first
    caplog.set_level(logging.INFO)
    start_agent(d.setup)
    wait_until(lambda: d.row(first)["remote_md5sum"] == md5(b"one")
               and json.loads(d.status("--json").stdout)["arch"]["problems"].get("far names taken"),
               timeout=20, message="the first shipped, the second counted as waiting for its name")
    assert (d.far / "x.dat").read_bytes() == b"one"
    assert (produced / "two.dat").read_bytes() == b"two"  # left in place, never shipped
    second_row = d.row(second)
    assert second_row["remote_md5sum"] is None and not second_row["failed_copy_attempts"]
    assert second_row["refused"] is None  # not outside the roots: it waits, it is not refused
    assert sum("its far name arch:x.dat belongs to" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("size", ["abc", 1.5, b"\x00"], ids=["text", "real", "blob"])
def test_a_row_with_a_size_of_the_wrong_type_ships_and_stops_nothing(deployment, start_agent, size):
    """SQLite keeps whatever a writer puts in a column: a size that is no
    integer must not make every batch (or retention round) fail."""
    d = deployment
    path = _producers_root(d) / "odd.dat"  # no scan of the agent's registers it anew
    _produce(d, path, b"odd size")
    d.insert(local_path=str(path), remote_path="odd.dat", local_md5sum=md5(b"odd size"), timestamp=1e9,
             size=size.decode("latin-1") if isinstance(size, bytes) else size)
    start_agent(d.setup)
    wait_until(lambda: (d.far / "odd.dat").exists() and not path.exists(), timeout=20,
               message="the row to be shipped, verified and its file deleted")
    d.a_file_ships_and_goes("after.dat")
