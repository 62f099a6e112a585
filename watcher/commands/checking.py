"""`watcher config check FILE`: everything `watcher run` would find wrong,
and what its start-up scan would register, changing nothing.

The rules file is read as `run` reads it (a mistake: exit 2, one line
each), the start-up refusals and checks run as the agent runs them (each
archive reached through ssh, with its key and host key: one command), the
watched trees are walked as the start-up scan walks them, and the catalog
is only read. Exit 0 when nothing is wrong, 1 when something is (each on
one line), 2 for a rules file `run` would refuse.
"""

from __future__ import annotations

import threading

from watcher import preflight
from watcher.commands.exits import Exit
from watcher.commands.opening import open_catalog_of
from watcher.config import Config, ConfigError, load_config
from watcher.handlers import walk_files
from watcher.roots import Roots
from watcher.rsync import Destination
from watcher.rules import UnsafeRemotePath, match_rule, select_rule
from watcher.ssh import make_control_dir, remove_control_dir

SHOWN = 10  # files named per rule (the rest counted)


def config_check(args) -> int:
    config = load_config(args.file)  # ConfigError: exit 2, as for `run`
    refused = preflight.refusals(config)
    if refused:
        raise ConfigError(refused)
    wrong = _archives(config)
    for line in wrong:
        print(f"PROBLEM: {line}")
    _would_register(args, config)
    print("ok: `watcher run` would start and find nothing wrong" if not wrong
          else f"{len(wrong)} problem{'s' if len(wrong) > 1 else ''}: `watcher run` would start, and "
          "report each in `watcher status` until it is mended")
    return Exit.OK if not wrong else Exit.PROBLEM


def _archives(config: Config) -> list[str]:
    """The start-up checks' findings, and archives that cannot be reached."""
    remote = any(a.is_remote for a in config.archives.values())
    control = make_control_dir() if remote else None
    roots = Roots(config)
    destinations = {name: Destination(a, control, roots.of(name)) for name, a in config.archives.items()}
    try:
        checks = preflight.StartupChecks(config, destinations)
        found = checks.run(threading.Event())
        wrong = [f.message for f in found]
        for name in sorted(checks.unreachable):
            a = config.archives[name]
            wrong.append(f"archive {name}: {a.ssh_host} cannot be reached with this configuration's ssh "
                         "settings (key, host key, port): ssh's own words are in the warning above")
        return wrong
    finally:
        for dest in destinations.values():
            dest.close()
        if control:
            remove_control_dir(control)


def _would_register(args, config: Config) -> None:
    """Per rule, the files below its watch directory that are not in the
    catalog yet (the start-up scan registers them), read-only."""
    catalog = open_catalog_of(args, config, must_exist=False)
    try:
        for i, rule in enumerate(config.rules):
            if not rule.watch.is_dir():
                print(f"rules[{i}] (watch {rule.watch}): the directory is missing: watched once it is there")
                continue
            new, known, examples = 0, 0, []
            batch: list[str] = []

            def settle(paths: list[str]) -> None:
                nonlocal new, known
                registered = catalog.files.known_paths(paths) if catalog is not None else set()
                for path in paths:
                    if path in registered:
                        known += 1
                        continue
                    new += 1
                    if len(examples) < SHOWN:
                        try:
                            remote = match_rule(path, [rule]).remote_path
                        except UnsafeRemotePath as exc:
                            remote = f"(refused: {exc})"
                        examples.append(f"  {path} -> {rule.archive}:{remote}")

            for found in walk_files(str(rule.watch)):
                taken = select_rule(found.path, config.rules)
                if taken is None or taken[0] is not rule:
                    continue
                batch.append(found.path)
                if len(batch) >= 500:
                    settle(batch)
                    batch = []
            settle(batch)
            print(f"rules[{i}] (watch {rule.watch}): {new} file{'s' if new != 1 else ''} to register, "
                  f"{known} already in the catalog")
            for line in examples:
                print(line)
            if new > len(examples):
                print(f"  ... and {new - len(examples)} more")
    finally:
        if catalog is not None:
            catalog.close()
