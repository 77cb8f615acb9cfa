"""Checking patches on a scratch copy, keeping originals outside the tree, recovering a
killed run: real files, real ``patch``."""

from __future__ import annotations

import json
import os

import pytest

from plugins.module_utils.careengine.errors import BuildError
from plugins.module_utils.careengine.patchbuild import sourcetree

FIRST = """\
--- a/src/a.txt
+++ b/src/a.txt
@@ -1,2 +1,2 @@
 one
-two
+TWO
--- /dev/null
+++ b/new/deeper/made.txt
@@ -0,0 +1 @@
+created
"""
SECOND = """\
--- a/src/a.txt\t2024-01-01 00:00:00
+++ b/src/a.txt\t2024-01-01 00:00:00
@@ -1,2 +1,2 @@
 one
-TWO
+2
"""


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("one\ntwo\n")
    os.chmod(tmp_path / "src" / "a.txt", 0o640)
    (tmp_path / "first.patch").write_text(FIRST)
    (tmp_path / "second.patch").write_text(SECOND)
    return tmp_path


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_named_files_strips_one_component_and_timestamps():
    assert sourcetree.named_files(FIRST) == ["src/a.txt", "new/deeper/made.txt"]
    assert sourcetree.named_files(SECOND) == ["src/a.txt"]
    assert sourcetree.named_files('--- "a/with space.c"\n+++ "b/with space.c"\n') == ["with space.c"]


def test_check_applies_patches_in_order_without_touching_the_tree(tree):
    before = _files(tree)
    sourcetree.check_patches(str(tree), [str(tree / "first.patch"), str(tree / "second.patch")])
    assert _files(tree) == before
    with pytest.raises(BuildError, match="second.patch does not apply"):
        sourcetree.check_patches(str(tree), [str(tree / "second.patch")])   # needs the first one
    with pytest.raises(BuildError, match="missing.patch does not exist"):
        sourcetree.check_patches(str(tree), [str(tree / "missing.patch")])
    assert _files(tree) == before


def test_originals_live_outside_the_tree_and_come_back_byte_for_byte(tree, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    before = _files(tree)
    patched = sourcetree.PatchedTree(str(tree), str(state))
    patched.apply(str(tree / "first.patch"))
    patched.apply(str(tree / "second.patch"))
    assert (tree / "src" / "a.txt").read_text() == "one\n2\n"
    journal = json.loads((state / sourcetree.JOURNAL).read_text())
    assert set(journal["saved"]) == {"src/a.txt", "new/deeper/made.txt"}
    assert journal["created_dirs"] == ["new", "new/deeper"]
    patched.restore()
    assert _files(tree) == before
    assert not (tree / "new").exists()
    assert oct(os.stat(tree / "src" / "a.txt").st_mode & 0o777) == "0o640"
    assert not state.exists()


def test_recover_finishes_a_killed_run(tree, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    before = _files(tree)
    sourcetree.PatchedTree(str(tree), str(state)).apply(str(tree / "first.patch"))   # then "killed"
    os.unlink(tree / "src" / "a.txt")                         # and the build deleted a patched file
    assert sourcetree.recover(str(tree), str(state)) is True
    assert _files(tree) == before
    assert sourcetree.recover(str(tree), str(state)) is False   # nothing left to do


def test_recover_refuses_a_journal_of_another_tree(tree, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    sourcetree.PatchedTree(str(tree), str(state)).apply(str(tree / "first.patch"))
    other = tmp_path_factory.mktemp("other")
    with pytest.raises(BuildError, match="is for"):
        sourcetree.recover(str(other), str(state))


def test_state_dir_is_outside_the_tree_and_stable(tree, monkeypatch, tmp_path_factory):
    monkeypatch.delenv(sourcetree.STATE_ENV, raising=False)
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    first = sourcetree.state_dir_for(str(tree))
    assert first.startswith(str(cache)) and first == sourcetree.state_dir_for(str(tree) + "/.")
    assert first != sourcetree.state_dir_for(str(tree / "src"))
    monkeypatch.setenv(sourcetree.STATE_ENV, str(cache / "explicit"))
    assert sourcetree.state_dir_for(str(tree)) == str(cache / "explicit")


def test_one_run_per_tree(tree, tmp_path_factory):
    state = str(tmp_path_factory.mktemp("states") / "tree")
    with sourcetree.exclusive(str(tree), state):
        with pytest.raises(BuildError, match="another libcare-patch-make run is using"):
            with sourcetree.exclusive(str(tree), state):
                pass
    with sourcetree.exclusive(str(tree), state):      # released when the first run ends
        pass


def test_state_dir_without_a_writable_home_falls_back_to_tmp(tree, monkeypatch, tmp_path_factory):
    monkeypatch.delenv(sourcetree.STATE_ENV, raising=False)
    blocked = tmp_path_factory.mktemp("home") / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(sourcetree.tempfile, "tempdir", str(tmp_path_factory.mktemp("tmp")))
    state = sourcetree.state_dir_for(str(tree))
    assert state.startswith(os.path.join(sourcetree.tempfile.tempdir, f"libcare-patch-make-{os.getuid()}"))
