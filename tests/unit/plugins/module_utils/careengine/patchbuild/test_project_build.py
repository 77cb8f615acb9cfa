"""The pieces of the two-stage build that need no compiler: patching and restoring the
tree, running make, the store levels."""

from __future__ import annotations

import os
import time

import pytest

from plugins.module_utils.careengine.errors import BuildError
from plugins.module_utils.careengine.patchbuild import project_build

PATCH = """\
--- a/src/a.txt
+++ b/src/a.txt
@@ -1,2 +1,2 @@
 one
-two
+TWO
--- /dev/null
+++ b/src/new.txt
@@ -0,0 +1 @@
+created
"""


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "fix.patch").write_text(PATCH)
    old = time.time() - 3600
    os.utime(tmp_path / "src" / "a.txt", (old, old))
    return tmp_path


def test_apply_then_restore_puts_the_tree_back(tree):
    patched = project_build.PatchedTree(str(tree), str(tree / "backup"))
    patched.apply(str(tree / "fix.patch"))
    assert (tree / "src" / "a.txt").read_text() == "one\nTWO\n"
    assert (tree / "src" / "new.txt").read_text() == "created\n"
    before_restore = time.time() - 1
    patched.restore()
    assert (tree / "src" / "a.txt").read_text() == "one\ntwo\n"
    assert not (tree / "src" / "new.txt").exists()
    assert os.stat(tree / "src" / "a.txt").st_mtime >= before_restore   # make rebuilds it next time
    assert not (tree / "backup").exists()
    assert sorted(p.name for p in (tree / "src").iterdir()) == ["a.txt"]


def test_patch_that_does_not_apply_changes_nothing(tree):
    (tree / "src" / "a.txt").write_text("something else\n")
    patched = project_build.PatchedTree(str(tree), str(tree / "backup"))
    with pytest.raises(BuildError, match="does not apply"):
        patched.apply(str(tree / "fix.patch"))
    assert (tree / "src" / "a.txt").read_text() == "something else\n"
    assert not (tree / "src" / "new.txt").exists()
    patched.restore()


def test_missing_patch_is_refused(tree):
    with pytest.raises(BuildError, match="does not exist"):
        project_build.PatchedTree(str(tree), str(tree / "backup")).apply(str(tree / "missing.patch"))


def test_make_failure_carries_the_output(tmp_path):
    (tmp_path / "Makefile").write_text("all:\n\t@echo 'x.c:1:2: error: the compiler says no' >&2; exit 3\n")
    build = project_build.ProjectBuild(str(tmp_path), str(tmp_path))
    with pytest.raises(project_build.MakeFailed) as failure:
        build.make("original")
    assert "the compiler says no" in failure.value.output
    assert "the compiler says no" in str(failure.value)
    assert os.path.isfile(failure.value.log_path)


def test_make_runs_in_the_stage_and_prefers_lpmakefile(tmp_path):
    (tmp_path / "Makefile").write_text("all:\n\texit 1\n")
    (tmp_path / "lpmakefile").write_text("all:\n\techo \"stage=$$KPATCH_STAGE $(EXTRA)\" > out.txt\n")
    messages = []
    build = project_build.ProjectBuild(str(tmp_path), str(tmp_path), make_args=("EXTRA=yes",), progress=messages.append)
    build.make("patched")
    assert (tmp_path / "out.txt").read_text() == "stage=patched yes\n"
    assert messages == ["stage patched: make"]


def test_interrupted_stage_restores_the_tree(tree):
    (tree / "Makefile").write_text("all:\n\ttrue\ninstall:\n\ttrue\n")
    calls = []

    def interrupt_on_patched(message: str) -> None:
        calls.append(message)
        if message.startswith("stage patched"):
            raise KeyboardInterrupt

    build = project_build.ProjectBuild(str(tree), str(tree), progress=interrupt_on_patched)
    with pytest.raises(KeyboardInterrupt):
        project_build.run_stages(build, [str(tree / "fix.patch")])
    assert (tree / "src" / "a.txt").read_text() == "one\ntwo\n"
    assert not (tree / "src" / "new.txt").exists()
    assert "reverting the patches" in calls


@pytest.mark.parametrize("variable, value", [("LPMAKE_ORIGINAL_DIR", "/"), ("LPMAKE_PATCHED_DIR", ".."),
                                             ("LPMAKE_PATCHROOT", ".")])
def test_output_dirs_that_hold_the_project_are_refused(tmp_path, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(BuildError, match=f"{variable}=.* would be emptied"):
        project_build.ProjectBuild(str(tmp_path / "project"), str(tmp_path / "project"))


def test_output_dirs_follow_libcare_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("LPMAKE_ORIGINAL_DIR", "orig")
    monkeypatch.setenv("LPMAKE_PATCHROOT", str(tmp_path / "roots"))
    monkeypatch.delenv("LPMAKE_PATCHED_DIR", raising=False)
    build = project_build.ProjectBuild(str(tmp_path / "p"), str(tmp_path / "p"))
    assert build.original_dir == str(tmp_path / "p" / "orig")
    assert build.patched_dir == str(tmp_path / "p" / ".lpmaketmp" / "patched")
    assert build.patchroot == str(tmp_path / "roots")
