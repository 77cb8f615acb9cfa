"""C++ inline functions and template instances (COMDAT groups) patched live, once and
consistently: the fixture project cxxinline (tests/fixtures/projects/cxxinline) changes, in
its header, an inline function (inlined by two units, one out-of-line copy reached through
a pointer) and a template instance two units emit. The patch replaces each function once,
at the copy the original link kept, and every caller shows the new answers; unpatch
brings back the old ones (built at -O2 and at -O0). Refused, named: units whose new copies
differ (other flags), a kept original copy other than the one the patch was made for, and a
unit that emits the changed function unchanged (a macro kept its old body; or make did not
recompile it: it has the function from another header)."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "apply"))
from apply_helpers import Patient, ctl  # noqa: E402

PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
DUMP = str(ROOT / "bin" / "libcare-dump")
FIXTURE = ROOT / "tests" / "fixtures" / "projects" / "cxxinline"
LINE_RE = re.compile(r"^cxxinline (\d+) left (-?\d+) (-?\d+) right (-?\d+) (-?\d+) pointer (-?\d+)$")
# Flags of every unit -> the functions the patch replaces: at -O2 scale() is inlined into
# left_scale and right_scale (patched too); at -O0 nothing is inlined, each unit calls the copies.
BUILDS = {
    "O2": (None, {"_Z5scalei": "scale(int)", "_Z10left_scalei": "left_scale(int)",
                  "_Z5shiftIiET_S0_": "int shift<int>(int)", "_Z11right_scalei": "right_scale(int)"}),
    "O0": ("-O0 -g", {"_Z5scalei": "scale(int)", "_Z5shiftIiET_S0_": "int shift<int>(int)"}),
}


def _expected(counter: int, patched: bool) -> tuple[int, ...]:
    """left: scale, shift; right: scale(n+1)-2, shift; scale through a pointer (calc.h)."""
    factor, step = (3, 7) if patched else (2, 1)
    return (factor * counter, counter + step, factor * (counter + 1) - 2, counter + step, factor * counter)


def _answers(line: str) -> tuple[int, tuple[int, ...]] | None:
    found = LINE_RE.match(line)
    if found is None:
        return None
    counter, *answers = (int(value) for value in found.groups())
    return counter, tuple(answers)


def _copy(parent: Path) -> Path:
    """A fresh copy of the fixture (not group-writable: libcare-ctl loads only what root alone controls)."""
    project = parent / "cxxinline"
    shutil.copytree(FIXTURE, project)
    project.chmod(0o755)
    return project


def _build(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PATCH_MAKE, "fix.patch"], cwd=project, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module", params=sorted(BUILDS))
def built(request, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict[str, str]]:
    flags, replaced = BUILDS[request.param]
    project = _copy(tmp_path_factory.mktemp("cxxinline"))
    if flags:
        makefile = (project / "Makefile").read_text()
        (project / "Makefile").write_text(makefile.replace("CXXFLAGS ?= -O2 -g -Wall", f"CXXFLAGS ?= {flags}"))
    return project, _build(project), replaced


def _rounds_in(patient: Patient, start: int, count: int, patched: bool) -> None:
    """``count`` whole lines after line ``start`` (the first one may have been cut by the
    patch: left out) all give the answers of that state."""
    patient.wait_for(lambda _line: sum(1 for line in patient.lines[start:] if _answers(line)) >= count + 1,
                     timeout=20, after=start)
    parsed = [answer for answer in map(_answers, patient.lines[start:]) if answer][1:count + 1]
    assert all(answers == _expected(counter, patched) for counter, answers in parsed), (patched, parsed)


def test_each_inline_function_and_template_instance_is_replaced_once(built):
    project, result, expected = built
    assert result.returncode == 0, result.stderr
    replaced = re.search(r"replaces (.*)$", result.stdout, re.MULTILINE).group(1)
    assert sorted(replaced.split(", ")) == sorted(expected.values())    # shift<int>: emitted by 2 units, once
    patch = next((project / "patchroot").glob("*.kpatch"))
    dumped = subprocess.run([DUMP, str(patch)], capture_output=True, text=True, check=True).stdout
    assert sorted(re.findall(r"^replaces: (\S+)", dumped, re.MULTILINE)) == sorted(expected)


def test_every_call_site_gives_the_new_answers_live_and_the_old_after_unpatch(built):
    project, result, _ = built
    assert result.returncode == 0, result.stderr
    patient = Patient([str(project / "lpmake" / "usr" / "local" / "bin" / "cxxinline")])
    try:
        _rounds_in(patient, 0, 3, patched=False)
        applied = ctl("patch", "-p", str(patient.pid), str(project / "patchroot"))
        assert applied.returncode == 0, applied.stderr
        _rounds_in(patient, len(patient.lines), 5, patched=True)
        removed = ctl("unpatch", "-p", str(patient.pid))
        assert removed.returncode == 0, removed.stderr
        _rounds_in(patient, len(patient.lines), 5, patched=False)
        assert patient.alive()
    finally:
        patient.stop()


def test_units_whose_new_copies_differ_are_refused_by_name(tmp_path):
    project = _copy(tmp_path)
    with (project / "Makefile").open("a") as makefile:
        makefile.write("right.o: CXXFLAGS = -O0 -g\n")       # right.cpp's copies are not left.cpp's
    result = _build(project)
    assert result.returncode == 1
    assert re.search(r"scale\(int\), int shift<int>\(int\): inline function or template instance changed "
                     r"differently in different units", result.stderr), result.stderr
    assert not list((project / "patchroot").glob("*.kpatch"))


def test_a_kept_original_copy_of_another_length_is_refused(tmp_path):
    """main.o (first in the link, -O0) keeps its own copy of shift<int> and its change is
    ignored there: the patch's record comes from left.o, whose copy is not the one kept."""
    project = _copy(tmp_path)
    main = (project / "main.cpp").read_text()
    rounds = "long rounds = argc > 1 ? atol(argv[1]) : -1;"
    assert rounds in main
    (project / "main.cpp").write_text(main.replace(rounds, "long rounds = argc > 1 ? shift(atoi(argv[1])) - 1 : -1;"))
    with (project / "Makefile").open("a") as makefile:
        makefile.write("main.o: CXXFLAGS = -O0 -g\n")
    result = subprocess.run([PATCH_MAKE, "fix.patch"], cwd=project, capture_output=True, text=True, check=False,
                            env={**os.environ, "KPCC_PATCH_ARGS": "--ignore-changes=main.cpp:_Z5shiftIiET_S0_"})
    assert result.returncode == 1
    assert re.search(r"int shift<int>\(int\): the original keeps a copy of \d+ bytes, the patch replaces one of "
                     r"\d+", result.stderr), result.stderr


# calc.h variant: a macro keeps shift's old body in the units that define OLD_SHIFT; the
# patch changes only the other branch (each unit's .o emits shift<int> in a COMDAT group).
OLD_SHIFT_HEADER = ("template <typename T> __attribute__((noinline)) T shift(T value)\n{\n"
                    "#ifdef OLD_SHIFT\n\tvolatile T step = 1;\n#else\n\tvolatile T step = 1;\n#endif\n"
                    "\treturn value + step;\n}\n")


def _old_shift_variant(project: Path, old_shift_units: str) -> str:
    """calc.h with the OLD_SHIFT branch (the returned text) and a fix.patch that changes
    shift only outside it; ``old_shift_units`` (make targets) are compiled with -DOLD_SHIFT."""
    header = (project / "calc.h").read_text()
    start = header.index("template <typename T>")
    end = header.index("}\n", start) + 2
    original = header[:start] + OLD_SHIFT_HEADER + header[end:]
    patched = original.replace("#else\n\tvolatile T step = 1;", "#else\n\tvolatile T step = 7;")
    (project / "calc.h").write_text(original)
    diff = difflib.unified_diff(original.splitlines(keepends=True), patched.splitlines(keepends=True),
                                "a/calc.h", "b/calc.h")
    (project / "fix.patch").write_text("".join(diff))
    with (project / "Makefile").open("a") as makefile:
        makefile.write(f"{old_shift_units}: CXXFLAGS += -DOLD_SHIFT\n")
    return original


@pytest.mark.parametrize("flags", [None, "-O0 -g"], ids=["O2", "O0"])
def test_a_unit_whose_copy_a_macro_kept_unchanged_is_refused_by_name(tmp_path, flags):
    """right.cpp keeps shift's old body (OLD_SHIFT), left.cpp gets the new one: the patch
    would replace the copy the program kept with left.cpp's for both, so it is refused
    at the patched link naming the function and both units; the sources are restored."""
    project = _copy(tmp_path)
    if flags:
        makefile = (project / "Makefile").read_text()
        (project / "Makefile").write_text(makefile.replace("CXXFLAGS ?= -O2 -g -Wall", f"CXXFLAGS ?= {flags}"))
    header = _old_shift_variant(project, "right.o")
    result = _build(project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"int shift<int>\(int\): changed in left\.cpp but not in right\.cpp \(compiled with other "
                     r"flags or macros\?\)", result.stderr), result.stderr
    assert not list((project / "patchroot").glob("*.kpatch"))
    assert (project / "calc.h").read_text() == header


def test_units_that_all_keep_the_old_copy_do_not_stop_the_patch(tmp_path):
    """main.cpp now calls shift too; with OLD_SHIFT in no unit, left.o, right.o and main.o
    all change it: accepted, shift<int> replaced once."""
    project = _copy(tmp_path)
    main = (project / "main.cpp").read_text()
    rounds = "long rounds = argc > 1 ? atol(argv[1]) : -1;"
    (project / "main.cpp").write_text(main.replace(rounds, "long rounds = argc > 1 ? shift(atoi(argv[1])) - 1 : -1;"))
    _old_shift_variant(project, "nothing.o")
    result = _build(project)
    assert result.returncode == 0, result.stderr
    assert re.search(r"replaces .*int shift<int>\(int\)", result.stdout), result.stdout


def test_a_unit_make_did_not_recompile_that_has_the_copy_from_another_header_is_refused(tmp_path):
    """other.cpp has shift<int> from other.h (the same template), not from calc.h: make does
    not recompile it for the patch, so its copy stays the original one; refused by name."""
    project = _copy(tmp_path)
    header = (project / "calc.h").read_text()
    start = header.index("template <typename T>")
    template = header[start:header.index("}\n", start) + 2]
    (project / "other.h").write_text(f"#ifndef CXXINLINE_OTHER_H\n#define CXXINLINE_OTHER_H\n{template}#endif\n")
    (project / "other.cpp").write_text('#include "other.h"\n\nint other_shift(int n)\n{\n\treturn shift(n);\n}\n')
    makefile = (project / "Makefile").read_text().replace("OBJECTS = main.o", "OBJECTS = other.o main.o")
    (project / "Makefile").write_text(makefile + "other.o: other.cpp other.h\n\t$(CXX) $(CXXFLAGS) -c -o $@ $<\n")
    result = _build(project)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "make: 3 units compiled, 3 diffed" in result.stderr, result.stderr     # other.o: not recompiled
    assert re.search(r"int shift<int>\(int\): changed in left\.cpp, right\.cpp but not in other\.cpp",
                     result.stderr), result.stderr
    assert (project / "calc.h").read_text() == header
