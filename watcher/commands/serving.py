"""`watcher serve`: the archive host's forced command (watcher.serve does the work)."""

from __future__ import annotations

from watcher import serve


def run(args) -> int:
    return serve.main(args.root, min_temp_age=args.min_temp_age, append_only=args.append_only)
