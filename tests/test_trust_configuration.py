"""Settings that would hand someone more than the security model allows are
refused at configuration (exit 2, one line naming the key): a far host that
rsync would read as a local path or its daemon, ssh paths whose spaces,
quotes or '%' ssh would reinterpret, setuid/setgid/sticky modes for shipped
files, API roots that would let a catalog row reach the catalog or an
archive, and a catalog group that does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rules_files import (
    GOOD, accepted, only_problem, problems_of, refused_by_cli, with_archive_key, write,
)


def ssh_archive(tmp_path: Path, host: str, extra: str = "") -> Path:
    text = GOOD.replace("    remote_basedir: far\n",
                        f"    remote_basedir: far\n    ssh_host: {host}\n{extra}")
    return write(tmp_path, text)


@pytest.mark.parametrize("host", [
    "'user@host/x'", "'host/x'", "'./far'", "'user@host:'", "'host:873'", "'user@-oProxyCommand=x'",
    "'-host'", "'user@'", "'-user@host'", "'user@ho st'", "'evil/tree@host'", "'other:user@host'", '"user@host\\t"', '"me@host\\x7f"',
])
def test_a_far_host_that_rsync_or_ssh_would_misread_is_refused(tmp_path, host):
    line, key, message = only_problem(ssh_archive(tmp_path, host))
    assert key == "archives.arch.ssh_host", message
    assert line == 6


def test_a_far_host_with_a_slash_is_refused_by_the_real_command(tmp_path):
    (problem,) = refused_by_cli("run", ssh_archive(tmp_path, "'me@archive/tmp'"))
    assert problem[1] == "archives.arch.ssh_host" and "'/'" in problem[2]
    assert not (tmp_path / "me@archive").exists()


@pytest.mark.parametrize("host", ["archive", "me@archive", "me@archive.example.org", "me@10.0.0.1",
                                  "a-b_c@host-1"])
def test_ordinary_far_hosts_are_accepted(tmp_path, host):
    config = accepted(ssh_archive(tmp_path, host))
    assert config.archives["arch"].ssh_host == host


@pytest.mark.parametrize("key", ["ssh_key", "known_hosts"])
@pytest.mark.parametrize("name", ['with"quote', "with\\nnewline", "with\\ttab", "with\\x7fdel",
                                  "with\\\\backslash", "with${HOME}var"])
def test_an_ssh_path_that_cannot_be_quoted_for_ssh_is_refused(tmp_path, key, name):
    (tmp_path / "keys").mkdir()
    quoted = '"' + str(tmp_path / "keys" / name).replace('"', '\\"') + '"'
    _line, where, message = only_problem(ssh_archive(tmp_path, "me@archive",
                                                     f"    {key}: {quoted}\n"))
    assert where == f"archives.arch.{key}" and "a path for ssh must not contain" in message


@pytest.mark.parametrize("name", ["with space", "with%percent", "with%h%%token"])
def test_ssh_paths_with_spaces_and_percent_signs_are_accepted(tmp_path, name):
    """ssh.py quotes and escapes them (tests/test_trust_ssh_settings.py)."""
    key = tmp_path / name
    key.write_text("key")
    config = accepted(ssh_archive(tmp_path, "me@archive", f"    ssh_key: '{key}'\n"
                                                          f"    known_hosts: '{key}'\n"))
    assert config.archives["arch"].ssh_key == str(key)
    assert config.archives["arch"].known_hosts == str(key)


@pytest.mark.parametrize("chmod", ["u+s", "g+s", "+t", "Fu+s", "Dg+s", "o+t", "4755", "F2644",
                                   "D1777", "g+rwX,u+s"])
def test_a_chmod_with_setuid_setgid_or_sticky_is_refused(tmp_path, chmod):
    _line, key, message = only_problem(write(tmp_path, with_archive_key(f"chmod: '{chmod}'")))
    assert key == "archives.arch.chmod" and "setuid, setgid or sticky" in message


@pytest.mark.parametrize("chmod", ["g+rwX,o+rX", "F644", "D755,F644", "0644", "u=rw,go=r", "a+X"])
def test_an_ordinary_chmod_is_accepted(tmp_path, chmod):
    assert accepted(write(tmp_path, with_archive_key(f"chmod: '{chmod}'"))).archives["arch"].chmod == chmod


def test_api_roots_are_absolute_normalised_directories(tmp_path):
    (tmp_path / "so" / "timestreams").mkdir(parents=True)
    config = accepted(write(tmp_path, with_archive_key("api_roots: [so/timestreams/, so/./timestreams]")))
    root = str(tmp_path / "so" / "timestreams")
    assert config.archives["arch"].api_roots == (root, root)
    single = accepted(write(tmp_path, with_archive_key(f"api_roots: {root}")))
    assert single.archives["arch"].api_roots == (root,)


@pytest.mark.parametrize("value, words", [
    ("[/]", "'/' would let any catalog row"),
    ("[missing]", "does not exist"),
    ("[]", "expected a list of local directories"),
    ("{a: b}", "expected a list of local directories"),
    ("['.']", "holds the catalog's directory"),
])
def test_api_roots_that_reach_too_far_or_nowhere_are_refused(tmp_path, value, words):
    problems = problems_of(write(tmp_path, with_archive_key(f"api_roots: {value}")))
    assert any(key == "archives.arch.api_roots" and words in message
               for _line, key, message in problems), problems


@pytest.mark.parametrize("root", ["far", "far/sub", "."])
def test_api_roots_overlapping_a_local_archive_are_refused(tmp_path, root):
    (tmp_path / "far" / "sub").mkdir(parents=True)
    text = with_archive_key(f"api_roots: ['{root}']").replace("database: catalog.db",
                                                             "database: state/catalog.db")
    (tmp_path / "state").mkdir()
    problems = problems_of(write(tmp_path, text))
    assert any(k == "archives.arch.api_roots" and "archives.arch.remote_basedir" in m
               for _l, k, m in problems), problems


def test_an_unknown_catalog_group_is_refused_by_the_real_command(tmp_path):
    text = "catalog_group: no-such-group-here\n" + GOOD
    (problem,) = refused_by_cli("run", write(tmp_path, text))
    assert problem[:2] == (1, "catalog_group") and "no group 'no-such-group-here'" in problem[2]


def test_an_existing_catalog_group_is_accepted(tmp_path):
    import grp
    import os
    name = grp.getgrgid(os.getgid()).gr_name
    assert accepted(write(tmp_path, f"catalog_group: {name}\n" + GOOD)).catalog_group == name


def test_a_watch_directory_is_normalised_as_the_roots_policy_compares_paths_lexically(tmp_path):
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    text = GOOD.replace("  - watch: inbox\n", "  - watch: ./data/../data//inbox/.\n")
    assert accepted(write(tmp_path, text)).rules[0].watch == tmp_path / "data" / "inbox"


@pytest.mark.parametrize("file_root, words", [
    (".", "holds the catalog's directory"),
    ("far", "overlaps archives.arch.remote_basedir"),
    ("far/finalization", "overlaps archives.arch.remote_basedir"),
])
def test_a_file_root_that_holds_the_state_or_an_archive_is_refused(tmp_path, file_root, words):
    """file_root is a root of every archive: rows below it are acted on."""
    (tmp_path / "far" / "finalization").mkdir(parents=True)
    text = f"file_root: {file_root}\n" + GOOD.replace("database: catalog.db", "database: state/catalog.db")
    (tmp_path / "state").mkdir()
    problems = problems_of(write(tmp_path, text))
    assert any(key == "file_root" and words in message for _l, key, message in problems), problems


@pytest.mark.parametrize("key", ["ssh_key", "known_hosts"])
@pytest.mark.parametrize("where", ["inbox", "produced"], ids=["a watched tree", "api_roots"])
def test_a_root_that_holds_an_ssh_key_or_known_hosts_is_refused(tmp_path, key, where):
    (tmp_path / "produced").mkdir()
    secret = tmp_path / where / "secret"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("x")
    text = (GOOD.replace("    remote_basedir: far\n",
                         f"    remote_basedir: far\n    ssh_host: me@archive\n    {key}: '{secret}'\n"
                         f"    api_roots: [produced]\n"))
    problems = problems_of(write(tmp_path, text))
    assert any(f"holds archives.arch.{key}" in message for _l, _k, message in problems), problems
