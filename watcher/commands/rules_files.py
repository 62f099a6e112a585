"""`watcher rules test PATH...`, `watcher config example`, `watcher config
systemd FILE`: what a rules file does with paths, a starter file, and the
unit drop-in it needs."""

from __future__ import annotations

import os

from watcher import service
from watcher.commands.exits import Exit, UsageError
from watcher.commands.opening import abspath, config_at_hand
from watcher.config import Config, load_config
from watcher.rules import UnsafeRemotePath, match_rule, relative_to, select_rule, why_not_taken


def explain(path: str, config: Config) -> tuple[bool, str]:
    """Whether the rules ship an absolute path, and in words: the rule that
    takes it (first match wins), its archive and far name; or why none does."""
    found = select_rule(path, config.rules)
    if found is not None:
        rule = found[0]
        name = _rule_name(config, rule)
        try:
            match = match_rule(path, [rule])
        except UnsafeRemotePath as exc:
            return False, f"ships nowhere: {name} takes it, but its {exc}"
        return True, f"{name} takes it: archive {rule.archive}, remote path {match.remote_path}"
    reasons = [f"{_rule_name(config, r)} {why_not_taken(rel, r)}"
               for r in config.rules if (rel := relative_to(path, str(r.watch)))]
    if reasons:
        return False, "ships nowhere: " + "; ".join(reasons)
    watched = ", ".join(dict.fromkeys(str(r.watch) for r in config.rules)) or "none"
    return False, f"ships nowhere: under no rule's watch directory ({watched})"


def _rule_name(config: Config, rule) -> str:
    return f"rules[{config.rules.index(rule)}] (watch {rule.watch})"


def rules_test(args) -> int:
    """Per path, what the rules do with it; exit 1 if any ships nowhere."""
    if args.config:
        config = load_config(args.config, live=False)
    elif (config := config_at_hand(args)) is None:  # $SUPRSYNC_DB names only a catalog
        raise UsageError("rules test needs a rules file: give --config FILE (or --state-dir)")
    nowhere = 0
    for given in args.paths:
        shipped, words = explain(abspath(given), config)
        nowhere += not shipped
        print(f"{abspath(given)}: {words}")
    return Exit.PROBLEM if nowhere else Exit.OK


EXAMPLE = """\
# A starter rules file for watcher (`watcher config example > rules.yaml`).
# Edit the paths, then `watcher rules test --config rules.yaml SOME/FILE`
# shows what a file would become. Relative paths are relative to this file.
# The README's configuration reference lists every key and its default.

# instance_id: smurf-sync-srv20  # names finalization files; default: the host name
# database: /data/so/dbs/suprsync.db   # default: suprsync.db beside this file
# file_root: /data/so/suprsync   # finalization files; default: finalization/ beside the catalog

archives:
  smurf:
    # A local archive: files are copied into this directory (made when missing).
    remote_basedir: /srv/archive/smurf
    # Over ssh instead (the far directory is relative to the login's home):
    # ssh_host: cryo@archive.example.org
    # ssh_key: /home/cryo/.ssh/id_ed25519
    # known_hosts: /home/cryo/.ssh/known_hosts
    # delete_local_after: 7d     # delete local copies a week after registration, once verified; absent: never
    max_copy_attempts: 10        # then a file counts as failed (`watcher retry smurf`)

rules:                           # first match wins
  - watch: /data/smurf_data      # watched recursively; may be missing (an unmounted disk) until it is there
    archive: smurf
    exclude: [".*", "*.tmp", "*.part", "*.swp"]   # hidden and temporary files stay local
    remote_path: "{timecode}/{relpath}"           # the five-digit timecode directory first, as socs lays it out
"""


def config_example(args) -> int:
    print(EXAMPLE, end="")
    return Exit.OK


def config_systemd(args) -> int:
    """The unit drop-in a rules file needs (watcher.service.dropin)."""
    config = load_config(args.file, live=False)  # a tree missing now still gets its line
    try:
        print(service.dropin(config, os.path.abspath(args.file)), end="")
    except service.DropInError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    return Exit.OK
