r"""File names that break code which builds shell commands or parses text.

watcher passes file names to rsync and ssh, i.e. through up to two shells
(local, remote) and through programs that parse options.  Every name here
must be shipped as an ordinary file, byte for byte, and must never be
executed.  Families and why they are here:

* whitespace (space, leading/trailing space, tab, newline, CR): word
  splitting in unquoted shell expansions; line-based parsing of
  `find`/`rsync --files-from`/md5sum output; `.strip()` bugs.
* quotes and backslash: naive quoting like f"'{name}'" or escaping bugs.
* command execution (`$(...)`, backticks, `;`, `|`, `&`, `&&`, `>`, `<`):
  a name that reaches a shell unquoted *runs*.  Each such name runs a
  command that creates a file named CANARY.<family> in `canary_dir`; a
  test asserts `not canary_fired(canary_dir)`.  File names cannot contain
  "/", so the absolute canary path is spelled with printf octal escapes
  (\057 is "/"): `touch "$(printf '\057tmp\057...')"`.  No environment
  variable is involved, so it fires the same in any shell on either side.
* leading dash (`-rf`, `--help`, `-e sh`, `--rsync-path=...`): option
  injection into rsync/ssh/md5sum when `--` is missing.
* globs and shell specials (`*`, `?`, `[a]`, `~`, `#`, `%`, `!`, `{a,b}`):
  expansion or comment/history/printf-format handling.
* unicode (NFC vs NFD, emoji, RTL) and non-UTF-8 bytes: str/bytes decoding
  errors; names must be handled as bytes end to end.
* a 255-byte name (ext4's NAME_MAX): truncation or buffer assumptions;
  also one 255 bytes long made of 2-byte UTF-8 characters.
* `...`, `..foo`, `.hidden`, `foo..`: path-normalisation bugs that treat
  them as `..` or skip dot files.  `.` and `..` themselves are not names.
* other control characters (ESC, BEL, DEL, \x01): terminal/log injection.

`HOSTILE_NAMES` uses a fixed canary dir (DEFAULT_CANARY_DIR); tests that
check the canary should call `hostile_names(canary_dir)` with a per-test
dir the ssh user can write (the `canary_dir` fixture in tests.sshd).
"""
from __future__ import annotations

import os

CANARY_PREFIX = "CANARY"
DEFAULT_CANARY_DIR = "/tmp/watcher-hostile-canary"


def _canary_path_expr(canary_dir: str, family: str) -> str:
    """Shell word expanding to canary_dir/CANARY.family, spelled without '/'."""
    path = os.path.join(canary_dir, f"{CANARY_PREFIX}.{family}")
    spelled = "".join("\\%03o" % ord(c) if c in "/'\\%" else c for c in path)
    return f"\"$(printf '{spelled}')\""


def _touch(canary_dir: str, family: str) -> str:
    return "touch " + _canary_path_expr(canary_dir, family)


def hostile_names(canary_dir: str = DEFAULT_CANARY_DIR) -> list[bytes]:
    """All hostile names; the executable ones point at `canary_dir`."""
    if not os.path.isabs(canary_dir):
        raise ValueError("canary_dir must be absolute")
    t = lambda family: _touch(canary_dir, family)  # noqa: E731
    names = [
        # whitespace
        "with space", " leading space", "trailing space ", "two  spaces",
        "new\nline", "\nleading newline", "tab\tbed", "carriage\rreturn",
        # quotes / backslash
        "single'quote", 'double"quote', "back\\slash", "trailing backslash\\",
        "'", '"', "it's \"mixed\"",
        # command execution -> canary
        f"$({t('dollar')})",
        f"`{t('backtick')}`",
        f"x;{t('semicolon')}",
        f"x|{t('pipe')}",
        f"x&{t('ampersand')}",
        f"x&&{t('andand')}",
        f"x\n{t('newline_cmd')}",
        "x>" + _canary_path_expr(canary_dir, "redirect"),
        "<x", "x<y",
        # option injection
        "-rf", "--help", "-e sh", "-", "--",
        f"--rsync-path={t('rsync_path')}",
        f"-e{t('dash_e')}",
        # globs and specials
        "*", "?", "a*b?c", "[ab]", "~", "~root", "#hash", "a#b", "%s%n%x",
        "100%", "!bang", "{a,b}", "$HOME", "${IFS}",
        # unicode and non-UTF-8
        "caf\u00e9", "cafe\u0301", "\U0001f4a5 emoji", "\u202eRTL override",
        "\u00a0nbsp", "\u3042\u3044\u3046",
        # dot lookalikes
        "...", "..foo", "foo..", ".hidden", ". ", ".. ",
        # control characters (no NUL, it cannot be in a name)
        "esc\x1b[31mred", "bell\x07", "del\x7f", "\x01start",
    ]
    result = [n.encode("utf-8") for n in names]
    result += [
        b"\xff\xfe bad utf8",
        b"latin1 caf\xe9",
        b"\xc3\x28 invalid continuation",
        b"n" * 255,
        "\u00e9".encode() * 127 + b"x",  # 255 bytes, 128 characters
    ]
    for n in result:
        assert b"/" not in n and b"\0" not in n and n not in (b".", b".."), n
        assert 0 < len(n) <= 255, (len(n), n)
    assert len(set(result)) == len(result), "duplicate hostile name"
    return result


def canary_fired(canary_dir: str = DEFAULT_CANARY_DIR) -> bool:
    """True if any hostile name was executed (left a CANARY.* file)."""
    return bool(fired_canaries(canary_dir))


def fired_canaries(canary_dir: str = DEFAULT_CANARY_DIR) -> list[str]:
    """Which families fired, for a useful assertion message."""
    try:
        return sorted(n for n in os.listdir(canary_dir)
                      if n.startswith(CANARY_PREFIX))
    except FileNotFoundError:
        return []


HOSTILE_NAMES: list[bytes] = hostile_names()
