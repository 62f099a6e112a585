"""safefs: files are opened, checked and unlinked below a root without ever
following a symlink, and only where a fresh walk from the root still leads
(real directories and files in a temporary tree)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.safefs import Beneath, Identity, SymlinkInPath, root_of


def test_a_file_below_a_link_to_a_directory_is_never_opened(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (root / "d").symlink_to(outside)
    (root / "f").symlink_to(outside / "secret")
    (root / "up").symlink_to("..")
    with Beneath(str(root)) as tree:
        for path in (root / "d" / "secret", root / "f", root / "up" / "outside" / "secret"):
            with pytest.raises(SymlinkInPath):
                tree.open(str(path))


DEPTH = 1200  # deeper than Python's recursion limit


def test_a_path_of_thousands_of_directories_is_opened_without_recursion(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    for _ in range(DEPTH):
        os.mkdir("a", dir_fd=fd)
        deeper = os.open("a", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    made = os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
    os.write(made, b"deep")
    os.close(made)
    os.close(fd)
    try:
        with Beneath(str(tmp_path)) as tree:
            opened = tree.open(str(tmp_path) + "/a" * DEPTH + "/f")
            try:
                assert os.read(opened, 10) == b"deep"
            finally:
                os.close(opened)
    finally:
        _remove_deep_tree(tmp_path)


def _remove_deep_tree(top: Path) -> None:
    """Remove the chain of ``a`` directories from the bottom up, without
    recursion (pytest's own clean-up of old temporary trees recurses)."""
    fds = [os.open(top, os.O_RDONLY)]
    while True:
        try:
            fds.append(os.open("a", os.O_RDONLY, dir_fd=fds[-1]))
        except FileNotFoundError:
            break
    os.unlink("f", dir_fd=fds[-1])
    for parent in reversed(fds[:-1]):
        os.rmdir("a", dir_fd=parent)
    for fd in fds:
        os.close(fd)


def test_a_directory_moved_out_of_the_tree_after_it_was_opened_is_not_deleted_from(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "d").mkdir(parents=True)
    data = root / "d" / "f.dat"
    data.write_bytes(b"data")
    with Beneath(str(root)) as tree:
        fd = tree.open(str(data))
        identity = Identity.of(os.fstat(fd))
        os.close(fd)
        os.rename(root / "d", elsewhere)  # the user moves the directory away ...
        (root / "d").symlink_to(elsewhere)  # ... and leaves a link to where it went
        assert not tree.unlink_if(str(data), identity)
        (root / "d").unlink()
        (root / "d").mkdir()  # or a new, empty directory of the same name
        assert not tree.unlink_if(str(data), identity)
    assert (elsewhere / "f.dat").read_bytes() == b"data"


def test_a_file_is_unlinked_only_while_it_is_the_file_that_was_checked(tmp_path):
    data = tmp_path / "f.dat"
    data.write_bytes(b"one")
    with Beneath(str(tmp_path)) as tree:
        identity = Identity.of(os.stat(data))
        data.unlink()
        data.write_bytes(b"two")  # another file under the name
        assert not tree.unlink_if(str(data), identity)
        assert data.read_bytes() == b"two"
        assert tree.unlink_if(str(data), Identity.of(os.stat(data)))
    assert not data.exists()


@pytest.mark.parametrize("path, expected", [
    ("/data/inbox/a/b.dat", "/data/inbox"),
    ("/data/inbox2/b.dat", "/data"),
])
def test_a_path_belongs_to_the_innermost_root_containing_it(path, expected):
    assert root_of(path, ["/data", "/data/inbox", Path("/data/inbox/")]) == expected


@pytest.mark.parametrize("path", ["/elsewhere/x.dat", "/dat", "/data", "relative/x.dat"])
def test_a_path_outside_every_root_has_no_tree_to_be_opened_in(path):
    with pytest.raises(ValueError):
        root_of(path, ["/data", "/data/inbox"])
