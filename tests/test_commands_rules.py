"""`watcher rules test`, `watcher check` of a file the catalog does not know,
and `watcher config example`: what the rules would do, said per path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.agent_process import watcher_command
from watcher.config import Rule, load_config
from watcher.rules import select_rule, why_not_taken


def watcher(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(watcher_command(*args), capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture
def rules(setup) -> tuple[str, Path, Path]:
    """rules[0]: raw/ of archive smurf, only *.dat with a ctime; rules[1]: inbox/ of archive tuning."""
    setup.archive("smurf")
    setup.archive("tuning")
    raw = setup.rule("raw", archive="smurf", include=["*.dat"], match=r"(?P<ctime>\d{10})/",
                     remote_path="{timecode}/{relpath}")
    inbox = setup.rule("inbox", archive="tuning")
    return str(setup.write()), raw, inbox


def test_rules_test_says_per_path_the_rule_archive_and_remote_path_or_why_none(rules):
    config, raw, inbox = rules
    paths = [raw / "1700000000/a.dat", raw / "1700000000/a.txt", raw / "b.dat", inbox / "x.tmp",
             inbox / "sub/t.npy", Path("/etc/passwd")]
    done = watcher("rules", "test", "--config", config, *map(str, paths))
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"{paths[0]}: rules[0] (watch {raw}) takes it: archive smurf, remote path 17000/1700000000/a.dat",
        f"{paths[1]}: ships nowhere: rules[0] (watch {raw}) matches none of its include globs ('*.dat')",
        f"{paths[2]}: ships nowhere: rules[0] (watch {raw}) does not match its match regex '(?P<ctime>\\\\d{{10}})/'",
        f"{paths[3]}: ships nowhere: rules[1] (watch {inbox}) excluded by its glob '*.tmp'",
        f"{paths[4]}: rules[1] (watch {inbox}) takes it: archive tuning, remote path sub/t.npy",
        f"{paths[5]}: ships nowhere: under no rule's watch directory ({raw}, {inbox})",
    ]
    done = watcher("rules", "test", "--config", config, str(paths[0]), str(paths[4]))
    assert done.returncode == 0


def test_check_of_a_file_not_in_the_catalog_says_what_the_rules_would_do(rules, setup):
    config, raw, inbox = rules
    setup.catalog().close()
    done = watcher("check", str(inbox / "x.tmp"), "--config", config)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"{inbox / 'x.tmp'}: not in the catalog",
                                        f"rules: ships nowhere: rules[1] (watch {inbox}) excluded by its glob '*.tmp'"]
    done = watcher("check", str(inbox / "y.npy"), "--config", config)
    assert done.stdout.splitlines()[1] == f"rules: rules[1] (watch {inbox}) takes it: archive tuning, remote path y.npy"


@pytest.mark.parametrize("relpath", ["a.dat", ".a.dat", "d/.x/a.dat", "a.tmp", "a.txt", "1700000000/a.dat",
                                     "d/1700000000/a.swp", "a.dat.part"])
@pytest.mark.parametrize("rule", [
    Rule(Path("/w"), "a"),
    Rule(Path("/w"), "a", include=("*.dat",), exclude=("*.swp", ".*")),
    Rule(Path("/w"), "a", match=re.compile(r"(?P<ctime>\d{10})/"), exclude=()),
])
def test_why_not_taken_agrees_with_the_one_matching_of_the_rules(relpath, rule):
    taken = select_rule(f"/w/{relpath}", [rule]) is not None
    assert (why_not_taken(relpath, rule) is None) == taken


def test_config_example_is_a_starter_file_the_check_accepts(tmp_path):
    done = watcher("config", "example")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("# A starter rules file")
    example = tmp_path / "rules.yaml"
    example.write_text(done.stdout)
    config = load_config(example)  # as `watcher run` reads it
    assert list(config.archives) == ["smurf"] and config.rules[0].archive == "smurf"
    done = watcher("rules", "test", "--config", str(example), "/data/smurf_data/1700000000/a.dat",
                   "/data/smurf_data/.a.swp")
    assert done.stdout.splitlines() == [
        "/data/smurf_data/1700000000/a.dat: rules[0] (watch /data/smurf_data) takes it: archive smurf, "
        "remote path 17000/1700000000/a.dat",
        "/data/smurf_data/.a.swp: ships nowhere: rules[0] (watch /data/smurf_data) excluded by its glob '.*'"]


def test_config_check_lists_what_the_start_up_scan_would_register_and_changes_nothing(setup, tmp_path):
    far = setup.archive()
    far.mkdir()
    inbox = setup.rule()
    (inbox / "sub").mkdir()
    (inbox / "a.dat").write_bytes(b"a")
    (inbox / "sub" / "b.dat").write_bytes(b"b")
    (inbox / "x.tmp").write_bytes(b"excluded")
    rules_file = setup.write()
    before = sorted(p.name for p in setup.root.iterdir())
    done = watcher("config", "check", str(rules_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 files to register, 0 already in the catalog" in done.stdout
    assert f"{inbox / 'sub' / 'b.dat'} -> arch:sub/b.dat" in done.stdout and "x.tmp" not in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("ok:")
    assert sorted(p.name for p in setup.root.iterdir()) == before, "it made a catalog or state files"
    # with a catalog that knows one of them: read, not written
    setup.catalog().add_file(str(inbox / "a.dat"), "a.dat", "arch")
    catalog_bytes = setup.database.read_bytes()
    done = watcher("config", "check", str(setup.root / "rules.yaml"))
    assert "1 file to register, 1 already in the catalog" in done.stdout, done.stdout
    assert setup.database.read_bytes() == catalog_bytes


def test_config_check_names_an_archive_it_cannot_reach_and_refuses_a_bad_file(setup):
    setup.archive().mkdir()
    setup.rule()
    setup.archive("away", remote_basedir="base", ssh_host="nobody@127.0.0.1", ssh_port=1,
                  accept_new_host_keys=True, cmd_timeout=2)
    done = watcher("config", "check", str(setup.write()))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PROBLEM: archive away: nobody@127.0.0.1 cannot be reached" in done.stdout
    assert "Connection refused" in done.stderr and "Traceback" not in done.stderr
    setup.rules[0]["archive"] = "nosuch"
    done = watcher("config", "check", str(setup.write()))
    assert done.returncode == 2 and "unknown archive 'nosuch'" in done.stderr, done.stderr
