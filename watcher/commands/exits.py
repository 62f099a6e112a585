"""Exit statuses of the `watcher` command, defined once.

- 0 ``OK``: done; for `status`, every archive is served by a running agent
  and nothing needs attention.
- 1 ``PROBLEM``: the command could not do what was asked, or found nothing
  to act on: a file, directory or catalog missing or not what it must be
  (a SQLite file that is not a catalog, a text file), a catalog locked by
  another process, a path with no catalog row (`check`, `retry`, `ignore`),
  a file already registered, a path that ships nowhere (`rules test`).
- 2 ``USAGE``: the command line or the configuration is wrong: a bad option
  value (a duration, an md5), an archive the configuration (or, without
  one, the catalog) does not know, any problem of a rules file.
- 3 ``ATTENTION`` (`status`): an archive is DEGRADED, has failed files,
  refused rows or PROBLEM lines, or its agent cannot use the catalog.
- 4 ``NOT_RUNNING`` (`status`): an archive shown has no running agent
  (checked before 3: a stopped agent's last state is not known).
- 130: interrupted (Ctrl-C); 141: the reader of the output went away
  (`watcher list ARCHIVE | head`), as a command killed by SIGPIPE.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    PROBLEM = 1
    USAGE = 2
    ATTENTION = 3
    NOT_RUNNING = 4
    INTERRUPTED = 130
    BROKEN_PIPE = 141


class CommandFailed(Exception):
    """Ends a command: one line (``watcher: ...`` on stderr) and a status."""

    status = Exit.PROBLEM


class CommandError(CommandFailed):
    """A problem the command met: exit 1."""


class UsageError(CommandFailed):
    """A mistake in how the command was called: exit 2."""

    status = Exit.USAGE
