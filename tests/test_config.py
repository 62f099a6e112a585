"""Configuration: every mistake is one line naming the file, the line and the
key, `watcher run` exits 2 without a traceback, and good files mean what the
design says (durations, relative paths, per-rule retention)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rules_files import write
from watcher.config import (
    ARCHIVE_KEYS, DEFAULT_DATABASE, DEFAULT_FILE_ROOT, RULE_KEYS, TOP_KEYS, Archive, Config, ConfigError, Rule,
    defaults, load_config, parse_config, parse_duration,
)

GOOD = """\
database: catalog.db
archives:
  arch:
    remote_basedir: far
    delete_local_after: 7d
rules:
  - watch: inbox
    archive: arch
    remote_path: "{timecode}/{relpath}"
"""


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def only_problem(path: Path) -> str:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SUPRSYNC_DB", "WATCHER_STATE_DIR")}
    return subprocess.run([sys.executable, "-m", "watcher.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30)


def assert_one_line_exit_2(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


# -- the real command: one line on stderr, exit status 2 -------------------------


def test_run_with_an_unknown_top_level_key_says_which_key_on_which_line_and_exits_2(tmp_path):
    path = write(tmp_path, GOOD + "colour: blue\n")
    line = assert_one_line_exit_2(run_cli("run", "--config", str(path), cwd=tmp_path))
    assert f"{path}:10:" in line
    assert "colour" in line and "unknown key" in line


def test_run_with_an_unknown_archive_key_names_the_archive_and_the_line(tmp_path):
    path = write(tmp_path, GOOD.replace("    delete_local_after: 7d\n",
                                        "    delete_local_after: 7d\n    compress: true\n"))
    line = assert_one_line_exit_2(run_cli("run", "--config", str(path), cwd=tmp_path))
    assert f"{path}:6: archives.arch.compress: unknown key" in line


def test_run_with_an_unknown_rule_key_names_the_rule_and_the_line(tmp_path):
    path = write(tmp_path, GOOD + "    setle: 3\n")
    line = assert_one_line_exit_2(run_cli("run", "--config", str(path), cwd=tmp_path))
    assert f"{path}:10: rules[0].setle: unknown key" in line


def test_run_with_a_rule_naming_an_unknown_archive_lists_the_known_ones(tmp_path):
    path = write(tmp_path, GOOD.replace("archive: arch", "archive: arhc"))
    line = assert_one_line_exit_2(run_cli("run", "--config", str(path), cwd=tmp_path))
    assert f"{path}:8: rules[0].archive: unknown archive 'arhc' (known: arch)" in line


def test_run_with_a_bad_duration_shows_the_value_and_the_accepted_forms(tmp_path):
    path = write(tmp_path, GOOD.replace("delete_local_after: 7d", "delete_local_after: 3 days"))
    line = assert_one_line_exit_2(run_cli("run", "--config", str(path), cwd=tmp_path))
    assert f"{path}:5: archives.arch.delete_local_after:" in line
    assert "'3 days'" in line and "7d" in line


def test_a_missing_watch_directory_is_no_configuration_error(tmp_path):
    """An unmounted disk: the running agent reports the rule degraded (tests/test_safety_degradation.py)."""
    path = write(tmp_path, GOOD.replace("watch: inbox", "watch: nowhere"))
    assert load_config(path).rules[0].watch == tmp_path / "nowhere"


def test_run_with_a_watch_that_is_a_file_names_it(tmp_path):
    path = write(tmp_path, GOOD.replace("watch: inbox", "watch: afile"))
    (tmp_path / "afile").write_text("")
    line = assert_one_line_exit_2(run_cli("run", "--config", str(path), cwd=tmp_path))
    assert line == f"watcher: {path}:7: rules[0].watch: '{tmp_path / 'afile'}' is not a directory"


def test_run_with_invalid_yaml_gives_the_line_of_the_syntax_error(tmp_path):
    path = write(tmp_path, "archives:\n  arch: {remote_basedir: far\nrules: []\n")
    line = assert_one_line_exit_2(run_cli("run", "--config", str(path), cwd=tmp_path))
    assert line.startswith(f"watcher: {path}:")
    assert "not valid YAML" in line


def test_run_with_a_config_file_that_does_not_exist_says_so(tmp_path):
    missing = tmp_path / "nope.yaml"
    line = assert_one_line_exit_2(run_cli("run", "--config", str(missing), cwd=tmp_path))
    assert f"{missing}: cannot read configuration: No such file or directory" in line


def test_run_with_an_ssh_host_that_looks_like_an_option_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("remote_basedir: far",
                                        "remote_basedir: /far\n    ssh_host: -oProxyCommand=touch")
                 .replace("    delete_local_after: 7d\n", ""))
    line = assert_one_line_exit_2(run_cli("run", "--config", str(path), cwd=tmp_path))
    assert f"{path}:5: archives.arch.ssh_host:" in line and "'-'" in line


def test_every_problem_of_a_file_is_reported_each_on_its_own_line(tmp_path):
    path = write(tmp_path, """\
        colour: blue
        archives:
          arch:
            remote_basedir: far
            max_copy_attempts: ten
        rules:
          - watch: inbox
            archive: arhc
            remote_path: "{timecod}/{name}"
        """)
    result = run_cli("run", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        f"{path}:1", f"{path}:5", f"{path}:8", f"{path}:9"], lines
    assert all(line.startswith("watcher: ") for line in lines)


# -- load_config: each error one line naming the key ------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("max_copy_attempts", '"ten"', "expected a whole number of at least 1, got 'ten'"),
    ("max_copy_attempts", "0", "expected a whole number of at least 1, got 0"),
    ("compression", '"yes"', "expected true or false, got 'yes'"),
    ("ssh_port", "70000", "expected a port number, got 70000"),
    ("remote_basedir", "[a, b]", "expected a string, got ['a', 'b']"),
    ("copy_timeout", "-5", "-5"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_the_value(tmp_path, key, value, message):
    text = GOOD.replace("    remote_basedir: far\n", "" if key == "remote_basedir" else "    remote_basedir: far\n")
    path = write(tmp_path, text.replace("    delete_local_after: 7d\n", f"    {key}: {value}\n"))
    problem = only_problem(path)
    assert problem.startswith(f"{path}:")
    assert f"archives.arch.{key}: " in problem and message in problem


@pytest.mark.parametrize("key, value", [
    ("settle", '"soon"'), ("include", "3"), ("deletable", '"no"'), ("match", '"(unclosed"'),
])
def test_a_rule_value_of_the_wrong_type_names_the_rule_and_key(tmp_path, key, value):
    path = write(tmp_path, GOOD + f"    {key}: {value}\n")
    assert only_problem(path).startswith(f"{path}:10: rules[0].{key}: ")


def test_a_template_field_that_does_not_exist_is_named_with_the_known_fields(tmp_path):
    path = write(tmp_path, GOOD.replace("{timecode}/{relpath}", "{timecode}/{filename}"))
    problem = only_problem(path)
    assert problem.startswith(f"{path}:9: rules[0].remote_path: unknown field {{filename}}")
    assert "relpath" in problem and "timecode" in problem


def test_a_regex_group_is_a_template_field_of_its_own_rule(tmp_path):
    path = write(tmp_path, GOOD.replace('"{timecode}/{relpath}"', '"{kind}/{name}"')
                 + "    match: '(?P<kind>outputs|plots)/'\n")
    assert load_config(path).rules[0].remote_path == "{kind}/{name}"


@pytest.mark.parametrize("template, message", [
    ("../{relpath}", "must not climb out of the archive with '..'"),
    ("{timecode}/../../{name}", "must not climb out of the archive with '..'"),
    ("/srv/{relpath}", "must be relative to the archive's remote_basedir, not absolute"),
])
def test_a_remote_path_template_that_could_escape_the_archive_is_refused(tmp_path, template, message):
    path = write(tmp_path, GOOD.replace("{timecode}/{relpath}", template))
    assert only_problem(path) == f"{path}:9: rules[0].remote_path: {message}"


def test_a_top_level_that_is_not_a_mapping_is_one_problem(tmp_path):
    path = write(tmp_path, "- watch: inbox\n")
    assert "expected a mapping" in only_problem(path)


def test_an_archive_that_is_not_a_mapping_is_one_problem(tmp_path):
    path = write(tmp_path, GOOD.replace("  arch:\n    remote_basedir: far\n    delete_local_after: 7d\n",
                                        "  arch: 5\n  other: {remote_basedir: far}\n")
                 .replace("archive: arch", "archive: other"))
    assert only_problem(path) == f"{path}:3: archives.arch: expected a mapping of archive settings, got int"


def test_a_rule_that_is_not_a_mapping_is_one_problem(tmp_path):
    path = write(tmp_path, GOOD + "  - inbox\n")
    assert only_problem(path).startswith(f"{path}:10: rules[1]: ")


def test_a_file_without_archives_says_one_is_required(tmp_path):
    path = write(tmp_path, "rules: []\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}") and problem.endswith(" archives: at least one archive is required")


def test_a_directory_given_as_the_config_file_cannot_be_read(tmp_path):
    problem = only_problem(tmp_path)
    assert problem == f"{tmp_path}: cannot read configuration: Is a directory"


def test_a_config_file_that_is_not_utf8_text_is_refused(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"archives:\n  \xff\xfe: {}\n")
    assert only_problem(path) == f"{path}: not a UTF-8 text file"


@pytest.mark.parametrize("host", ["-oProxyCommand=touch /tmp/x", "--help", "user@host name", ""])
def test_an_ssh_host_that_ssh_would_read_as_an_option_or_split_is_refused(tmp_path, host):
    path = write(tmp_path, GOOD.replace("remote_basedir: far",
                                        f"remote_basedir: /far\n    ssh_host: '{host}'"))
    assert only_problem(path).startswith(f"{path}:5: archives.arch.ssh_host: ")


def test_an_ordinary_ssh_host_is_accepted(tmp_path):
    path = write(tmp_path, GOOD.replace("remote_basedir: far",
                                        "remote_basedir: /far\n    ssh_host: cryo@archive-1.example"))
    archive = load_config(path).archives["arch"]
    assert archive.ssh_host == "cryo@archive-1.example" and archive.is_remote
    assert archive.remote_basedir == "/far"


# -- what a good file means ----------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    (90, 90.0), (2.5, 2.5), ("90", 90.0), ("45s", 45.0), ("30m", 1800.0), ("12h", 43200.0),
    ("7d", 604800.0), ("2w", 1209600.0), ("1.5h", 5400.0),
])
def test_durations_are_seconds_or_a_number_with_a_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["3 days", "7x", "-5", -5, True, None, "", "h"])
def test_a_duration_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_in_a_file_become_seconds(tmp_path):
    path = write(tmp_path, GOOD.replace("delete_local_after: 7d", "delete_local_after: 12h\n    copy_timeout: 30m")
                 + "    settle: 90\n")
    config = load_config(path)
    assert config.archives["arch"].delete_local_after == 43200.0
    assert config.archives["arch"].copy_timeout == 1800.0
    assert config.rules[0].settle == 90.0


def test_relative_paths_resolve_against_the_rules_files_directory_not_the_cwd(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "inbox").mkdir()
    (conf_dir / "rules.yaml").write_text(GOOD + "file_root: final\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "rules.yaml")
    assert config.database.resolve() == conf_dir / "catalog.db"
    assert config.file_root.resolve() == conf_dir / "final"
    assert config.rules[0].watch.resolve() == conf_dir / "inbox"
    assert Path(config.archives["arch"].remote_basedir).resolve() == conf_dir / "far"


def test_a_remote_archives_basedir_is_left_as_the_far_side_path(tmp_path):
    path = write(tmp_path, GOOD.replace("remote_basedir: far", "remote_basedir: data/far\n    ssh_host: archive"))
    assert load_config(path).archives["arch"].remote_basedir == "data/far"


def test_a_rule_without_retention_follows_its_archive(tmp_path):
    rule = load_config(write(tmp_path, GOOD)).rules[0]
    assert not rule.overrides_retention


def test_a_rule_can_keep_its_files_longer_than_its_archive(tmp_path):
    rule = load_config(write(tmp_path, GOOD + "    delete_local_after: 30d\n")).rules[0]
    assert rule.overrides_retention and rule.delete_local_after == 30 * 86400.0


@pytest.mark.parametrize("value", ["null", "never", "~"])
def test_a_rule_can_keep_its_files_forever_while_its_archive_is_cleaned(tmp_path, value):
    config = load_config(write(tmp_path, GOOD + f"    delete_local_after: {value}\n"))
    assert config.archives["arch"].delete_local_after == 7 * 86400.0
    assert config.rules[0].overrides_retention and config.rules[0].delete_local_after is None


def test_a_rule_can_override_an_archive_that_never_deletes(tmp_path):
    text = GOOD.replace("    delete_local_after: 7d\n", "") + "    delete_local_after: 90\n"
    config = load_config(write(tmp_path, text))
    assert config.archives["arch"].delete_local_after is None
    assert config.rules[0].delete_local_after == 90.0


def test_a_rule_with_a_bad_retention_names_the_rule(tmp_path):
    path = write(tmp_path, GOOD + "    delete_local_after: forever\n")
    assert only_problem(path).startswith(f"{path}:10: rules[0].delete_local_after: ")


def test_the_shipped_default_configuration_loads_under_a_state_directory(tmp_path):
    from watcher.config import load_default_config

    config = load_default_config(tmp_path / "state")
    assert config.database == tmp_path / "state" / "catalog.db"
    assert [r.watch for r in config.rules] == [tmp_path / "state" / "inbox"]
    assert (tmp_path / "state" / "inbox").is_dir()


# -- paths that overlap would loop or lose data ---------------------------------------


def test_a_local_archive_inside_a_watched_directory_is_refused_naming_the_rule(tmp_path):
    path = write(tmp_path, GOOD.replace("remote_basedir: far", "remote_basedir: inbox/far"))
    problem = only_problem(path)
    assert problem.startswith(f"{path}:4: archives.arch.remote_basedir: "
                              f"'{tmp_path / 'inbox' / 'far'}' is inside rules[0].watch "
                              f"('{tmp_path / 'inbox'}', line 7)"), problem
    assert "shipped again" in problem


def test_a_local_archive_that_is_the_watched_directory_itself_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("remote_basedir: far", "remote_basedir: inbox"))
    problem = only_problem(path)
    assert problem.startswith(f"{path}:4: archives.arch.remote_basedir: ")
    assert "is the same directory as rules[0].watch" in problem


def test_a_local_archive_that_contains_a_watched_directory_is_refused(tmp_path):
    (tmp_path / "far" / "incoming").mkdir(parents=True)
    path = write(tmp_path, GOOD.replace("watch: inbox", "watch: far/incoming"))
    problem = only_problem(path)
    assert problem.startswith(f"{path}:4: archives.arch.remote_basedir: ")
    assert "contains rules[0].watch" in problem and "delete the only copy" in problem


def test_an_archive_reached_through_a_symlink_into_the_watched_directory_is_refused(tmp_path):
    (tmp_path / "inbox" / "copies").mkdir(parents=True)
    (tmp_path / "shortcut").symlink_to(tmp_path / "inbox" / "copies")
    path = write(tmp_path, GOOD.replace("remote_basedir: far", "remote_basedir: shortcut/far"))
    assert "is inside rules[0].watch" in only_problem(path)


def test_an_overlap_with_any_rule_is_refused_not_only_with_the_archives_own_rules(tmp_path):
    (tmp_path / "other").mkdir()
    path = write(tmp_path, GOOD.replace("remote_basedir: far", "remote_basedir: other/far")
                 + "  - watch: other\n    archive: arch\n")
    assert "is inside rules[1].watch" in only_problem(path)


def test_a_local_archive_beside_a_watched_directory_with_a_longer_name_is_accepted(tmp_path):
    path = write(tmp_path, GOOD.replace("remote_basedir: far", "remote_basedir: inbox-archive"))
    assert load_config(path).archives["arch"].remote_basedir == str(tmp_path / "inbox-archive")


def test_a_remote_archives_basedir_may_equal_a_local_watched_path(tmp_path):
    path = write(tmp_path, GOOD.replace("remote_basedir: far",
                                        f"remote_basedir: {tmp_path / 'inbox'}\n    ssh_host: archive"))
    assert load_config(path).archives["arch"].is_remote


def test_a_file_root_inside_a_watched_directory_is_refused(tmp_path):
    path = write(tmp_path, GOOD + "file_root: inbox/finalization\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:10: file_root: '{tmp_path / 'inbox' / 'finalization'}' "
                              f"is inside rules[0].watch ('{tmp_path / 'inbox'}', line 7): "), problem


def test_a_catalog_inside_a_watched_directory_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("database: catalog.db", "database: inbox/catalog.db")
                 + f"file_root: {tmp_path / 'finalization'}\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:1: database: '{tmp_path / 'inbox' / 'catalog.db'}' "
                              "is inside rules[0].watch"), problem
    assert "catalog" in problem.split(": ", 3)[3]


def test_a_rules_file_kept_in_its_own_watched_directory_reports_every_default_that_overlaps(tmp_path):
    path = write(tmp_path, """\
        archives:
          arch:
            remote_basedir: far
        rules:
          - watch: .
            archive: arch
        """)
    problems = problems_of(path)
    assert [p.split(": ")[1] for p in problems] == [
        "archives.arch.remote_basedir", "database", "file_root"], problems
    assert all("inside rules[0].watch" in p for p in problems), problems


# -- settle, ssh_key, known_hosts ----------------------------------------------------


@pytest.mark.parametrize("value", ["0", "0.05", '"0s"'])
def test_a_settle_shorter_than_a_tenth_of_a_second_is_refused_with_the_minimum(tmp_path, value):
    path = write(tmp_path, GOOD + f"    settle: {value}\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:10: rules[0].settle: expected at least 0.1 s"), problem


def test_a_settle_of_a_tenth_of_a_second_is_accepted(tmp_path):
    assert load_config(write(tmp_path, GOOD + "    settle: 0.1\n")).rules[0].settle == 0.1


def ssh_archive(key_lines: str) -> str:
    return GOOD.replace("remote_basedir: far", "remote_basedir: /far\n    ssh_host: archive\n" + key_lines)


def test_an_ssh_key_that_does_not_exist_is_named(tmp_path):
    path = write(tmp_path, ssh_archive("    ssh_key: keys/id_ed25519"))
    assert only_problem(path) == (
        f"{path}:6: archives.arch.ssh_key: file '{tmp_path / 'keys' / 'id_ed25519'}' does not exist")


def test_an_ssh_key_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "keys").mkdir()
    path = write(tmp_path, ssh_archive("    ssh_key: keys"))
    assert only_problem(path) == f"{path}:6: archives.arch.ssh_key: '{tmp_path / 'keys'}' is not a file"


def test_an_ssh_key_that_exists_is_accepted(tmp_path):
    (tmp_path / "id_ed25519").write_text("key\n")
    path = write(tmp_path, ssh_archive("    ssh_key: id_ed25519"))
    assert load_config(path).archives["arch"].ssh_key == str(tmp_path / "id_ed25519")


def test_a_missing_known_hosts_file_is_refused_when_new_host_keys_are_not_accepted(tmp_path):
    path = write(tmp_path, ssh_archive("    known_hosts: known_hosts"))
    problem = only_problem(path)
    assert problem.startswith(f"{path}:6: archives.arch.known_hosts: "
                              f"file '{tmp_path / 'known_hosts'}' does not exist"), problem
    assert "accept_new_host_keys" in problem


def test_a_missing_known_hosts_file_is_accepted_when_new_host_keys_are(tmp_path):
    path = write(tmp_path, ssh_archive("    known_hosts: known_hosts\n    accept_new_host_keys: true"))
    assert load_config(path).archives["arch"].known_hosts == str(tmp_path / "known_hosts")


def test_a_known_hosts_file_in_a_missing_directory_is_refused_even_when_new_keys_are_accepted(tmp_path):
    path = write(tmp_path, ssh_archive("    known_hosts: ssh/known_hosts\n    accept_new_host_keys: true"))
    problem = only_problem(path)
    assert problem.startswith(f"{path}:6: archives.arch.known_hosts: directory '{tmp_path / 'ssh'}'")
    assert "does not exist" in problem


def test_an_existing_known_hosts_file_is_accepted(tmp_path):
    (tmp_path / "known_hosts").write_text("")
    path = write(tmp_path, ssh_archive("    known_hosts: known_hosts"))
    assert load_config(path).archives["arch"].known_hosts == str(tmp_path / "known_hosts")


def test_run_reports_overlaps_settle_and_ssh_files_together_one_line_each_and_exits_2(tmp_path):
    path = write(tmp_path, """\
        archives:
          here:
            remote_basedir: inbox/copies
          there:
            remote_basedir: /far
            ssh_host: archive
            ssh_key: missing_key
            known_hosts: missing_known_hosts
        rules:
          - watch: inbox
            archive: here
            settle: 0
        file_root: final
        """)
    result = run_cli("run", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert sorted(line.split(": ")[1:3] for line in lines) == sorted([
        [f"{path}:3", "archives.here.remote_basedir"],
        [f"{path}:7", "archives.there.ssh_key"],
        [f"{path}:8", "archives.there.known_hosts"],
        [f"{path}:12", "rules[0].settle"]]), lines


# -- defaults: written once (the dataclasses), stated alike in the README -------------

README = Path(__file__).resolve().parents[1] / "README.md"
MINIMAL = """\
archives:
  a:
    remote_basedir: far
rules:
  -
    watch: inbox
    archive: a
"""
KEYS = {"top": TOP_KEYS, "archive": ARCHIVE_KEYS, "rule": RULE_KEYS}


def read_minimal(tmp_path: Path, section: str = "", line: str = "", without: str = "") -> Config:
    """A minimal rules file, with one more line in ``section`` or one key fewer."""
    (tmp_path / "inbox").mkdir(exist_ok=True)
    text = MINIMAL
    if without:
        text = re.sub(rf"(?m)^\s*{without}: .*\n", "", text)
    if section == "top":
        text = line + "\n" + text
    elif section == "archive":
        text = text.replace("    remote_basedir: far\n", f"    remote_basedir: far\n    {line}\n")
    elif section == "rule":
        text += f"    {line}\n"
    return parse_config(text, str(tmp_path / "rules.yaml"), tmp_path, live=False)


def setting_of(config: Config, section: str, key: str):
    return getattr({"top": config, "archive": config.archives["a"], "rule": config.rules[0]}[section], key)


def test_the_reader_takes_every_default_from_the_settings_dataclasses(tmp_path):
    config = read_minimal(tmp_path)
    for section, cls in (("top", Config), ("archive", Archive), ("rule", Rule)):
        for key, default in defaults(cls).items():
            if key in KEYS[section] and (section, key) != ("archive", "instance_id"):
                assert setting_of(config, section, key) == default, (section, key)
    assert config.database == tmp_path / DEFAULT_DATABASE
    assert config.file_root == tmp_path / DEFAULT_FILE_ROOT
    assert config.instance_id == socket.gethostname()
    # an archive without its own instance_id takes the top-level one
    assert all(a.instance_id == config.instance_id for a in config.archives.values())


_LINE = re.compile(r"^( *)(?:- )?([a-z_]+):\s*(.*?)\s*(?:#\s*(.*))?$")


def readme_reference() -> list[tuple[str, str, str, str]]:
    """(section, key, value as written, comment) of each setting in the
    README's configuration reference (its first yaml block)."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## Configuration reference (rules.yaml)", 1)[1]
    block = block.split("```yaml\n", 1)[1].split("```", 1)[0]
    entries, parent = [], None
    for line in block.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        indent, key, value, comment = len(m[1]), m[2], m[3], m[4] or ""
        if indent == 0:
            parent = key
            entries.append(("top", key, value, comment))
        elif parent == "archives" and indent > 2:  # indent 2: the archive's name
            entries.append(("archive", key, value, comment))
        elif parent == "rules":
            entries.append(("rule", key, value, comment))
    return entries


def test_the_readme_documents_every_setting_and_no_other():
    documented = {section: set() for section in KEYS}
    for section, key, _value, _comment in readme_reference():
        documented[section].add(key)
    assert documented == {section: set(keys) for section, keys in KEYS.items()}


def _what_the_readme_states(value: str, comment: str) -> tuple[str, str | None]:
    """("default", its words), ("required", None), ("absent", None): the
    comment says what an absent key means; else ("value", the example's value)."""
    if m := re.search(r"\bdefault:? ([^;]+)", comment):
        return "default", m[1].strip()
    if re.search(r"\brequired\b", comment):
        return "required", None
    if re.search(r"\b(absent|optional)\b", comment):
        return "absent", None
    return "value", value


_NOTHING = ("nobody", "none", "ssh's own")  # words for a default of None or ()


# A README that disagrees with the code fails here, one key each, until the
# README is fixed (issue 10 found: rule.watch and rule.archive do not say
# "required"; archive.ssh_key, archive.ssh_port, archive.api_roots and
# rule.remote_path show an example where the default differs, and state none).
@pytest.mark.parametrize("section, key, value, comment", [
    pytest.param(*entry, id=f"{entry[0]}.{entry[1]}") for entry in readme_reference()
    if (entry[0], entry[1]) not in (("top", "archives"), ("top", "rules"))])
def test_the_readme_states_the_default_the_code_has(tmp_path, section, key, value, comment):
    said, words = _what_the_readme_states(value, comment)
    shown = f"README.md shows `{key}: {value}{f'  # {comment}' if comment else ''}`"
    try:
        read_minimal(tmp_path, without=key)
        required = False
    except ConfigError as exc:
        required = any(f"{key}: is required" in p for p in exc.problems)
        assert required, exc.problems
    if required or said == "required":
        assert required and said == "required", (
            f"{shown}; the code {'requires it' if required else 'has a default'}: the README's "
            f"comment should {'say required' if required else 'state the default'}")
        return
    code = setting_of(read_minimal(tmp_path), section, key)
    if said == "absent":
        assert code is None, f"{shown}, as if absent meant none; the code's default is {code!r}"
        return
    if said == "default" and words == "the top-level instance_id":
        assert code == read_minimal(tmp_path).instance_id, f"{shown}; the code's default is {code!r}"
        return
    if said == "default" and words == "host name":
        assert code == socket.gethostname(), f"{shown}; the code's default is {code!r}"
        return
    if said == "default" and (m := re.fullmatch(r"(\S+?)/? beside (this file|the database)", words)):
        beside = tmp_path if m[2] == "this file" else read_minimal(tmp_path).database.parent
        assert code == beside / m[1], f"{shown}; the code's default is {code!r}"
        return
    if said == "default" and words.startswith(_NOTHING):
        assert code in (None, ()), f"{shown}; the code's default is {code!r}"
        return
    if said == "default" and words.startswith("`") and words.endswith("`"):
        words = json.dumps(words.strip("`"))
    try:  # an example or a default written as a value: read it as a rules file would
        documented = setting_of(read_minimal(tmp_path, section, f"{key}: {words}"), section, key)
    except ConfigError as exc:
        documented = f"refused ({'; '.join(exc.problems)})"
    assert documented == code, (
        f"{shown}, which reads as {documented!r}; the code's default is {code!r}: the README "
        f"should show the default or state it in the comment (default: ...)")


def test_an_archive_has_its_own_instance_id_or_the_top_level_one(tmp_path):
    """socs ran one SupRsync instance per archive, each with its own id."""
    config = read_minimal(tmp_path, "archive", "instance_id: smurf-sync-srv20")
    assert [a.instance_id for a in config.archives.values()] == ["smurf-sync-srv20"]
    for bad in ("a/b", "..", "''", "x" * 201):
        with pytest.raises(ConfigError) as refused:
            read_minimal(tmp_path, "archive", f"instance_id: {bad}")
        [problem] = refused.value.problems
        assert "archives.a.instance_id:" in problem and ("finalization" in problem or "non-empty" in problem), problem
