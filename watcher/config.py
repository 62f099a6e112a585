"""Read rules.yaml into typed settings.

Every problem in a file is collected and reported together, each as one line
naming the file, the line and the key (``rules.yaml:12: rules[0].archive:
unknown archive 'smurff'``), so that a person can fix them all in one go.
"""

from __future__ import annotations

import dataclasses
import functools
import grp
import ipaddress
import math
import os
import posixpath
import re
import socket
import stat
import string
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any


from watcher.far_side import MAX_NAMES
from watcher.rules import ABSOLUTE, CLIMBS, remote_path_flaw
from watcher.paths import TEMPLATE_FIELDS
from watcher.service import SYSTEM_CONFIG_DIR, SYSTEM_STATE_DIR

DEFAULT_CONFIG = Path(__file__).with_name("rules.yaml")
STATE_DIR_ENV = "WATCHER_STATE_DIR"

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Archive:
    name: str
    remote_basedir: str
    ssh_host: str | None = None
    ssh_key: str | None = None
    ssh_port: int | None = None
    known_hosts: str | None = None
    accept_new_host_keys: bool = False
    # ssh's -c for this archive's connection (None: ssh's own choice)
    ssh_cipher: str | None = None
    delete_local_after: float | None = None
    max_copy_attempts: int = 10
    copy_timeout: float = 60.0
    cmd_timeout: float = 5.0
    files_per_batch: int = 5000
    compression: bool = False
    bwlimit: str | None = None
    chmod: str | None = "g+rwX,o+rX"  # socs' SupRsync default
    # When far copies reach stable storage before they count as verified:
    # "batch" (one far sync per batch, of its files and their directories)
    # or "file" (rsync's --fsync too, per file as it is written). Never off.
    fsync: str = "batch"
    # Local directories whose files producers register through the API
    # (socs' add_file, `watcher add`) for this archive; see watcher/roots.py.
    api_roots: tuple[str, ...] = ()
    # Names its finalization files, their directory and their instance_id
    # key (socs ran one SupRsync instance per archive, each with its own
    # id); None in a rules file: the top-level instance_id (the reader fills it in).
    instance_id: str | None = None
    # What the far account's key may run: "shell" (a login shell: rsync,
    # md5sum, find...), or "serve" (only `watcher serve`, a forced command in
    # authorized_keys; see watcher/serve.py). Over ssh only.
    far_side: str = "shell"

    @property
    def is_remote(self) -> bool:
        return self.ssh_host is not None


@dataclass(frozen=True)
class Rule:
    watch: Path
    archive: str
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = (".*", "*.tmp", "*.part", "*.swp")
    match: re.Pattern | None = None
    remote_path: str = "{relpath}"
    deletable: bool = True
    settle: float = 2.0
    poll: bool = False
    # A rule may keep its files longer (or forever: None) than its archive.
    overrides_retention: bool = False
    delete_local_after: float | None = None


@dataclass(frozen=True)
class Metrics:
    """Where the Prometheus endpoint (watcher.metrics) listens: ``listen: "HOST:PORT"``."""

    host: str
    port: int


@dataclass(frozen=True)
class Config:
    instance_id: str
    database: Path
    file_root: Path
    archives: dict[str, Archive]
    rules: tuple[Rule, ...]
    rescan_interval: float = 300.0
    source: Path | None = None
    # The group whose members may write the catalog and the state directory
    # (socs producers); None: only the agent's own account.
    catalog_group: str | None = None
    # The Prometheus endpoint; None: off.
    metrics: Metrics | None = None


# Defaults that depend on where things are (not a field's own): the catalog
# beside the rules file, finalization files beside the catalog.
DEFAULT_DATABASE = "suprsync.db"
DEFAULT_FILE_ROOT = "finalization"


def default_database(source: str, base: Path, r: "_Reader | None" = None) -> Path:
    """The catalog of a rules file with no ``database:``. For the unit's
    /etc/watcher/NAME.yaml: /var/lib/watcher/NAME/suprsync.db, the instance's
    own StateDirectory (instances never share one by accident; file_root
    follows it); elsewhere beside the rules file. A catalog left at the old
    default /etc/watcher/suprsync.db is refused, not silently replaced by an
    empty one."""
    path = Path(os.path.abspath(source))
    if path.parent != SYSTEM_CONFIG_DIR or path.suffix != ".yaml":
        return base / DEFAULT_DATABASE
    old = SYSTEM_CONFIG_DIR / DEFAULT_DATABASE
    if r is not None and old.exists():
        r.problem(("database",), f"not given, so the catalog is {SYSTEM_STATE_DIR / path.stem / DEFAULT_DATABASE}, "
                  f"but {old} exists (the default before): add 'database: {old}' to keep using it, "
                  "or move it there")
    return SYSTEM_STATE_DIR / path.stem / DEFAULT_DATABASE


def defaults(cls) -> dict[str, Any]:
    """Each setting's default, read from its dataclass field: the one place
    a default is written (the reader and the README's check take it here)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _settings(cls, *not_settings: str) -> frozenset[str]:
    """The keys a rules file may set: the dataclass's fields but those the reader derives."""
    return frozenset(f.name for f in dataclasses.fields(cls)) - set(not_settings)


TOP_KEYS = _settings(Config, "source")
ARCHIVE_KEYS = _settings(Archive, "name")
RULE_KEYS = _settings(Rule, "overrides_retention")
METRICS_KEYS = frozenset({"listen"})  # read into Metrics' host and port


# Python's waits refuse timeouts past about 292 years; retention past 100 is "never".
MAX_DURATION = 100 * 365 * 86400


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"30m"``, ``"12h"``, ``"7d"``; ValueError otherwise,
    and for NaN, infinity and anything over 100 years, which nothing can wait for."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 90, 30m, 12h or 7d, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = value
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 90, 30m, 12h or 7d, got {value!r}")
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"expected a duration of at most 100 years, got {value!r}")
    return float(seconds)


# --------------------------------------------------------------------------
# YAML with line numbers


# A rules file nests five levels deep; far deeper is a mistake, or an attack on the stack.
MAX_DEPTH = 20
_ALIAS = "!watcher-alias"  # the tag of the node an alias composes to
_MERGE = "tag:yaml.org,2002:merge"
_SKIP = object()  # a key that was refused


@functools.cache
def _loader() -> type:
    """The YAML loader class, made on first use: importing PyYAML costs a
    command that reads no rules file (`watcher status --db`) a tenth of its time."""
    import yaml
    from yaml.composer import ComposerError

    class _Loader(yaml.SafeLoader):
        """A SafeLoader whose aliases compose to a marker node instead of the node
        they name, so that a billion-laughs file is refused at the cost of its own
        size, and whose documents may nest at most MAX_DEPTH levels."""

        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.get_event()
                return yaml.ScalarNode(_ALIAS, event.anchor, event.start_mark, event.end_mark)
            if self.depth >= MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                    self.peek_event().start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return _Loader


def _compose(r: _Reader, text: str) -> Any:
    """Parse YAML into plain data, noting the line of each key path in ``r``.

    Aliases, duplicate keys, keys that are lists or mappings and values no
    constructor knows are problems; a refused value reads as absent.
    """
    import yaml

    try:
        node = yaml.compose(text, Loader=_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{r.source}:{mark.line + 1}" if mark else r.source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: not valid YAML: {problem}"]) from None
    if node is None:
        return {}
    constructor = yaml.SafeLoader("")

    def scalar(n):
        try:
            return constructor.construct_object(n)
        except (yaml.YAMLError, ValueError) as exc:  # an unknown tag, 2024-13-01
            raise ValueError(f"cannot read {n.value!r}: {getattr(exc, 'problem', None) or exc}") from None

    def key_of(k, path: tuple, line: int):
        if k.tag == _ALIAS:
            r.problem(path, f"alias *{k.value} used as a key: aliases are refused", line)
        elif k.tag == _MERGE:
            r.problem(path, "merge keys (<<) are refused: write the keys out", line)
        elif not isinstance(k, yaml.ScalarNode):
            what = "a list" if isinstance(k, yaml.SequenceNode) else "a mapping"
            r.problem(path, f"a key must be a single value, not {what}", line)
        else:
            try:
                return scalar(k)
            except ValueError as exc:
                r.problem(path, f"key {exc}", line)
        return _SKIP

    def build(n, path):
        r.lines[path] = n.start_mark.line + 1
        if n.tag == _ALIAS:
            r.refuse(path, f"alias *{n.value}: aliases are refused (a few lines of them can "
                           "expand to gigabytes); write the value out")
            return None
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                line = k.start_mark.line + 1
                key = key_of(k, path, line)
                if key is _SKIP:
                    continue
                if key in out:
                    r.problem(path + (key,), f"duplicate key (first at line {r.lines[path + (key,)]}): "
                              "remove one of them", line)
                    continue
                out[key] = build(v, path + (key,))
                r.lines[path + (key,)] = line
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v, path + (i,)) for i, v in enumerate(n.value)]
        try:
            return scalar(n)
        except ValueError as exc:
            r.refuse(path, str(exc))
            return None

    return build(node, ())


def _keypath(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class _Reader:
    """Collects typed values and problems while walking the parsed file."""

    def __init__(self, source: str, base: Path, live: bool = True):
        self.source = source
        self.live = live  # whether the host is checked: roots, api_roots, groups (the agent; not `watcher status`)
        self.lines: dict[tuple, int] = {}
        self.base = base
        self.problems: list[str] = []
        self.refused: list[tuple] = []  # paths whose value was refused while parsing

    def problem(self, path: tuple, message: str, line: int | None = None) -> None:
        if any(path[:len(gone)] == gone for gone in self.refused):
            return  # already reported: a refused value is no second problem
        probe = path
        while line is None and probe and probe not in self.lines:
            probe = probe[:-1]
        line = line or self.lines.get(probe)
        where = f"{self.source}:{line}" if line else self.source
        self.problems.append(f"{where}: {_keypath(path)}: {message}")

    def refuse(self, path: tuple, message: str) -> None:
        """Report a value that cannot be used, and nothing more below ``path``."""
        self.problem(path, message)
        self.refused.append(path)

    def mapping(self, value: Any, path: tuple, allowed: set[str]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                self.problem(path + (key,), f"unknown key (known: {', '.join(sorted(allowed))})")
        return value

    def get(self, data: dict, key: str, path: tuple, kind, default=None, required=False):
        if key not in data or (data[key] is None and not required):
            if required:
                self.problem(path + (key,), "is required")
            return default
        value = data[key]
        here = path + (key,)
        try:
            return kind(value)
        except (TypeError, ValueError) as exc:
            self.problem(here, str(exc))
            return default

    def setting(self, data: dict, of: type, key: str, path: tuple, kind):
        """``key`` of ``data`` as ``kind`` reads it; its dataclass default when absent or wrong."""
        return self.get(data, key, path, kind, defaults(of)[key])

    def path(self, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path, got {value!r}")
        _no_nul(value)
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base / p)

    def root(self, value: Any) -> Path:
        """A local directory as a root: normalised, as the roots policy compares
        rows' paths with it lexically (a link is taken as its own name)."""
        return Path(os.path.normpath(self.path(value)))


def _no_nul(path: str) -> None:
    if "\0" in path:
        raise ValueError(f"a path cannot contain a NUL character, got {path!r}")


def _typed(kind, name):
    def check(value):
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"expected {name}, got {value!r}")
        return value
    return check


_str = _typed(str, "a string")
_bool = _typed(bool, "true or false")
FAR_SIDES = ("shell", "serve")


def _far_side(value):
    if value not in FAR_SIDES:
        raise ValueError(f"expected shell (the far login runs a shell) or serve (its key may run "
                         f"only `watcher serve`, a forced command), got {value!r}")
    return value


# SQLite refuses integers past 2**63; beyond a million, neither count changes anything
# (a batch also ends at 256 MiB, and a million attempts is "forever").
MAX_COUNT = 1_000_000


def _positive_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    if value > MAX_COUNT:
        raise ValueError(f"expected at most {MAX_COUNT}, got {value!r}")
    return value


def _at_least(minimum: float, why: str):
    def check(value):
        seconds = parse_duration(value)
        if seconds < minimum:
            raise ValueError(f"expected at least {minimum:g} s {why}, got {value!r}")
        return seconds
    return check


MIN_SETTLE = 0.1
MIN_RESCAN = 1.0
_settle = _at_least(MIN_SETTLE, "of quiet before a file counts as complete")
_rescan = _at_least(MIN_RESCAN, "between rescans (a shorter interval keeps a core busy rescanning)")

# rsync --timeout and ssh's ConnectTimeout count whole seconds, and take at most 2**31 - 1.
MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 86400.0


def _timeout(value):
    seconds = parse_duration(value)
    if not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
        raise ValueError(f"expected from 1 s (rsync and ssh count whole seconds) to 1 d "
                         f"(a transfer stalled for a day is dead), got {value!r}")
    return seconds


MAX_NAME = 200


def _name(value):
    """A name fit for a directory and part of a file name: the finalization files are
    ``{file_root}/{tc}/{instance_id}/{now}_{archive}_{timecode}_finalized.yaml``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty name, got {value!r}")
    if "/" in value or "\0" in value or value in (".", ".."):
        raise ValueError(f"{value!r} cannot name a directory or a file of the finalization "
                         "files: no '/', NUL, '.' or '..'")
    if len(value) > MAX_NAME:
        raise ValueError(f"{len(value)} characters is too long to name a directory or a file "
                         f"of the finalization files (at most {MAX_NAME})")
    return value


def _local_dir(r: _Reader):
    def check(value):
        return str(r.path(_str(value)))
    return check


def _remote_dir(value):
    """A far directory as ssh and rsync will read it: relative paths are relative
    to the login's home directory (rsync's operand and the md5 command's ``cd``
    both start there)."""
    if not _str(value):
        raise ValueError(f"expected a directory on the archive host, got {value!r}")
    _no_nul(value)
    if value.startswith("~"):
        raise ValueError(f"'~' is not expanded on the archive host (rsync -s takes it literally); "
                         f"a relative path is already relative to the login's home, got {value!r}")
    if not posixpath.normpath(value).strip("/"):
        raise ValueError(f"{value!r} is the archive host's root directory: name a directory "
                         "of its own for the archive")
    return value


def _ssh_host(value):
    """``[user@]host``. ssh reads a leading '-' as an option (-oProxyCommand=...
    runs a command); rsync reads a host with '/' as a local path (it would
    write a tree under the working directory) and 'host:' as its daemon."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a host name such as user@archive, got {value!r}")
    if value.startswith("-") or any(c.isspace() or c == "\0" or ord(c) < 32 or c == "\x7f"
                                    for c in value):
        raise ValueError(f"not a host name: {value!r} (must not start with '-' or contain "
                         "spaces or control characters)")
    user, _, host = value.rpartition("@")
    if not host or host.startswith("-") or "/" in value or ":" in value:
        raise ValueError(f"not a host name: {value!r} (no '/' or ':' anywhere, and the host "
                         "after 'user@' must not be empty or start with '-'; for an IPv6 "
                         "address or a jump host, name a Host entry of ~/.ssh/config)")
    if user.startswith("-"):
        raise ValueError(f"not a user name: {user!r} in {value!r} (must not start with '-')")
    return value


def _ssh_file(r: _Reader):
    """A path handed to an ssh option: ssh's option parser takes it whole
    only inside double quotes, which cannot hold a double quote or a
    control character; ssh 8.7 and later read a backslash as an escape
    (older ones do not) and expand ``${VAR}`` (see watcher/ssh.py)."""
    def check(value):
        p = r.path(value)
        if ssh_path_problem(str(p)):
            raise ValueError(f"{str(p)!r}: a path for ssh must not contain a double quote, "
                             "a backslash, '${' or control characters")
        return p
    return check


def ssh_path_problem(path: str) -> str | None:
    """Why ssh cannot be given ``path`` unchanged as an option's value, or None."""
    if '"' in path:
        return 'ssh cannot be given a path with a double quote (")'
    if "\\" in path:
        return "ssh cannot be given a path with a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "ssh cannot be given a path with a control character (newline, tab, ...)"
    if "${" in path:
        return "ssh would read ${...} in a path as an environment variable"
    return None


def _api_roots(r: _Reader):
    """Absolute local directories, resolved as written (a link is taken as its
    own name: the agent never follows one below a root, and compares rows'
    paths with these lexically)."""
    def check(value):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a list of local directories, got {value!r}")
        roots = []
        for item in value:
            p = r.root(item)
            if p == Path("/"):
                raise ValueError("'/' would let any catalog row name any file on the host; "
                                 "list the directories producers write to")
            if r.live and not p.is_dir():
                raise ValueError(f"directory {str(p)!r} does not exist")
            roots.append(str(p))
        return tuple(roots)
    return check


def _group(r: _Reader):
    def check(value):
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a group name, got {value!r}")
        if r.live:
            try:
                grp.getgrnam(value)
            except KeyError:
                raise ValueError(f"no group {value!r} on this host") from None
        return value
    return check


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")


def _listen(value) -> Metrics:
    """``HOST:PORT`` (an IPv6 address in brackets): an address or host name, and a port from 1."""
    example = "such as 127.0.0.1:9630 (an IPv6 address in brackets: [::1]:9630)"
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT {example}, got {value!r}")
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv6 address") from None
    elif not colon or not _HOST_NAME.fullmatch(host):
        raise ValueError(f"expected HOST:PORT {example}, got {value!r}")
    elif re.fullmatch(r"[0-9.]+", host) and not _is_ipv4(host):
        raise ValueError(f"{host!r} in {value!r} is not an IPv4 address")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected a port from 1 to 65535 after the last ':', got {value!r}")
    return Metrics(host, int(port))


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _read_metrics(r: _Reader, data: dict) -> Metrics | None:
    """The ``metrics:`` mapping; absent or null: no endpoint."""
    value = data.get("metrics")
    if value is None:
        return None
    if not isinstance(value, dict):
        r.problem(("metrics",), f"expected a mapping such as {{listen: \"127.0.0.1:9630\"}}, got {value!r}")
        return None
    return r.get(r.mapping(value, ("metrics",), set(METRICS_KEYS)), "listen", ("metrics",), _listen,
                 required=True)


def _port(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"expected a port number, got {value!r}")
    return value


def _globs(value):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of glob patterns, got {value!r}")
    return tuple(value)


def _regex(value):
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression, got {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None


_RATE_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def _bwlimit(value):
    """rsync refuses a rate under 512 bytes/s (0 is no limit), and reads 0.0001
    as 0; a rate over 1 PiB/s limits nothing."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([bBkKmMgGtTpP]?)", str(value))
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not m:
        raise ValueError(f"expected a rate such as 5000 or 5m, got {value!r}")
    rate = float(m.group(1)) * _RATE_UNITS[m.group(2).lower() or "k"]
    if rate and not 512 <= rate <= 1 << 50:
        raise ValueError(f"expected no limit (0) or a rate from 512 bytes/s (0.5 or 512b, "
                         f"rsync's least) to 1 PiB/s, got {value!r}")
    return str(value)


# The ciphers OpenSSH 8-9 offers (`ssh -Q cipher`, less the CBC ones it no longer enables).
SSH_CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
               "aes128-ctr", "aes192-ctr", "aes256-ctr")


def _ssh_cipher(value):
    """One cipher of SSH_CIPHERS, or several comma-separated in order of
    preference (a host that offers none of them refuses the connection)."""
    names = value.split(",") if isinstance(value, str) else [None]
    if not all(name in SSH_CIPHERS for name in names):
        raise ValueError(f"expected an ssh cipher ({', '.join(SSH_CIPHERS)}) or several "
                         f"comma-separated, got {value!r}; aes128-gcm@openssh.com is the fastest "
                         f"where the CPU has AES instructions ('aes' in /proc/cpuinfo's flags)")
    return value


FSYNC_MODES = ("batch", "file")


def _fsync(value):
    """Durability can only be made stricter: a verified copy that a power cut
    could still take away would let retention delete the only good copy."""
    if value not in FSYNC_MODES:
        raise ValueError(f"expected 'batch' (the default: the far copies and their directories "
                         f"are synced once per batch) or 'file' (rsync --fsync as well), got "
                         f"{value!r}; it cannot be turned off")
    return value


def _chmod(value):
    """An rsync --chmod string; never setuid, setgid or sticky: a producer's file
    must not become a program that runs as its far owner, or a far directory
    rule that others cannot see. ``""``: no chmod (as socs' ``--chmod ''``): a
    file keeps its local mode, masked by the far umask."""
    if value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[DFugoa+\-=rwxXst,0-7]+", value):
        raise ValueError(f"expected an rsync --chmod string such as 'g+rwX,o+rX', got {value!r}")
    for part in value.split(","):
        octal = part.lstrip("DF")
        if ("s" in part or "t" in part
                or (octal.isdigit() and len(octal) > 3 and int(octal, 8) & 0o7000)):
            raise ValueError(f"{part!r} in {value!r} sets setuid, setgid or sticky bits, which "
                             "the archive must never get from a shipped file")
    return value


def check_template(template: str, fields: set[str]) -> str | None:
    """Return what is wrong with a remote path template, or None."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"not a valid template: {exc}"
    if "\0" in template:
        return "must not contain a NUL character (rsync's file list is NUL-separated)"
    for _lit, name, spec, conversion in parsed:
        if name is not None and name not in fields:
            return f"unknown field {{{name}}} (known: {', '.join(sorted(fields))})"
        if spec or conversion:  # {name:>300} makes names no file system takes
            field = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            return f"{{{field}}}: fields take no format spec or conversion"
    try:
        sample = template.format(**{name: "x" for name in fields})
    except (ValueError, IndexError, KeyError) as exc:
        return f"not a valid template: {exc}"
    # Only what no file can repair is refused here: an empty or unnormal name
    # may still render well, and each rendered name is judged again.
    flaw = remote_path_flaw(sample)
    if flaw == ABSOLUTE:
        return "must be relative to the archive's remote_basedir, not absolute"
    if flaw == CLIMBS:
        return "must not climb out of the archive with '..'"
    return None


def _unreadable_file(path: Path) -> str | None:
    """What stops ``path`` being read as a file, or None."""
    if not path.exists():
        return f"file {str(path)!r} does not exist"
    if not path.is_file():
        return f"{str(path)!r} is not a file"
    if not os.access(path, os.R_OK):
        return f"file {str(path)!r} cannot be read (permission denied)"
    return None


def _not_a_directory(path: Path) -> str | None:
    """Why a watch root can never be watched (it is something other than a
    directory), or None. A root that is missing (an unmounted disk) or cannot
    be reached now is the running agent's to report and wait for, not a
    configuration error: the other rules keep working meanwhile."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    return f"{str(path)!r} is not a directory"


def _inside(inner: str, outer: str) -> bool:
    return Path(inner).is_relative_to(Path(outer))


def _check_overlaps(r: _Reader, archives: dict[str, Archive], watched: list[tuple[int, Path]],
                    database: Path, file_root: Path) -> None:
    """Refuse archives, catalogs and finalization directories inside watched trees
    (they would be shipped again forever) and watched trees inside archives (retention
    would delete the only copy)."""
    real = [(i, watch, os.path.realpath(watch)) for i, watch in watched]

    def rule_name(i: int, watch: Path) -> str:
        line = r.lines.get(("rules", i, "watch"))
        return f"rules[{i}].watch ({str(watch)!r}{f', line {line}' if line else ''})"

    for name, archive in archives.items():
        if archive.is_remote or not archive.remote_basedir:
            continue
        base = os.path.realpath(archive.remote_basedir)
        for i, watch, real_watch in real:
            if base == real_watch:
                why = (f"is the same directory as {rule_name(i, watch)}: every copy would be "
                       "shipped again, forever")
            elif _inside(base, real_watch):
                why = f"is inside {rule_name(i, watch)}: every copy would be shipped again, forever"
            elif _inside(real_watch, base):
                why = (f"contains {rule_name(i, watch)}: the archive would hold the watched files "
                       "themselves, and retention would delete the only copy")
            else:
                continue
            r.problem(("archives", name, "remote_basedir"), f"{archive.remote_basedir!r} {why}")
    for key, where, what in (
            ("database", database, "the catalog would be registered and shipped as data"),
            ("file_root", file_root, "finalization files would be registered twice, once by that rule")):
        real_where = os.path.realpath(where)
        for i, watch, real_watch in real:
            if _inside(real_where, real_watch):
                r.problem((key,), f"{str(where)!r} is inside {rule_name(i, watch)}: {what}")
    # Every root a catalog row may name (watched trees, api_roots, file_root):
    # none may hold the agent's own state or secrets, or an archive's copies.
    bases = {name: os.path.realpath(a.remote_basedir) for name, a in archives.items()
             if not a.is_remote and a.remote_basedir}
    secrets = {f"archives.{name}.{key}": path for name, a in archives.items()
               for key, path in (("ssh_key", a.ssh_key), ("known_hosts", a.known_hosts)) if path}
    roots = [(("archives", name, "api_roots"), root) for name, a in archives.items() for root in a.api_roots]
    roots.append((("file_root",), str(file_root)))
    for here, root in roots:
        real_root = os.path.realpath(root)
        if _inside(os.path.realpath(database.parent), real_root):
            r.problem(here, f"{root!r} holds the catalog's directory: a catalog row could "
                      "have the agent ship and delete the catalog and its state")
        for other, base in bases.items():
            if _inside(base, real_root) or _inside(real_root, base):
                r.problem(here, f"{root!r} overlaps archives.{other}.remote_basedir: a "
                          "catalog row could have retention delete archived copies")
    for here, root in roots + [(("rules", i, "watch"), str(watch)) for i, watch in watched]:
        for key, secret in secrets.items():
            if _inside(os.path.realpath(secret), os.path.realpath(root)):
                r.problem(here, f"{root!r} holds {key} ({secret!r}): it could be shipped "
                          "and deleted as data")


def _destination(archive: Archive) -> tuple[tuple, PurePosixPath]:
    """Where an archive's files land: (host, directory). An absolute far path is
    the same directory whoever logs in; a relative one is below the login's home."""
    if not archive.is_remote:
        return ("local",), PurePosixPath(os.path.realpath(archive.remote_basedir))
    user, _, host = archive.ssh_host.rpartition("@")
    where = (host.lower(), archive.ssh_port or 22)
    far = posixpath.normpath(archive.remote_basedir)
    if far.startswith("/"):
        return where, PurePosixPath("/" + far.lstrip("/"))  # POSIX keeps a leading '//'
    return where + (user,), PurePosixPath(far)


def _check_shared_destinations(r: _Reader, archives: dict[str, Archive]) -> None:
    """Refuse an archive whose directory is, holds or lies in an earlier archive's
    on the same host: files of one would overwrite the other's. Hosts are compared
    as written (and ports, 22 when absent); local and ssh archives never."""
    seen: list[tuple[str, Archive, tuple, PurePosixPath]] = []
    for name, archive in archives.items():
        if not archive.remote_basedir:
            continue
        where, far = _destination(archive)
        for first, other, other_where, other_far in seen:
            if where != other_where:
                continue
            if far == other_far:
                how = "is the same directory as"
            elif far.is_relative_to(other_far):
                how = "is inside"
            elif other_far.is_relative_to(far):
                how = "contains"
            else:
                continue
            line = r.lines.get(("archives", first, "remote_basedir"))
            on = f" on {archive.ssh_host} port {where[1]}" if archive.is_remote else ""
            r.problem(("archives", name, "remote_basedir"),
                      f"{archive.remote_basedir!r}{on} {how} archives.{first}.remote_basedir "
                      f"({other.remote_basedir!r}{f', line {line}' if line else ''}): "
                      "files of one archive would overwrite the other's")
        seen.append((name, archive, where, far))


def _read_archive(r: _Reader, name: Any, data: Any) -> Archive | None:
    path = ("archives", name)
    try:
        _name(name)
    except ValueError as exc:
        r.problem(path, f"archive name: {exc}")
        return None
    if data is not None and not isinstance(data, dict):
        r.problem(path, f"expected a mapping of archive settings, got {type(data).__name__}")
        return None
    data = r.mapping(data, path, ARCHIVE_KEYS)
    remote = data.get("ssh_host") is not None
    # A refused host still marks the archive remote: no local check runs on its far path.
    ssh_host = (r.setting(data, Archive, "ssh_host", path, _ssh_host)
                or (str(data["ssh_host"]) if remote else None))
    basedir = r.get(data, "remote_basedir", path, _remote_dir if remote else _local_dir(r),
                    required=True)
    ssh_key = r.setting(data, Archive, "ssh_key", path, _ssh_file(r))
    if ssh_key is not None:
        wrong = _unreadable_file(ssh_key)
        if wrong:
            r.problem(path + ("ssh_key",), wrong)
    known_hosts = r.setting(data, Archive, "known_hosts", path, _ssh_file(r))
    accept_new = r.setting(data, Archive, "accept_new_host_keys", path, _bool)
    if known_hosts is not None:
        if accept_new:
            if not known_hosts.parent.is_dir():
                r.problem(path + ("known_hosts",), f"directory {str(known_hosts.parent)!r} "
                          "(where new host keys would be written) does not exist")
        elif not known_hosts.exists():
            r.problem(path + ("known_hosts",), f"file {str(known_hosts)!r} does not exist, so ssh "
                      "would refuse every connection (add the host's key to it, or set "
                      "accept_new_host_keys: true)")
    retention = r.setting(data, Archive, "delete_local_after", path, parse_duration)
    far_side = r.setting(data, Archive, "far_side", path, _far_side)
    if far_side == "serve" and not remote:
        r.problem(path + ("far_side",), "serve is for an archive reached over ssh (set ssh_host), "
                  "not a local directory")
    per_batch = r.setting(data, Archive, "files_per_batch", path, _positive_int)
    if far_side == "serve" and isinstance(per_batch, int) and per_batch > MAX_NAMES:
        r.problem(path + ("files_per_batch",), f"{per_batch} is more than watcher serve hashes in "
                  f"one request (far_side: serve): at most {MAX_NAMES}")
    return Archive(
        name=name,
        remote_basedir=basedir or "",
        ssh_host=ssh_host,
        ssh_key=str(ssh_key) if ssh_key else None,
        ssh_port=r.setting(data, Archive, "ssh_port", path, _port),
        known_hosts=str(known_hosts) if known_hosts else None,
        accept_new_host_keys=accept_new,
        ssh_cipher=r.setting(data, Archive, "ssh_cipher", path, _ssh_cipher),
        delete_local_after=retention,
        max_copy_attempts=r.setting(data, Archive, "max_copy_attempts", path, _positive_int),
        copy_timeout=r.setting(data, Archive, "copy_timeout", path, _timeout),
        cmd_timeout=r.setting(data, Archive, "cmd_timeout", path, _timeout),
        files_per_batch=per_batch,
        compression=r.setting(data, Archive, "compression", path, _bool),
        bwlimit=r.setting(data, Archive, "bwlimit", path, _bwlimit),
        chmod=r.setting(data, Archive, "chmod", path, _chmod),
        fsync=r.setting(data, Archive, "fsync", path, _fsync),
        api_roots=r.setting(data, Archive, "api_roots", path, _api_roots(r)),
        instance_id=r.setting(data, Archive, "instance_id", path, _name),
        far_side=far_side,
    )


def _read_rule(r: _Reader, i: int, data: Any, archives: dict[str, Archive]) -> Rule | None:
    path = ("rules", i)
    if not data or not isinstance(data, dict):
        r.problem(path, "a rule is a mapping with at least 'watch' and 'archive'")
        return None
    data = r.mapping(data, path, RULE_KEYS)
    watch = r.get(data, "watch", path, r.root, required=True)
    wrong = _not_a_directory(watch) if watch is not None and r.live else None
    if wrong:
        r.problem(path + ("watch",), wrong)
    archive = r.get(data, "archive", path, _str, required=True)
    if archive is not None and archive not in archives:
        known = ", ".join(sorted(archives)) or "none defined"
        r.problem(path + ("archive",), f"unknown archive {archive!r} (known: {known})")
    match = r.setting(data, Rule, "match", path, _regex)
    template = r.setting(data, Rule, "remote_path", path, _str)
    fields = set(TEMPLATE_FIELDS) | set(match.groupindex if match else ())
    wrong = check_template(template, fields)
    if wrong:
        r.problem(path + ("remote_path",), wrong)
    overrides = "delete_local_after" in data
    retention = None
    if overrides and data["delete_local_after"] not in (None, "never"):
        retention = r.get(data, "delete_local_after", path, parse_duration)
    return Rule(
        watch=watch or Path("."),
        archive=archive or "",
        include=r.setting(data, Rule, "include", path, _globs),
        exclude=r.setting(data, Rule, "exclude", path, _globs),
        match=match,
        remote_path=template,
        deletable=r.setting(data, Rule, "deletable", path, _bool),
        settle=r.setting(data, Rule, "settle", path, _settle),
        poll=r.setting(data, Rule, "poll", path, _bool),
        overrides_retention=overrides,
        delete_local_after=retention,
    )


def parse_config(text: str, source: str, base: Path, live: bool = True) -> Config:
    """Build a Config from YAML text; relative paths resolve against ``base``.
    A missing watched directory is never refused (the agent reports it and
    waits). With ``live`` false, nothing else on the host is looked at
    either (the commands that only read the catalog must work whatever is gone)."""
    r = _Reader(source, base, live)
    data = _compose(r, text)
    if not isinstance(data, dict):
        r.problem((), f"expected a mapping with 'archives' and 'rules', got {type(data).__name__}")
        raise ConfigError(r.problems)
    data = r.mapping(data, (), TOP_KEYS)
    archives: dict[str, Archive] = {}
    raw_archives = data.get("archives")
    if not isinstance(raw_archives, dict) or not raw_archives:
        r.problem(("archives",), "at least one archive is required")
    else:
        for name, value in raw_archives.items():
            archive = _read_archive(r, name, value)
            if archive:
                archives[name] = archive
    rules = []
    raw_rules = data.get("rules")
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        r.problem(("rules",), "expected a list of rules")
        raw_rules = []
    watched: list[tuple[int, Path]] = []  # the rules whose watch directory is real
    for i, value in enumerate(raw_rules):
        rule = _read_rule(r, i, value, archives)
        if rule:
            rules.append(rule)
            if rule.watch.is_absolute():  # not a refused watch's stand-in; missing ones count too
                watched.append((i, rule.watch))
    database = r.get(data, "database", (), r.path) or default_database(source, base, r)
    file_root = r.get(data, "file_root", (), r.path, database.parent / DEFAULT_FILE_ROOT)
    _check_overlaps(r, archives, watched, database, file_root)
    _check_shared_destinations(r, archives)
    instance_id = r.get(data, "instance_id", (), _name) or socket.gethostname()
    archives = {name: a if a.instance_id else dataclasses.replace(a, instance_id=instance_id)
                for name, a in archives.items()}
    config = Config(
        instance_id=instance_id,
        database=database,
        file_root=file_root,
        archives=archives,
        rules=tuple(rules),
        rescan_interval=r.setting(data, Config, "rescan_interval", (), _rescan),
        source=Path(source),
        catalog_group=r.setting(data, Config, "catalog_group", (), _group(r)),
        metrics=_read_metrics(r, data),
    )
    if r.problems:
        raise ConfigError(r.problems)
    return config


def load_config(path: str | os.PathLike, base: Path | None = None, live: bool = True) -> Config:
    """Read a rules file; relative paths are relative to its directory
    (``live``: see parse_config)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a UTF-8 text file"]) from None
    return parse_config(text, str(path), base or path.resolve().parent, live)


def default_state_dir(option: str | None = None) -> Path:
    """Where the shipped default keeps its inbox, archive and catalog."""
    chosen = option or os.environ.get(STATE_DIR_ENV) or "watcher-data"
    return Path(chosen).expanduser().resolve()


def load_default_config(state_dir: Path) -> Config:
    """The shipped rules.yaml, with its relative paths under ``state_dir``."""
    for sub in ("inbox", "archive"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    return load_config(DEFAULT_CONFIG, base=state_dir)
