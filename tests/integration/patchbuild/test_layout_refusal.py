"""A patch that changes the layout of a class objects of which exist (fixture ``cxxdata``:
a ``Tally`` on the heap, from ``tally.h``) is refused by libcare-patch-make naming the
class and what changed, the tree restored. (The fixture's fix.patch changes greet.cc,
which uses Tally, and keeps its layout: test_cxx_new_data_live.py builds it.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "apply"))
from apply_helpers import FIXTURES, make_diff  # noqa: E402

PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")


@pytest.mark.parametrize("old, new, refusal", [
    ("\tint rounds;\n", "\tint rounds;\n\tint misses;\n",
     "greet.cc: the layout of struct Tally changed (member `misses` added at 4)"),
    ("\tlong letters;\n", "\tint letters;\n",
     "greet.cc: the layout of struct Tally changed (size 16 -> 8; member `letters` moved 8 -> 4; "
     "member `letters` type long int -> int)"),
])
def test_a_changed_class_layout_is_refused_naming_the_class(tmp_path, old, new, refusal):
    project = Path(shutil.copytree(FIXTURES / "cxxdata", tmp_path / "cxxdata"))
    make_diff(project, "tally.h", ((old, new),), "layout.patch")
    before = {path.name: path.read_bytes() for path in project.iterdir() if path.is_file()}
    result = subprocess.run([PATCH_MAKE, "layout.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stdout
    assert refusal in result.stderr, result.stderr
    assert "objects that exist keep the old layout" in result.stderr
    assert "reverting the patches" in result.stderr
    assert {name: (project / name).read_bytes() for name in before} == before
    assert not list(project.glob("patchroot/*.kpatch"))


@pytest.mark.parametrize("cxxflags, warned", [("-O2 -Wall", True), ("-O2 -g -Wall", False)])
def test_units_without_debug_information_are_named_as_unchecked(tmp_path, cxxflags, warned):
    """Without -g nothing describes the types: the build goes on (the fixture's own fix keeps
    every layout) but says which changed units could not be checked."""
    project = Path(shutil.copytree(FIXTURES / "cxxdata", tmp_path / "cxxdata"))
    result = subprocess.run([PATCH_MAKE, "-m", f"CXXFLAGS={cxxflags}", "fix.patch"], cwd=project,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    warning = "warning: 1 changed unit built without debug information (-g): struct and class layouts not checked"
    assert (warning in result.stderr) is warned, result.stderr
    if warned:
        assert "greet.cc" in result.stderr.split(warning, 1)[1].splitlines()[0]
