"""patchbuild/comdat_link.py on real g++ 12 objects: which COMDAT functions a unit emits and
which it changed (a <symbol>.kpatch group), read from objects and ar archive members; a link
where one unit changed an inline function or template instance and another emits it
unchanged is refused naming both; a unit that only starts to use an unchanged inline
function (new in its diff) or was told to ignore the change does not stop the link."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from plugins.module_utils.careengine.asm import gensrc
from plugins.module_utils.careengine.errors import BuildError, UnpatchableChange
from plugins.module_utils.careengine.patchbuild import comdat_link

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

HEADER = """
#ifdef OLD_TWICE
template <typename T> __attribute__((noinline)) T twice(T value) { return value * 2; }
#else
template <typename T> __attribute__((noinline)) T twice(T value) { return value * FACTOR; }
#endif
inline __attribute__((noinline)) int halve(int n) { return n / 2; }
"""
TWICE = "_Z5twiceIiET_S0_"
HALVE = "_Z5halvei"


def _object(tmp_path: Path, name: str, body: str, *flags: str, patched_body: str | None = None,
            patched_flags: tuple[str, ...] = ("-DFACTOR=3",)) -> str:
    """``name``.o as the patched stage writes it: the original (FACTOR=2) diffed against the patched."""
    texts = []
    for stage, source, extra in (("old", body, ("-DFACTOR=2",)), ("new", patched_body or body, patched_flags)):
        (tmp_path / stage).mkdir(exist_ok=True)
        (tmp_path / stage / f"{name}.cc").write_text(HEADER + source)
        subprocess.run(["g++", "-O2", *flags, *extra, "-S", "-o", f"{name}.s", f"{name}.cc"], cwd=tmp_path / stage,
                       check=True)
        texts.append((tmp_path / stage / f"{name}.s").read_text())
    result = gensrc.generate(*texts)
    (tmp_path / f"{name}.s").write_text(result.text if result.changed_functions or result.new_functions else texts[0])
    subprocess.run(["g++", "-c", "-o", str(tmp_path / f"{name}.o"), str(tmp_path / f"{name}.s")], check=True)
    return str(tmp_path / f"{name}.o")


def test_a_changed_and_an_unchanged_copy_are_read_and_refused_by_name(tmp_path):
    left = _object(tmp_path, "left", "int left(int n) { return twice(n) + halve(n); }\n")
    right = _object(tmp_path, "right", "int right(int n) { return twice(n); }\n", "-DOLD_TWICE")
    assert comdat_link.read_units(left) == [comdat_link.LinkedUnit(
        "left.cc", frozenset({TWICE, HALVE}), frozenset({TWICE}))]
    assert comdat_link.read_units(right) == [comdat_link.LinkedUnit("right.cc", frozenset({TWICE}), frozenset())]
    with pytest.raises(UnpatchableChange) as refused:
        comdat_link.check_link([right, left])
    assert str(refused.value) == ("int twice<int>(int): changed in left.cc but not in right.cc "
                                  "(compiled with other flags or macros?)")
    comdat_link.check_link([left, right], ignored=lambda unit: (TWICE,) if unit == "right.cc" else ())
    comdat_link.check_link([right])                     # nothing changed: nothing to agree on


def test_archive_members_count_as_units_in_archives_and_thin_archives(tmp_path):
    left = _object(tmp_path, "left", "int left(int n) { return twice(n); }\n")
    right = _object(tmp_path, "right", "int right(int n) { return twice(n); }\n", "-DOLD_TWICE")
    long_name = tmp_path / "a_member_name_longer_than_sixteen.o"       # in the archive's name table
    shutil.copyfile(right, long_name)
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    for archive, thin in ((tmp_path / "libparts.a", []), (tmp_path / "libthin.a", ["--thin"])):
        subprocess.run(["ar", "rcs", *thin, str(archive), str(notes), str(long_name), right], check=True)
        assert [unit.name for unit in comdat_link.read_units(str(archive))] == ["right.cc", "right.cc"]
        with pytest.raises(UnpatchableChange, match=r"changed in left\.cc but not in right\.cc, right\.cc"):
            comdat_link.check_link([left, str(archive)])


def test_every_unit_changed_or_a_new_use_of_an_unchanged_function_is_accepted(tmp_path):
    left = _object(tmp_path, "left", "int left(int n) { return twice(n); }\n")
    right = _object(tmp_path, "right", "int right(int n) { return twice(n); }\n")
    # new: halve is emitted in the patched unit only (a new use of an unchanged inline function)
    uses = _object(tmp_path, "uses", "int uses(int n) { return n; }\n", patched_flags=("-DFACTOR=2",),
                   patched_body="int uses(int n) { return halve(n); }\n")
    other = _object(tmp_path, "other", "int other(int n) { return halve(n); }\n", patched_flags=("-DFACTOR=2",))
    assert comdat_link.read_units(uses)[0].changed == frozenset()
    comdat_link.check_link([left, right, uses, other])


def test_inputs_that_are_not_objects_are_left_to_the_linker_and_corrupt_ones_named(tmp_path):
    script = tmp_path / "link.ld"
    script.write_text("INPUT(a.o)\n")
    assert comdat_link.read_units(str(script)) == []
    assert comdat_link.read_units(str(tmp_path / "missing.o")) == []
    left = Path(_object(tmp_path, "left", "int left(int n) { return twice(n); }\n"))
    cut = tmp_path / "cut.o"
    cut.write_bytes(left.read_bytes()[:200])
    with pytest.raises(BuildError, match=r"cut\.o: cannot read its COMDAT groups"):
        comdat_link.read_units(str(cut))


def test_objects_with_more_sections_than_the_header_counts_are_read(tmp_path):
    """Past 0xff00 sections ELF keeps the count in section 0 and section indices of
    symbols in SHT_SYMTAB_SHNDX: a COMDAT function placed after 70000 sections is found."""
    lines = [f'\t.section\t.text.f{number},"ax",@progbits\nf{number}:\n\tret' for number in range(70000)]
    lines.append('\t.section\t.text.late,"axG",@progbits,late,comdat\n\t.weak\tlate\n\t.type\tlate, @function\n'
                 "late:\n\tret\n")
    (tmp_path / "many.s").write_text("\t.file\t\"many.cc\"\n" + "\n".join(lines))
    subprocess.run(["as", "-o", str(tmp_path / "many.o"), str(tmp_path / "many.s")], check=True)
    assert comdat_link.read_units(str(tmp_path / "many.o")) == [
        comdat_link.LinkedUnit("many.cc", frozenset({"late"}), frozenset())]


def test_archives_named_by_l_options_are_found_in_the_l_directories(tmp_path):
    left = _object(tmp_path, "left", "int left(int n) { return twice(n); }\n")
    right = _object(tmp_path, "right", "int right(int n) { return twice(n); }\n", "-DOLD_TWICE")
    libraries = tmp_path / "lib"
    libraries.mkdir()
    subprocess.run(["ar", "rcs", str(libraries / "libparts.a"), right], check=True)
    archive = str(libraries / "libparts.a")
    assert comdat_link.library_inputs(["-O2", "-L", str(tmp_path / "none"), f"-L{libraries}", "-lparts", "-lm"]) \
        == [archive]
    assert comdat_link.library_inputs(["-L", str(libraries), "-l", ":libparts.a"]) == [archive]
    with pytest.raises(UnpatchableChange, match=r"changed in left\.cc but not in right\.cc"):
        comdat_link.check_link([left, *comdat_link.library_inputs([f"-L{libraries}", "-lparts"])])
    (libraries / "libparts.so").write_bytes(b"")                 # ld takes the shared one: not ours to read
    assert comdat_link.library_inputs([f"-L{libraries}", "-lparts"]) == []
    assert comdat_link.library_inputs(["-static", f"-L{libraries}", "-lparts"]) == [archive]
