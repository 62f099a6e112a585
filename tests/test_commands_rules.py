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
