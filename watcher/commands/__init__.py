"""The operator's commands, one module per group; watcher.cli parses the
command line and calls them.

- ``exits``: the exit statuses, defined once, and the errors that end a command;
- ``opening``: finding the configuration and the catalog (read-only for the
  commands that only look), checking archive names, paths and durations;
- ``status``: `watcher status`;
- ``registering``: `watcher add`, `watcher add-local-files`;
- ``rows``: `watcher check`, `list`, `retry`, `ignore`;
- ``rules_files``: `watcher rules test`, `watcher config example`, `watcher config systemd`.
"""
