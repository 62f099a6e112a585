"""Each state is defined once (watcher.catalog.states) in two forms, SQL and
Python: they must agree on every combination of the columns they read, and
every report must count and list by them."""

import itertools
import time

import pytest

from watcher.catalog import Catalog
from watcher.catalog.states import ORDER, STATES, state_of

MAX = 3
COLUMNS = {  # every value each column takes in practice, socs' NULLs included
    "remote_md5sum": (None, "a" * 32, "b" * 32),
    "removed": (None, 0.0, 5.0),
    "ignore": (None, 0, 1),
    "refused": (None, 1),
    "failed_copy_attempts": (None, 0, MAX - 1, MAX, MAX + 4),
}


@pytest.fixture(scope="module")
def every_row(tmp_path_factory):
    catalog = Catalog(tmp_path_factory.mktemp("states") / "catalog.db")
    names = list(COLUMNS)
    with catalog.db.atomic():
        for n, values in enumerate(itertools.product(*COLUMNS.values())):
            catalog.db.execute_sql(
                'INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, "timestamp", '
                f'{", ".join(chr(34) + c + chr(34) for c in names)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                (f"/data/{n}", "a" * 32, "arch", f"{n}", 1.7e9 + n, *values))
    yield catalog
    catalog.close()


def test_sql_and_python_agree_on_every_state_of_every_row(every_row):
    rows = list(every_row.File.select())
    assert len(rows) == len(list(itertools.product(*COLUMNS.values())))
    for name, state in STATES.items():
        by_sql = {i for (i,) in every_row.db.execute_sql(f"SELECT id FROM supersync_v0 WHERE {state.sql(MAX)}")}
        by_python = {r.id for r in rows if state.holds(r, MAX)}
        assert by_sql == by_python, name
        assert by_sql, f"no row is {name}: the comparison proves nothing"


def test_each_row_has_one_word_and_every_word_is_used(every_row):
    words = {r.id: r.state(MAX) for r in every_row.File.select()}
    assert set(words.values()) == set(ORDER)
    for row in every_row.File.select():
        assert STATES[words[row.id]].holds(row, MAX)
        assert row.verified == STATES["verified"].holds(row, MAX)


def test_status_counts_and_listings_follow_the_states(every_row):
    rows = list(every_row.File.select())
    stats = every_row.reports.stats("arch", MAX, time.time())
    for name in ("pending", "verified", "failed", "removed", "ignored", "refused"):
        assert stats[name] == sum(STATES[name].holds(r, MAX) for r in rows), name
    for name in ("pending", "failed", "refused"):
        listed = [r.id for r in every_row.reports.list_files("arch", name, MAX)]
        assert set(listed) == {r.id for r in rows if STATES[name].holds(r, MAX)}, name
    shipped = {r.id for r in every_row.shipping.pending("arch", 10_000, MAX)}
    assert shipped == {r.id for r in rows if STATES["pending"].holds(r, MAX)}


def test_one_word_per_row_prefers_what_is_done_with(every_row):
    row = every_row.File.select().where(every_row.File.removed.is_null(False), every_row.File.ignore == 1,
                                        every_row.File.refused.is_null(False)).first()
    assert state_of(row, MAX) == "removed"
