"""libcare-patch-make on the fixture projects: real make, real gcc, real patches."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine import patchfile
from plugins.module_utils.careengine.errors import BuildError
from plugins.module_utils.careengine.patchbuild import project_build

pytest.importorskip("plugins.module_utils.careengine.asm.gensrc", reason="the asm diff has not landed yet")

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures" / "projects"
PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
CC_ARG = f"CC={ROOT / 'bin' / 'libcare-cc'}"
BUILD_OUTPUTS = re.compile(r"(^|/)(lpmake|\.lpmaketmp|patchroot)(/|$)|\.o$|\.so$|\.d$|(^|/)\.kpatch_|^demo$|^nonpie$|^configured$")


@pytest.fixture
def libdemo(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "libdemo", tmp_path / "libdemo"))


@pytest.fixture
def nonpie(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "nonpie", tmp_path / "nonpie"))


def _patch_make(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PATCH_MAKE, "-m", CC_ARG, *args], cwd=project, capture_output=True, text=True,
                          check=False)


def _sources(directory: Path) -> dict[str, bytes]:
    found = {}
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and not BUILD_OUTPUTS.search(relative):
            found[relative] = path.read_bytes()
    return found


def _readelf_build_id(path: Path) -> str:
    notes = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", notes).group(1)


def _patches(project: Path) -> dict[str, patchfile.PatchSummary]:
    summaries = {}
    for path in sorted((project / "patchroot").glob("*.kpatch")):
        summaries[path.name[: -len(".kpatch")]] = patchfile.summarize(patchfile.load_patch(str(path)))
    return summaries


def _assert_tree_restored(project: Path, fixture: str) -> None:
    assert _sources(project) == _sources(FIXTURES / fixture)
    leftovers = [p.name for p in project.rglob("*") if p.suffix in (".orig", ".rej") or "lpmakeorig" in p.name]
    assert leftovers == []


def _assert_symbols_designate_the_original(patch_path: Path, obj: Path) -> None:
    """Every named symbol of a placeholder section lands on that symbol in the original."""
    with open(obj, "rb") as stream:
        original = {}
        for symbol in ELFFile(stream).get_section_by_name(".symtab").iter_symbols():
            original.setdefault(symbol.name, set()).add(symbol["st_value"])
    image = ELFFile(io.BytesIO(patchfile.load_patch(str(patch_path)).elf_image))
    checked = 0
    for symbol in image.get_section_by_name(".symtab").iter_symbols():
        if not symbol.name or not isinstance(symbol["st_shndx"], int):
            continue
        section = image.get_section(symbol["st_shndx"])
        if section["sh_type"] == "SHT_NOBITS" and symbol["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT"):
            assert section["sh_addr"] + symbol["st_value"] in original[symbol.name], symbol.name
            checked += 1
    assert checked >= 1


def _assert_patch_for(summary: patchfile.PatchSummary, obj: Path, replaced: set[str]) -> None:
    _assert_symbols_designate_the_original(obj.parents[4] / "patchroot" / f"{summary.build_id}.kpatch", obj)
    assert summary.build_id == _readelf_build_id(obj)
    assert {f.name for f in summary.functions} >= replaced
    assert all(f.orig_size >= 5 and f.new_size > 0 for f in summary.functions)
    assert summary.level == 0
    assert summary.sections[".kpatch.text"] > 0
    assert summary.sections[".kpatch.info"] == (len(summary.functions) + len(summary.new_functions)) * 48 + 24


def test_libdemo_gets_one_patch_per_changed_object(libdemo):
    result = _patch_make(libdemo, "fix.patch")
    assert result.returncode == 0, result.stderr
    for stage in ("stage original: make", "stage original: make install", "stage patched: make",
                  "stage patched: make install", "reverting the patches"):
        assert stage in result.stderr
    patches = _patches(libdemo)
    program = libdemo / "lpmake" / "usr" / "local" / "bin" / "demo"
    library = libdemo / "lpmake" / "usr" / "local" / "lib" / "libdemo.so"
    assert set(patches) == {_readelf_build_id(program), _readelf_build_id(library)}
    _assert_patch_for(patches[_readelf_build_id(program)], program, {"app_report"})
    library_patch = patches[_readelf_build_id(library)]
    _assert_patch_for(library_patch, library, {"demo_report"})
    assert "demo_twice" in library_patch.new_functions
    _assert_tree_restored(libdemo, "libdemo")


def test_section_garbage_collection_keeps_the_patch(libdemo):
    result = _patch_make(libdemo, "-m", "CFLAGS=-O2 -g -ffunction-sections -fdata-sections",
                         "-m", "LDFLAGS=-Wl,--gc-sections", "fix.patch")
    assert result.returncode == 0, result.stderr
    assert len(_patches(libdemo)) == 2
    library = libdemo / "lpmake" / "usr" / "local" / "lib" / "libdemo.so"
    _assert_patch_for(_patches(libdemo)[_readelf_build_id(library)], library, {"demo_report"})


def test_unchanged_object_gets_no_patch(libdemo):
    result = _patch_make(libdemo, "-j", "2", "lib-only.patch")
    assert result.returncode == 0, result.stderr
    library = libdemo / "lpmake" / "usr" / "local" / "lib" / "libdemo.so"
    assert list(_patches(libdemo)) == [_readelf_build_id(library)]
    patched_log = (libdemo / ".lpmaketmp" / "patched-all.log").read_text()
    assert "libdemo.c" in patched_log and "main.c" not in patched_log   # only what the patch touches
    _assert_tree_restored(libdemo, "libdemo")


def test_update_and_clean(libdemo):
    assert _patch_make(libdemo, "fix.patch").returncode == 0
    first = {path.name: path.read_bytes()[400:] for path in (libdemo / "patchroot").glob("*.kpatch")}
    update = _patch_make(libdemo, "--update")
    assert update.returncode == 0, update.stderr
    assert "stage" not in update.stderr                       # nothing built
    updated = {path.name: path.read_bytes()[400:] for path in (libdemo / "patchroot").glob("*.kpatch")}
    assert updated == first                                   # same patches (build time aside)
    clean = _patch_make(libdemo, "--clean", "fix.patch")
    assert clean.returncode == 0, clean.stderr
    assert "cleaning" in clean.stderr and "stage original: make clean" in clean.stderr
    assert sorted(p.name for p in (libdemo / "patchroot").glob("*.kpatch")) == sorted(first)
    _assert_tree_restored(libdemo, "libdemo")


def test_tree_built_without_the_wrapper_needs_clean(nonpie):
    subprocess.run(["make", "-s"], cwd=nonpie, check=True, capture_output=True)   # plain gcc build
    stale = _patch_make(nonpie, "fix.patch")
    assert stale.returncode == 0, stale.stderr
    assert "replaces no function" in stale.stderr and "--clean" in stale.stderr
    clean = _patch_make(nonpie, "--clean", "fix.patch")
    assert clean.returncode == 0, clean.stderr
    assert "replaces no function" not in clean.stderr
    assert [f.name for f in next(iter(_patches(nonpie).values())).functions] == ["report"]


def test_nonpie_string_literal_and_static_local(nonpie):
    result = _patch_make(nonpie, "fix.patch")
    assert result.returncode == 0, result.stderr
    program = nonpie / "lpmake" / "usr" / "local" / "bin" / "nonpie"
    patches = _patches(nonpie)
    assert list(patches) == [_readelf_build_id(program)]
    summary = patches[_readelf_build_id(program)]
    _assert_patch_for(summary, program, {"report"})
    _assert_tree_restored(nonpie, "nonpie")


def test_project_configured_with_libcare_cc(tmp_path):
    project = Path(shutil.copytree(FIXTURES / "configured", tmp_path / "configured"))
    environment = {k: v for k, v in os.environ.items() if k != "KPATCH_STAGE"}
    environment["CC"] = CC_ARG[len("CC="):]
    subprocess.run(["./configure"], cwd=project, env=environment, check=True, capture_output=True)
    assert not list(project.glob(".kpatch_*")), "configure probes pass through"
    configured_tree = _sources(project)
    result = subprocess.run([PATCH_MAKE, "fix.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    program = project / "lpmake" / "usr" / "local" / "bin" / "configured"
    summary = _patches(project)[_readelf_build_id(program)]
    _assert_patch_for(summary, program, {"greeting_state"})
    assert [f.name for f in summary.functions] == ["greeting_state"]
    assert _sources(project) == configured_tree


def test_stripping_install_uses_the_build_tree(nonpie):
    makefile = nonpie / "Makefile"
    makefile.write_text(makefile.read_text().replace("install -D -m 755", "install -s -D -m 755"))
    tree = _sources(nonpie)
    result = _patch_make(nonpie, "fix.patch")
    assert result.returncode == 0, result.stderr
    program = nonpie / "lpmake" / "usr" / "local" / "bin" / "nonpie"
    assert b".symtab" not in program.read_bytes()          # the install really stripped it
    summary = _patches(nonpie)[_readelf_build_id(program)]
    assert [f.name for f in summary.functions] == ["report"]
    assert _sources(nonpie) == tree


def test_failing_patched_build_shows_the_error_and_restores_the_tree(libdemo):
    broken = (libdemo / "broken.patch")
    broken.write_text(
        "--- a/main.c\n+++ b/main.c\n@@ -7,3 +7,3 @@\n {\n-\tprintf(\"demo UNPATCHED %d\\n\", counter);\n"
        "+\tprintf(\"demo UNPATCHED %d\\n\", counter) no_such_token;\n }\n")
    result = _patch_make(libdemo, "lib-only.patch", "broken.patch")
    assert result.returncode != 0
    assert "error" in result.stderr and "no_such_token" in result.stderr   # gcc's own message
    assert "reverting the patches" in result.stderr
    broken.unlink()
    _assert_tree_restored(libdemo, "libdemo")
    # The tree is usable again, and the next original build really is the original.
    again = _patch_make(libdemo, "fix.patch")
    assert again.returncode == 0, again.stderr
    assert len(_patches(libdemo)) == 2


def test_patch_that_does_not_apply_changes_nothing(libdemo):
    (libdemo / "stale.patch").write_text("--- a/main.c\n+++ b/main.c\n@@ -1,1 +1,1 @@\n-no such line\n+x\n")
    result = _patch_make(libdemo, "lib-only.patch", "stale.patch")
    assert result.returncode != 0 and "does not apply" in result.stderr
    (libdemo / "stale.patch").unlink()
    _assert_tree_restored(libdemo, "libdemo")


def test_build_patches_api_installs_levels(libdemo, tmp_path):
    store = tmp_path / "store"
    first = project_build.build_patches(str(libdemo), [str(libdemo / "fix.patch")], dest=str(store), make_args=[CC_ARG])
    assert len(first.patches) == 2
    for built in first.patches:
        assert built.level == 1
        assert os.path.isfile(built.stored_path) and os.path.isfile(built.path)
        assert os.readlink(store / built.build_id / "latest") == "1"
        assert built.object.startswith(str(libdemo / "lpmake"))
        assert built.functions
        assert patchfile.load_patch(built.stored_path).level == 1
    again = project_build.build_patches(str(libdemo), [str(libdemo / "fix.patch")], dest=str(store), make_args=[CC_ARG])
    assert [p.level for p in again.patches] == [1, 1]          # same patch, same level
    (tmp_path / "level2.patch").write_text(
        "--- a/libdemo.c\n+++ b/libdemo.c\n@@ -10,3 +10,3 @@\n {\n"
        "-\tprintf(\"libdemo UNPATCHED %d\\n\", demo_value(counter));\n"
        "+\tprintf(\"libdemo UNPATCHED %d\\n\", demo_value(counter) + 7);\n }\n")
    other = project_build.build_patches(str(libdemo), [str(tmp_path / "level2.patch")], dest=str(store),
                              make_args=[CC_ARG])
    assert [p.level for p in other.patches] == [2]              # another patch for the library
    assert other.patches[0].functions == ("demo_report",)
    _assert_tree_restored(libdemo, "libdemo")


def test_too_small_function_is_refused(libdemo, tmp_path):
    # demo_value compiles to 4 bytes (lea; ret): no room for a 5-byte jump.
    (tmp_path / "small.patch").write_text(
        "--- a/libdemo.c\n+++ b/libdemo.c\n@@ -5,3 +5,3 @@\n {\n-\treturn counter + 1;\n"
        "+\treturn counter + 2;\n }\n")
    with pytest.raises(BuildError, match="demo_value is too small"):
        project_build.build_patches(str(libdemo), [str(tmp_path / "small.patch")], make_args=[CC_ARG])
    _assert_tree_restored(libdemo, "libdemo")


def test_build_patches_refuses_missing_project(tmp_path):
    with pytest.raises(BuildError):
        project_build.build_patches(str(tmp_path / "missing"), ["x.patch"])
