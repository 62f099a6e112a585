"""Catalogs of a few archives with rows in every state, for tests that
compare two ways of counting them."""

from __future__ import annotations

import random

from watcher.catalog import Catalog

LIMITS = (0, 1, 3, 10)  # attempt limits: below, at and above the attempts the rows have


def varied(path, seed: int) -> Catalog:
    """A catalog of a few archives with rows in every state, in random order."""
    rng = random.Random(seed)
    catalog = Catalog(path)
    copied = rng.sample(range(10_000), 600)
    with catalog.db.atomic():
        for n in range(600):
            md5 = f"{n:032x}"
            far = rng.choice((None, md5, md5, md5, "f" * 32))
            catalog.db.execute_sql(
                'INSERT INTO supersync_v0 (local_path, local_md5sum, archive_name, remote_path, "timestamp", '
                'remote_md5sum, copied, removed, failed_copy_attempts, "ignore", refused, size) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (f"/data/{seed}/{n}.dat", md5, rng.choice(("x", "y", "z")), f"{n}.dat",
                 1.6e9 + rng.randrange(100_000), far, None if far is None else 1.6e9 + copied[n],
                 rng.choice((None, None, None, 0.0, 1.7e9)), rng.choice((None, 0, 0, 1, 5, 12)),
                 rng.choice((None, 0, 0, 0, 1)), rng.choice((None, None, None, None, 1)),
                 rng.choice((None, 1, 4096, 1 << 33))))
    return catalog
