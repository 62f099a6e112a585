"""A rules file the agent cannot honour is refused: exit status 2 and one line
``watcher: FILE:LINE: key.path: problem`` per problem, never a hang, a
traceback, exit 1 or a silent acceptance. Each kind of mistake is tried
through the real command (``watcher run`` and ``watcher status``) and, in
more variants, through ``load_config``."""

from __future__ import annotations

import textwrap
import time
import tracemalloc

import pytest

from tests.rules_files import (
    GOOD, accepted, only_problem, problems_of, refused_by_cli, run_cli, with_archive_key, write,
)


# -- 1. duplicate keys ------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "status"])
def test_a_duplicate_key_is_refused_with_both_lines(tmp_path, command):
    path = write(tmp_path, GOOD + "    deletable: false\n    settle: 3\n    deletable: true\n")
    [(line, key, message)] = refused_by_cli(command, path)
    assert (line, key) == (13, "rules[0].deletable")
    assert "duplicate key" in message and "line 11" in message


def test_an_archive_defined_twice_is_refused_at_its_second_definition(tmp_path):
    path = write(tmp_path, GOOD.replace("rules:\n", "  arch:\n    remote_basedir: other\nrules:\n"))
    line, key, message = only_problem(path)
    assert (line, key) == (7, "archives.arch") and "first at line 4" in message


def test_a_top_level_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path, GOOD + "database: other.db\n")
    line, key, message = only_problem(path)
    assert (line, key) == (11, "database") and "first at line 1" in message


def test_a_duplicate_key_in_a_flow_mapping_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("  arch:\n    remote_basedir: far\n",
                                        "  arch: {remote_basedir: far, remote_basedir: /srv}\n")
                 .replace("    delete_local_after: 7d\n", ""))
    line, key, message = only_problem(path)
    assert (line, key) == (4, "archives.arch.remote_basedir") and "duplicate key" in message


def test_every_duplicate_is_reported_along_with_the_other_problems(tmp_path):
    path = write(tmp_path, GOOD + "    settle: 1\n    settle: 2\n    colour: red\n"
                 "instance_id: again\n")
    assert [(line, key) for line, key, _ in problems_of(path)] == [
        (12, "rules[0].settle"), (14, "instance_id"), (13, "rules[0].colour")]


# -- 2. aliases ----------------------------------------------------------------


BILLION_LAUGHS = "".join(
    ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n']
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)])


def test_a_billion_laughs_file_is_refused_at_once_by_the_real_command(tmp_path):
    path = write(tmp_path, BILLION_LAUGHS + GOOD)
    started = time.monotonic()
    problems = refused_by_cli("run", path, timeout=20)
    assert time.monotonic() - started < 10
    aliases = [(line, key) for line, key, message in problems if "alias *l" in message]
    assert len(aliases) == 9 * 9 and (2, "l1[0]") in aliases and (10, "l9[8]") in aliases


def test_a_billion_laughs_file_costs_well_under_a_second_and_little_memory(tmp_path):
    path = write(tmp_path, BILLION_LAUGHS + GOOD)
    tracemalloc.start()
    started = time.monotonic()
    try:
        problems = problems_of(path)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0
    assert peak < 20 * 2**20, peak  # expanded, it would be ten gigabytes
    assert sum("aliases are refused" in message for _, _, message in problems) == 81


def test_an_alias_for_a_value_is_one_problem_not_also_a_missing_key(tmp_path):
    path = write(tmp_path, "base: &base far\n" + GOOD.replace("remote_basedir: far",
                                                             "remote_basedir: *base"))
    assert [(line, key) for line, key, _ in problems_of(path)] == [
        (6, "archives.arch.remote_basedir"), (1, "base")]


def test_an_alias_in_a_list_is_refused(tmp_path):
    path = write(tmp_path, "junk: &junk '*.tmp'\n".join(["", GOOD])
                 .replace("    archive: arch\n", "    archive: arch\n    exclude: ['.*', *junk]\n"))
    problems = problems_of(path)
    assert (11, "rules[0].exclude[1]") in [(line, key) for line, key, _ in problems]


def test_a_merge_of_an_anchored_mapping_is_refused(tmp_path):
    path = write(tmp_path, """\
        archives:
          base: &defaults
            remote_basedir: far
          arch:
            <<: *defaults
            remote_basedir: far2
        rules:
          - watch: inbox
            archive: arch
        """)
    line, key, message = only_problem(path)
    assert (line, key) == (5, "archives.arch") and "merge keys (<<) are refused" in message


def test_an_alias_used_as_a_key_and_an_undefined_alias_are_refused(tmp_path):
    path = write(tmp_path, GOOD + "    *nowhere: 1\ninstance_id2: *missing\n")
    problems = [(line, key) for line, key, message in problems_of(path) if "alias" in message]
    assert problems == [(11, "rules[0]"), (12, "instance_id2")]


# -- 3. a list or mapping as a key ------------------------------------------------


def test_a_list_used_as_a_key_is_refused_by_the_real_command(tmp_path):
    path = write(tmp_path, "[a, b]: 1\n" + GOOD)
    [(line, key, message)] = refused_by_cli("run", path)
    assert (line, key) == (1, "(top level)") and "not a list" in message


def test_a_mapping_used_as_a_key_in_an_archive_is_refused(tmp_path):
    path = write(tmp_path, with_archive_key("{x: 1}: 2"))
    line, key, message = only_problem(path)
    assert (line, key) == (6, "archives.arch") and "not a mapping" in message


def test_a_complex_key_in_a_rule_is_refused(tmp_path):
    path = write(tmp_path, GOOD + "    ? [deletable]\n    : false\n")
    line, key, message = only_problem(path)
    assert (line, key) == (11, "rules[0]") and "a key must be a single value" in message


def test_values_no_constructor_knows_are_refused_not_a_traceback(tmp_path):
    path = write(tmp_path, GOOD + "    settle: !!python/object:os.system 2\n"
                 "    deletable: 2024-13-45\n    !custom key: 1\n")
    result = refused_by_cli("status", path)
    assert [(line, key) for line, key, _ in result] == [
        (11, "rules[0].settle"), (12, "rules[0].deletable"), (13, "rules[0]")]


def test_a_file_nested_absurdly_deep_is_refused_without_exhausting_the_stack(tmp_path):
    path = write(tmp_path, GOOD + "x: " + "[" * 50_000 + "]" * 50_000 + "\n")
    result = run_cli("run", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"watcher: {path}:11: not valid YAML: nested deeper than")


# -- 4. remote_basedir ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "status"])
def test_an_empty_local_remote_basedir_is_refused_by_the_real_command(tmp_path, command):
    path = write(tmp_path, GOOD.replace("remote_basedir: far", "remote_basedir: ''"))
    assert refused_by_cli(command, path) == [(5, "archives.arch.remote_basedir",
                                              "expected a path, got ''")]


@pytest.mark.parametrize("basedir", ["''", "/", "//", "///", "/./", "/srv/..", "/srv/../.."])
def test_an_ssh_remote_basedir_that_is_empty_or_the_far_root_is_refused(tmp_path, basedir):
    path = write(tmp_path, GOOD.replace("remote_basedir: far",
                                        f"remote_basedir: {basedir}\n    ssh_host: archive"))
    line, key, message = only_problem(path)
    assert (line, key) == (5, "archives.arch.remote_basedir")
    assert "root directory" in message or "expected a directory" in message


def test_an_ssh_remote_basedir_of_the_far_root_is_refused_by_the_real_command(tmp_path):
    path = write(tmp_path, GOOD.replace("remote_basedir: far", "remote_basedir: /\n    ssh_host: archive"))
    [(line, key, message)] = refused_by_cli("run", path)
    assert (line, key) == (5, "archives.arch.remote_basedir") and "root directory" in message


@pytest.mark.parametrize("basedir", ["~/far", "'~'", "'~cryo/far'"])
def test_an_ssh_remote_basedir_starting_with_a_tilde_is_refused_as_rsync_would_not_expand_it(
        tmp_path, basedir):
    path = write(tmp_path, GOOD.replace("remote_basedir: far",
                                        f"remote_basedir: {basedir}\n    ssh_host: archive"))
    line, key, message = only_problem(path)
    assert (line, key) == (5, "archives.arch.remote_basedir") and "home" in message


@pytest.mark.parametrize("basedir", ["data/far", ".", "far/"])
def test_a_relative_ssh_remote_basedir_is_accepted_as_relative_to_the_login_home(tmp_path, basedir):
    path = write(tmp_path, GOOD.replace("remote_basedir: far",
                                        f"remote_basedir: {basedir}\n    ssh_host: archive"))
    assert accepted(path).archives["arch"].remote_basedir == basedir


@pytest.mark.parametrize("basedir", ['"far\\0x"', "[]", "7"])
def test_a_remote_basedir_that_is_no_path_is_refused(tmp_path, basedir):
    path = write(tmp_path, GOOD.replace("remote_basedir: far", f"remote_basedir: {basedir}"))
    assert only_problem(path)[:2] == (5, "archives.arch.remote_basedir")


# -- 5. NaN and infinity ------------------------------------------------------------


def test_nan_and_infinity_where_the_agent_waits_or_deletes_are_refused_by_the_real_command(tmp_path):
    path = write(tmp_path, with_archive_key("delete_local_after: .nan\n    copy_timeout: .inf")
                 + "    settle: .nan\nrescan_interval: .NaN\n")
    assert sorted((line, key) for line, key, _ in refused_by_cli("run", path)) == [
        (6, "archives.arch.delete_local_after"), (7, "archives.arch.copy_timeout"),
        (12, "rules[0].settle"), (13, "rescan_interval")]


@pytest.mark.parametrize("key", ["delete_local_after", "copy_timeout", "cmd_timeout",
                                 "max_copy_attempts", "files_per_batch", "ssh_port", "bwlimit"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", "+.Inf"])
def test_nan_or_infinity_for_any_number_of_an_archive_is_refused(tmp_path, key, value):
    path = write(tmp_path, with_archive_key(f"{key}: {value}"))
    assert only_problem(path)[:2] == (6, f"archives.arch.{key}")


@pytest.mark.parametrize("key", ["settle", "delete_local_after"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_or_infinity_for_a_number_of_a_rule_is_refused(tmp_path, key, value):
    path = write(tmp_path, GOOD + f"    {key}: {value}\n")
    assert only_problem(path)[:2] == (11, f"rules[0].{key}")


@pytest.mark.parametrize("value", ["'nan'", "'inf'", "'NaN'", "'-inf'", "'infinity'", "'1e400'",
                                   "1.0e+400", "'" + "9" * 400 + "'", "'" + "9" * 400 + "d'",
                                   "1" + "0" * 400])
def test_durations_spelled_as_nan_infinity_or_past_any_float_are_refused(tmp_path, value):
    path = write(tmp_path, GOOD + f"rescan_interval: {value}\n")
    assert only_problem(path)[:2] == (11, "rescan_interval")


# -- 6. absurd values ----------------------------------------------------------------


def test_a_rescan_interval_that_would_spin_a_core_is_refused_by_the_real_command(tmp_path):
    path = write(tmp_path, GOOD + "rescan_interval: 0.001\n")
    [(line, key, message)] = refused_by_cli("run", path)
    assert (line, key) == (11, "rescan_interval") and "at least 1 s" in message


@pytest.mark.parametrize("value", ["0", "0.5", "'0.999'", "'0.9s'"])
def test_a_rescan_interval_under_a_second_is_refused(tmp_path, value):
    path = write(tmp_path, GOOD + f"rescan_interval: {value}\n")
    assert only_problem(path)[:2] == (11, "rescan_interval")


@pytest.mark.parametrize("value, seconds", [("1", 1.0), ("5m", 300.0), ("'36500d'", 36500 * 86400.0)])
def test_a_rescan_interval_of_a_second_or_more_is_accepted(tmp_path, value, seconds):
    assert accepted(write(tmp_path, GOOD + f"rescan_interval: {value}\n")).rescan_interval == seconds


@pytest.mark.parametrize("key_and_value", [
    "copy_timeout: 0.5", "cmd_timeout: 0.001", "copy_timeout: 2d", "cmd_timeout: 86401",
    "delete_local_after: 36501d", "files_per_batch: 1000001", "max_copy_attempts: 100000000000000000000",
    "bwlimit: '0.0001'", "bwlimit: 511b", "bwlimit: 99999999999t", "bwlimit: 2p",
    "fsync: off", "fsync: false", "fsync: none", "fsync: 0",  # durability is never turned off
    "ssh_cipher: 3des-cbc", "ssh_cipher: '-oProxyCommand=x'", "ssh_cipher: 'aes128-ctr,'", "ssh_cipher: 1",
])
def test_absurd_numbers_of_an_archive_are_refused(tmp_path, key_and_value):
    path = write(tmp_path, with_archive_key(key_and_value))
    assert only_problem(path)[:2] == (6, f"archives.arch.{key_and_value.split(':')[0]}")


@pytest.mark.parametrize("key_and_value, attribute, expected", [
    ("copy_timeout: 1", "copy_timeout", 1.0), ("cmd_timeout: 1d", "cmd_timeout", 86400.0),
    ("files_per_batch: 1000000", "files_per_batch", 1_000_000),
    ("bwlimit: 0", "bwlimit", "0"), ("bwlimit: 512b", "bwlimit", "512b"),
    ("bwlimit: '0.5'", "bwlimit", "0.5"), ("bwlimit: 1p", "bwlimit", "1p"),
    ("delete_local_after: 0", "delete_local_after", 0.0),
    ("ssh_cipher: aes128-gcm@openssh.com", "ssh_cipher", "aes128-gcm@openssh.com"),
    ("ssh_cipher: 'aes128-gcm@openssh.com,chacha20-poly1305@openssh.com'", "ssh_cipher",
     "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"),
    ("fsync: batch", "fsync", "batch"), ("fsync: file", "fsync", "file"), ("fsync: null", "fsync", "batch"),
])
def test_the_limits_of_an_archives_numbers_are_accepted(tmp_path, key_and_value, attribute, expected):
    archive = accepted(write(tmp_path, with_archive_key(key_and_value))).archives["arch"]
    assert getattr(archive, attribute) == expected


@pytest.mark.parametrize("command", ["run", "status"])
def test_an_instance_id_that_climbs_out_of_file_root_is_refused_by_the_real_command(tmp_path, command):
    path = write(tmp_path, GOOD.replace("instance_id: test-instance", "instance_id: ../../etc"))
    [(line, key, message)] = refused_by_cli(command, path)
    assert (line, key) == (2, "instance_id") and "'/'" in message


@pytest.mark.parametrize("value", ["a/b", "/abs", ".", "..", '"a\\0b"', "''", "x" * 201, "[a]"])
def test_an_instance_id_that_cannot_name_a_directory_is_refused(tmp_path, value):
    path = write(tmp_path, GOOD.replace("instance_id: test-instance", f"instance_id: {value}"))
    assert only_problem(path)[:2] == (2, "instance_id")


@pytest.mark.parametrize("value", ["x" * 200, "smurf-sync-srv20", "...", "a b"])
def test_an_instance_id_of_up_to_200_characters_is_accepted(tmp_path, value):
    path = write(tmp_path, GOOD.replace("instance_id: test-instance", f"instance_id: '{value}'"))
    assert accepted(path).instance_id == value


@pytest.mark.parametrize("name, keypath", [
    ("'a/b'", "archives.a/b"), ("'..'", "archives..."), ("'.'", "archives.."),
    ("'" + "n" * 201 + "'", "archives." + "n" * 201), ('"a\\0b"', "archives.a\0b"),
])
def test_an_archive_name_that_cannot_name_a_finalization_file_is_refused(tmp_path, name, keypath):
    path = write(tmp_path, GOOD.replace("  arch:\n", f"  {name}:\n").replace("archive: arch", "archive: x"))
    problems = [(line, key) for line, key, _ in problems_of(path)]
    assert problems == [(4, keypath), (9, "rules[0].archive")]


def test_an_archive_name_that_cannot_name_a_finalization_file_is_refused_by_the_real_command(tmp_path):
    path = write(tmp_path, GOOD.replace("  arch:\n", "  ../arch:\n").replace("archive: arch", "archive: ../arch"))
    [(line, key, message), (_, rule_key, _)] = refused_by_cli("run", path)
    assert (line, key) == (4, "archives.../arch") and "finalization" in message
    assert rule_key == "rules[0].archive"  # the archive refused is unknown to its rule


@pytest.mark.parametrize("template", ["{name:>300}", "{name!r}", "{relpath!s:.3}", "{name:{relpath}}",
                                      "{timecode}/{name:x<9}"])
def test_a_remote_path_field_with_a_format_spec_or_conversion_is_refused(tmp_path, template):
    path = write(tmp_path, GOOD.replace("{timecode}/{relpath}", template))
    line, key, message = only_problem(path)
    assert (line, key) == (10, "rules[0].remote_path")
    assert message.endswith("fields take no format spec or conversion")


def test_a_remote_path_width_is_refused_by_the_real_command(tmp_path):
    path = write(tmp_path, GOOD.replace("{timecode}/{relpath}", "{name:>300}"))
    assert refused_by_cli("run", path) == [
        (10, "rules[0].remote_path", "{name:>300}: fields take no format spec or conversion")]


def test_a_remote_path_with_a_nul_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace('"{timecode}/{relpath}"', '"{timecode}\\0{relpath}"'))
    assert only_problem(path)[:2] == (10, "rules[0].remote_path")


# -- 7. two archives, one destination -------------------------------------------------


def two_archives(first: str, second: str) -> str:
    """A file with archives `one` (lines 3-4) and `two` (lines 5-6...), settings indented."""
    return f"""\
archives:
  one:
{textwrap.indent(first, "    ")}
  two:
{textwrap.indent(second, "    ")}
rules:
  - watch: inbox
    archive: one
"""


@pytest.mark.parametrize("command", ["run", "status"])
def test_two_local_archives_in_one_directory_are_refused_by_the_real_command(tmp_path, command):
    path = write(tmp_path, two_archives("remote_basedir: far", "remote_basedir: ./far/"))
    [(line, key, message)] = refused_by_cli(command, path)
    assert (line, key) == (5, "archives.two.remote_basedir")
    assert "is the same directory as archives.one.remote_basedir" in message and "line 3" in message


@pytest.mark.parametrize("second, how", [
    ("remote_basedir: far/sub", "is inside"),
    ("remote_basedir: .", "contains"),
    ("remote_basedir: link", "is the same directory as"),
    ("remote_basedir: link/deeper", "is inside"),
])
def test_two_local_archives_whose_real_directories_nest_are_refused(tmp_path, second, how):
    (tmp_path / "far").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "far")
    path = write(tmp_path, two_archives("remote_basedir: far", second))
    problems = [(line, key, message) for line, key, message in problems_of(path)
                if "archives.one" in message]
    [(line, _, message)] = problems
    assert line == 5 and f"{how} archives.one.remote_basedir ('{tmp_path / 'far'}', line 3)" in message


@pytest.mark.parametrize("first, second, how", [
    ("ssh_host: archive\nremote_basedir: /data", "ssh_host: archive\nremote_basedir: /data/",
     "is the same directory as"),
    ("ssh_host: archive\nremote_basedir: /data", "ssh_host: archive\nssh_port: 22\nremote_basedir: //data/./x",
     "is inside"),
    ("ssh_host: cryo@archive\nremote_basedir: /data/x", "ssh_host: cryo@Archive\nremote_basedir: /data",
     "contains"),
    ("ssh_host: alice@archive\nremote_basedir: /data", "ssh_host: bob@archive\nremote_basedir: /data",
     "is the same directory as"),
    ("ssh_host: archive\nssh_port: 2222\nremote_basedir: far", "ssh_host: archive\nssh_port: 2222\nremote_basedir: ./far/y",
     "is inside"),
])
def test_two_ssh_archives_with_the_same_or_nested_directory_on_one_host_are_refused(
        tmp_path, first, second, how):
    path = write(tmp_path, two_archives(first, second))
    line, key, message = only_problem(path)
    lines = path.read_text().splitlines()
    second_line = lines.index("  two:") + 1 + [s.strip().startswith("remote_basedir")
                                               for s in lines[lines.index("  two:"):]].index(True)
    assert (line, key) == (second_line, "archives.two.remote_basedir")
    assert f"{how} archives.one.remote_basedir" in message and "overwrite" in message


def test_two_ssh_archives_sharing_a_directory_are_refused_by_the_real_command(tmp_path):
    path = write(tmp_path, two_archives("ssh_host: cryo@archive\nremote_basedir: /data/smurf",
                                        "ssh_host: cryo@archive\nssh_port: 22\nremote_basedir: /data/smurf"))
    [(line, key, message)] = refused_by_cli("run", path)
    assert (line, key) == (8, "archives.two.remote_basedir")
    assert "archives.one.remote_basedir ('/data/smurf', line 4)" in message


@pytest.mark.parametrize("first, second", [
    ("ssh_host: archive\nremote_basedir: /data", "ssh_host: other\nremote_basedir: /data"),
    ("ssh_host: archive\nremote_basedir: /data", "ssh_host: archive\nssh_port: 2222\nremote_basedir: /data"),
    ("ssh_host: archive\nremote_basedir: /data/a", "ssh_host: archive\nremote_basedir: /data/ab"),
    ("ssh_host: alice@archive\nremote_basedir: far", "ssh_host: bob@archive\nremote_basedir: far"),
    ("remote_basedir: far", "remote_basedir: far2"),
])
def test_archives_on_different_hosts_ports_logins_or_sibling_directories_are_accepted(
        tmp_path, first, second):
    assert set(accepted(write(tmp_path, two_archives(first, second))).archives) == {"one", "two"}


def test_a_local_and_an_ssh_archive_are_never_compared(tmp_path):
    path = write(tmp_path, two_archives("remote_basedir: far",
                                        f"ssh_host: localhost\nremote_basedir: {tmp_path / 'far'}"))
    assert set(accepted(path).archives) == {"one", "two"}


def test_a_third_archive_sharing_both_earlier_directories_is_refused_once_for_each(tmp_path):
    path = write(tmp_path, two_archives("remote_basedir: far/a", "remote_basedir: far/b")
                 .replace("rules:", "  three:\n    remote_basedir: far\nrules:"))
    problems = problems_of(path)
    assert [(line, key) for line, key, _ in problems] == [
        (7, "archives.three.remote_basedir"), (7, "archives.three.remote_basedir")]
    assert "archives.one" in problems[0][2] and "archives.two" in problems[1][2]
