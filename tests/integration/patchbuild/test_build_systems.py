"""libcare-patch-make on CMake and Meson projects and with the user's own build commands:
detected from the tree, built through the wrappers, patched live."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apply"))
from apply_helpers import Patient, build_id_of, ctl  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures" / "projects"
PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
OURS = ("lpmake", ".lpmaketmp", "patchroot")


def _sources(project: Path) -> dict[str, bytes]:
    return {p.relative_to(project).as_posix(): p.read_bytes() for p in project.rglob("*")
            if p.is_file() and p.relative_to(project).parts[0] not in OURS}


def _assert_restored(project: Path, before: dict[str, bytes]) -> None:
    """Every source byte for byte; besides them only build outputs (no .orig/.rej, no new sources)."""
    after = _sources(project)
    assert {name: after.get(name) for name in before} == before
    assert [name for name in after if name.endswith((".orig", ".rej", ".c", ".h"))] == \
        [name for name in before if name.endswith((".orig", ".rej", ".c", ".h"))]


def _patch_make(project: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([PATCH_MAKE, *args], cwd=project, capture_output=True, text=True, check=False,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _patched_live(program: Path, patchroot: Path, name: str) -> None:
    """Start the original-stage ``program``, apply ``patchroot``, see the fixed output."""
    patient = Patient([str(program)])
    try:
        patient.wait_for(lambda line: line.startswith(f"{name} UNPATCHED"), after=0)
        applied = ctl("patch", "-p", str(patient.pid), str(patchroot))
        assert applied.returncode == 0, applied.stderr
        line = patient.wait_for(lambda line: line.startswith(f"{name} PATCHED"), timeout=10)
        assert int(line.split()[-1]) % 3 == 0
        assert patient.alive()
    finally:
        patient.stop()


@pytest.mark.parametrize("name, tool, configure_args", [
    ("cmakedemo", "cmake", ()),
    ("mesondemo", "meson", ("--configure-arg=--buildtype=debugoptimized",)),
])
def test_cmake_and_meson_projects_are_detected_built_and_patched_live(tmp_path, name, tool, configure_args):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: make setup-debian installs it (packaging-debian.txt)")
    project = Path(shutil.copytree(FIXTURES / name, tmp_path / name))
    before = _sources(project)
    result = _patch_make(project, *configure_args, "fix.patch")
    assert f"stage configure: {tool}" in result.stderr
    assert f"stage patched: {tool}" in result.stderr
    assert "1 unit compiled, 1 diffed (1 changed)" in result.stderr     # only the patched unit rebuilt
    program = project / "lpmake" / "usr" / "local" / "bin" / name
    (patch,) = (project / "patchroot").glob("*.kpatch")
    assert patch.name == build_id_of(program) + ".kpatch"
    assert "replaces greet" in result.stdout
    _assert_restored(project, before)
    _patched_live(program, project / "patchroot", name)
    # A second run reuses the configured build dir; --clean starts from a fresh one.
    again = _patch_make(project, "fix.patch")
    assert "stage configure" not in again.stderr
    clean = _patch_make(project, "--clean", *configure_args, "fix.patch")
    assert f"stage configure: {tool}" in clean.stderr
    _assert_restored(project, before)


def test_build_and_install_commands_of_the_user(tmp_path):
    project = Path(shutil.copytree(FIXTURES / "nonpie", tmp_path / "nonpie"))
    (project / "Makefile").rename(project / "build.mk")        # nothing to detect: the commands say it all
    before = _sources(project)
    result = _patch_make(project, "--build-cmd", 'make -f build.mk CC="$CC"',
                         "--install-cmd", 'make -f build.mk install DESTDIR="$DESTDIR"', "fix.patch")
    assert "stage original: build command" in result.stderr
    assert "stage patched: install command" in result.stderr
    program = project / "lpmake" / "usr" / "local" / "bin" / "nonpie"
    assert (project / "patchroot" / f"{build_id_of(program)}.kpatch").is_file()
    _assert_restored(project, before)


def test_tree_without_a_build_system_is_refused(tmp_path):
    (tmp_path / "fix.patch").write_text("")
    result = subprocess.run([PATCH_MAKE, "fix.patch"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "no Makefile, CMakeLists.txt or meson.build" in result.stderr and "--build-cmd" in result.stderr
