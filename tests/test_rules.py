"""Which rule takes a path, and the remote path it gets (watcher.rules)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from watcher.config import Rule
from watcher.rules import (
    ABSOLUTE, CLIMBS, EMPTY, NOT_NORMAL, REPLACED_DIR, UnsafeRemotePath, match_rule, remote_path_flaw,
    remote_path_problem, render_remote_path,
)

WATCH = Path("/data/smurf")


def rule(template: str = "{relpath}", watch: Path = WATCH, archive: str = "smurf", **options) -> Rule:
    if isinstance(options.get("match"), str):
        options["match"] = re.compile(options["match"])
    return Rule(watch=watch, archive=archive, remote_path=template, **options)


def remote(relpath: str, *rules: Rule, mtime: float | None = 1_700_000_000.0) -> str | None:
    found = match_rule(f"{WATCH}/{relpath}", rules or (rule(),), mtime=mtime)
    return found.remote_path if found else None


# -- include and exclude -----------------------------------------------------------


def test_a_plain_file_is_taken_with_its_relative_path():
    found = match_rule(f"{WATCH}/16750/a.dat", [rule()], mtime=0)
    assert (found.relpath, found.remote_path, found.rule.archive) == ("16750/a.dat", "16750/a.dat", "smurf")
    assert found.local_path == f"{WATCH}/16750/a.dat"


def test_a_path_outside_the_watched_directory_is_not_taken():
    assert match_rule("/data/smurf_other/a.dat", [rule()], mtime=0) is None
    assert match_rule("/elsewhere/a.dat", [rule()], mtime=0) is None


@pytest.mark.parametrize("relpath", [".hidden", "sub/.hidden", "a/b/.x.swp", ".git/config", "x/.cache/y.dat"])
def test_hidden_files_are_excluded_at_any_depth(relpath):
    assert remote(relpath) is None


@pytest.mark.parametrize("relpath", ["a.tmp", "deep/er/b.tmp", "c.part", "d.swp"])
def test_temporary_files_are_excluded_at_any_depth(relpath):
    assert remote(relpath) is None


@pytest.mark.parametrize("relpath", ["a.tmp.dat", "sub/tmp", "...", "..foo", "foo.."])
def test_names_that_only_look_temporary_or_hidden_are_taken(relpath):
    r = rule(exclude=("*.tmp",))
    assert remote(relpath, r) == relpath


def test_include_globs_select_by_name_or_by_relative_path():
    by_name = rule(include=("*.g3",))
    assert remote("1675000000/obs.g3", by_name) == "1675000000/obs.g3"
    assert remote("1675000000/obs.txt", by_name) is None
    by_path = rule(include=("outputs/*",))
    assert remote("outputs/x.dat", by_path) == "outputs/x.dat"
    assert remote("plots/x.dat", by_path) is None


def test_an_empty_exclude_list_takes_hidden_files_too():
    assert remote(".hidden", rule(exclude=())) == ".hidden"


# -- first match wins -------------------------------------------------------------------


def test_the_first_rule_that_matches_wins():
    tuning = rule("tuning/{name}", archive="tuning", include=("*.npy",))
    everything = rule("all/{relpath}", archive="smurf")
    found = match_rule(f"{WATCH}/x/a.npy", [tuning, everything], mtime=0)
    assert (found.rule.archive, found.remote_path) == ("tuning", "tuning/a.npy")
    found = match_rule(f"{WATCH}/x/a.dat", [tuning, everything], mtime=0)
    assert (found.rule.archive, found.remote_path) == ("smurf", "all/x/a.dat")


def test_a_rule_excluding_a_file_lets_a_later_rule_take_it():
    first = rule("first/{name}", archive="one", exclude=("*.log",))
    second = rule("second/{name}", archive="two", exclude=())
    assert match_rule(f"{WATCH}/a.log", [first, second], mtime=0).rule.archive == "two"


def test_a_rule_whose_regex_does_not_match_lets_a_later_rule_take_it():
    plots = rule("plots/{name}", archive="plots", match=r"(?P<kind>plots)/")
    rest = rule("{relpath}", archive="rest")
    assert match_rule(f"{WATCH}/1675000000/plots/p.png", [plots, rest], mtime=0).remote_path == "plots/p.png"
    assert match_rule(f"{WATCH}/1675000000/outputs/o.dat", [plots, rest], mtime=0).rule.archive == "rest"


def test_rules_on_different_watched_directories_each_take_their_own_files():
    a = rule("{relpath}", watch=Path("/data/a"), archive="a")
    b = rule("{relpath}", watch=Path("/data/b"), archive="b")
    assert match_rule("/data/b/x", [a, b], mtime=0).rule.archive == "b"
    assert match_rule("/data/ab/x", [a, b], mtime=0) is None


# -- template fields ------------------------------------------------------------------------


def test_every_template_field_of_a_nested_file():
    template = "{timecode}|{ctime}|{relpath}|{name}|{stem}|{suffix}|{parent}"
    assert remote("crate1/1675100400_tune.npy", rule(template)) == (
        "16751|1675100400|crate1/1675100400_tune.npy|1675100400_tune.npy|1675100400_tune|.npy|crate1")


def test_stem_and_suffix_of_names_with_several_dots_or_none():
    r = rule("{stem}+{suffix}")
    assert remote("a.tar.gz", r) == "a.tar+.gz"
    assert remote("README", r) == "README+"


def test_timecode_comes_from_a_ten_digit_ctime_in_the_directory():
    assert remote("1675000000/outputs/x.dat", rule("{timecode}/{relpath}"), mtime=1_800_000_000) == \
        "16750/1675000000/outputs/x.dat"


def test_a_number_longer_than_ten_digits_is_not_a_ctime():
    r = rule("{ctime}")
    assert remote("16750000001234/x.dat", r, mtime=1_700_000_000.7) == "1700000000"


def test_timecode_comes_from_the_modification_time_when_the_path_has_no_ctime():
    assert remote("hk/data.g3", rule("{timecode}/{relpath}"), mtime=1_712_345_678.9) == "17123/hk/data.g3"


def test_timecode_of_an_existing_file_is_read_from_its_own_modification_time(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "x.dat"
    path.write_text("x")
    os.utime(path, (1_690_000_000, 1_690_000_000))
    found = match_rule(str(path), [rule("{timecode}/{relpath}", watch=tmp_path)])
    assert found.remote_path == "16900/sub/x.dat"


def test_named_regex_groups_become_template_fields():
    r = rule("{timecode}/{slot}/{kind}/{name}", match=r"(?P<slot>crate\d+slot\d+)/(?P<kind>outputs|plots)/")
    assert remote("crate1slot2/plots/1675100400_p.png", r) == "16751/crate1slot2/plots/1675100400_p.png"


def test_a_ctime_group_in_the_regex_wins_over_the_first_ten_digit_number():
    r = rule("{timecode}/{name}", match=r"/(?P<ctime>\d{10})_")
    assert remote("1600000000/1675100400_p.png", r) == "16751/1675100400_p.png"


def test_an_optional_group_that_did_not_match_is_empty():
    r = rule("{kind}{name}", match=r"(?P<kind>plots/)?[^/]+$")
    assert remote("x.dat", r) == "x.dat"


def test_the_parent_of_a_file_at_the_top_of_the_watched_directory_leaves_no_leading_slash():
    assert remote("top.dat", rule("{parent}/{name}")) == "top.dat"
    assert remote("sub/deeper/x.dat", rule("{parent}/{name}")) == "sub/deeper/x.dat"


# -- escaping the archive -----------------------------------------------------------


def test_a_regex_group_capturing_dot_dot_cannot_climb_out_of_the_archive():
    r = rule("{up}/{name}", match=r"^a(?P<up>\.\.)b/", exclude=())
    with pytest.raises(UnsafeRemotePath):
        match_rule(f"{WATCH}/a..b/f.dat", [r], mtime=0)


def test_a_regex_group_capturing_dot_dot_deep_in_the_path_is_refused_too():
    r = rule("{timecode}/{g}/{g}/{g}/{name}", match=r"/(?P<g>\.\.)x/", exclude=())
    with pytest.raises(UnsafeRemotePath):
        match_rule(f"{WATCH}/1675000000/..x/f.dat", [r], mtime=0)


def test_a_regex_group_that_makes_the_path_absolute_is_refused():
    r = rule("{root}{name}", match=r"^(?P<root>[^/]+)/", exclude=())
    rendered = match_rule(f"{WATCH}/abc/f.dat", [r], mtime=0).remote_path
    assert rendered == "abcf.dat"
    r = rule("{sep}etc/{name}", match=r"a(?P<sep>/)", exclude=())
    with pytest.raises(UnsafeRemotePath):
        match_rule(f"{WATCH}/a/f.dat", [r], mtime=0)


def test_a_name_containing_dots_but_not_a_dot_dot_component_is_safe():
    r = rule("{timecode}/{name}", exclude=())
    assert remote("1675000000/..data..", r) == "16750/..data.."


# -- the one rule of a safe far name --------------------------------------------------


@pytest.mark.parametrize("remote_path, problem", [
    ("", "is empty or absolute"),
    ("/etc/passwd", "is empty or absolute"),
    ("//a", "is empty or absolute"),
    ("..", "contains '..'"),
    ("a/../b", "contains '..'"),
    ("a/..", "contains '..'"),
    ("a\0b", "contains a NUL byte"),
    ("a//b", "is not in normal form (no '//', './' or trailing '/')"),
    ("./a", "is not in normal form (no '//', './' or trailing '/')"),
    ("a/", "is not in normal form (no '//', './' or trailing '/')"),
    (f"{REPLACED_DIR}/x", f"is inside {REPLACED_DIR}/, where the archive keeps far files that copies replaced"),
    (REPLACED_DIR, f"is inside {REPLACED_DIR}/, where the archive keeps far files that copies replaced"),
])
def test_each_unsafe_far_name_is_refused_with_what_is_wrong(remote_path, problem):
    assert remote_path_problem(remote_path) == problem


@pytest.mark.parametrize("remote_path", [
    "a", "16750/a.dat", "..a", "a..", "...", "a/.b", f"{REPLACED_DIR}x/a", f"a/{REPLACED_DIR}/b", "a b/$(x)",
])
def test_far_names_that_stay_in_the_archive_are_safe(remote_path):
    assert remote_path_problem(remote_path) is None


# What a regex group may capture: every value a hostile path could put in a name.
HOSTILE_GROUPS = ["", ".", "..", "/", "//", "./", "a/..", "a/../..", "../x", "x/../y", "./..", "a//b", "a/./b", "a/"]


@pytest.mark.parametrize("template", ["{g}", "{g}/{name}", "x/{g}", "x/{g}/{g}", "{g}{g}/{name}"])
@pytest.mark.parametrize("group", HOSTILE_GROUPS)
def test_a_rendered_name_with_dot_dot_is_refused_and_any_other_passes_the_one_rule(template, group):
    """Whatever a field holds, a name with a '..' component is refused even
    where normalising would bring it back inside; any name accepted is one
    the rule calls relative, normal and inside the archive."""
    r = rule(template, match=r"^g(?P<g>.*)$", exclude=())
    relpath = f"g{group}"
    as_written = template.format(g=group, name=relpath.rpartition("/")[2])
    try:
        rendered = render_remote_path(r, relpath, r.match.search(relpath).groupdict(), 0, now=1_700_000_000)
    except UnsafeRemotePath:
        return
    assert ".." not in as_written.split("/"), (as_written, rendered)
    assert remote_path_flaw(rendered) not in (EMPTY, ABSOLUTE, CLIMBS, NOT_NORMAL), (as_written, rendered)
