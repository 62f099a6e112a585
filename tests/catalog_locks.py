"""Another process holding the catalog's write lock, as a socs producer (or a
stuck sqlite3 shell) can: run LOCK_HOLDER with the catalog's path; it prints
"locked" once it holds the lock and lets go at a line on its stdin."""

import textwrap

LOCK_HOLDER = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.readline()  # hold it until told
    db.execute("COMMIT")
""")
