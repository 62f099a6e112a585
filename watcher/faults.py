"""Named pause points for the fault-injection tests, inert in production.

With WATCHER_PAUSE_AT=<name> in the environment, reaching that point touches
the file named by WATCHER_PAUSE_FILE and blocks, so a test can SIGKILL the
agent at exactly that instant. Without it, a checkpoint is one dict lookup.
"""

import os
import time

POINTS = ("hashed", "copied", "verified", "deleting", "finalizing")


def checkpoint(name: str) -> None:
    if os.environ.get("WATCHER_PAUSE_AT") != name:
        return
    marker = os.environ.get("WATCHER_PAUSE_FILE")
    if marker:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
    while True:  # until killed
        time.sleep(3600)
