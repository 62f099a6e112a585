"""A catalog row's state, defined once: each as an SQL predicate and as the
same test in Python, side by side (tests/test_catalog_states.py checks that
the two agree on every combination of the columns involved).

States are derived from socs' columns, so a row socs wrote has one too:

- pending:  not verified, not removed, not ignored, not refused, attempts
            below the archive's limit
- failed:   the same with its attempts used up
- verified: remote_md5sum = local_md5sum
- removed:  removed IS NOT NULL (0 when it was found already gone)
- ignored:  an operator said never to ship it
- refused:  its path is outside its archive's roots (watcher.roots); never
            read, shipped or deleted

The states overlap (a removed row may be verified): `watcher status` counts
each; a row's one word (``state_of``) is the first that holds in ``ORDER``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

ATTEMPTS = "coalesce(failed_copy_attempts, 0)"
UNVERIFIED = "remote_md5sum IS NOT local_md5sum AND removed IS NULL"
ACTIVE = 'coalesce("ignore", 0) = 0 AND refused IS NULL'
# Unverified and active, whatever its attempts: what the next batch and
# finalized_until look at. The partial indexes' WHERE clauses (schema.INDEXES)
# are these texts, repeated verbatim in queries: SQLite uses a partial index
# only when the query names its terms.
PENDING = f"{UNVERIFIED} AND {ACTIVE}"
VERIFIED = "remote_md5sum = local_md5sum"
# Verified, still here, deletable, not refused: the only rows retention needs to see.
DELETABLE = f"removed IS NULL AND coalesce(deletable, 1) = 1 AND {VERIFIED} AND refused IS NULL"
# Those with a rule's own retention, for archives that otherwise keep everything.
DELETABLE_BY_RULE = f"{DELETABLE} AND retain IS NOT NULL"


def is_unverified(row) -> bool:
    return row.remote_md5sum != row.local_md5sum and row.removed is None


def is_active(row) -> bool:
    return not row.ignore and row.refused is None


def is_verified(row) -> bool:
    return row.remote_md5sum is not None and row.remote_md5sum == row.local_md5sum


def attempts(row) -> int:
    return row.failed_copy_attempts or 0


class State(NamedTuple):
    """One state: its SQL condition (``{max}``: the archive's attempt limit)
    and the same condition on a row object."""

    where: str
    holds: Callable[[object, int], bool]

    def sql(self, max_attempts: int) -> str:
        return f"({self.where.format(max=int(max_attempts))})"


STATES: dict[str, State] = {
    "pending": State(f"{PENDING} AND {ATTEMPTS} < {{max}}",
                     lambda r, m: is_unverified(r) and is_active(r) and attempts(r) < m),
    "failed": State(f"{PENDING} AND {ATTEMPTS} >= {{max}}",
                    lambda r, m: is_unverified(r) and is_active(r) and attempts(r) >= m),
    "verified": State(VERIFIED, lambda r, m: is_verified(r)),
    "removed": State("removed IS NOT NULL", lambda r, m: r.removed is not None),
    "ignored": State('coalesce("ignore", 0) != 0', lambda r, m: bool(r.ignore)),
    "refused": State("refused IS NOT NULL", lambda r, m: r.refused is not None),
}

# A row's one word: removed and ignored rows are done with, whatever their sums.
ORDER = ("removed", "ignored", "refused", "verified", "failed", "pending")


def state_of(row, max_attempts: int) -> str:
    """The first state of ``ORDER`` that holds for a row."""
    return next(name for name in ORDER if STATES[name].holds(row, max_attempts))
