"""C++ units go through kept assembler and the asm diff: a changed leaf member function is
patched live (exceptions thrown and caught around it keep working), a change of a class's
virtual interface is refused naming the class (demangled), never left out of the patch
unnoticed. Exceptions through patched code: test_cxx_exceptions_live.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "apply"))
from apply_helpers import Patient, ctl  # noqa: E402

PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
LIBCARE_CXX = str(ROOT / "bin" / "libcare-c++")

SHAPES = r"""#include <cstdio>
#include <stdexcept>
#include <string>

struct Shape {
	virtual ~Shape() {}
	virtual int area() const = 0;
};
struct Square : Shape {
	int side;
	explicit Square(int s) : side(s) {}
	int area() const override;
};

__attribute__((noinline)) int Square::area() const { return side * side; }

namespace geo {
__attribute__((noinline)) int check(int n)
{
	if (n < 0)
		throw std::runtime_error("negative");
	return n + 1;
}
}

extern "C" void report(int round);
void report(int round)
{
	Square square(round % 3);
	const Shape &shape = square;
	try {
		std::printf("shapes %s %d\n", std::to_string(geo::check(round % 3 - 1)).c_str(), shape.area());
	} catch (const std::exception &error) {
		std::printf("shapes caught %s\n", error.what());
	}
	std::fflush(stdout);
}
"""
MAIN_C = r"""#include <stdlib.h>
#include <unistd.h>
void report(int round);
int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 3;
	for (int i = 0; rounds < 0 || i < rounds; i++) {
		report(i);
		if (rounds < 0)
			usleep(20000);
	}
	return 0;
}
"""
MAKEFILE = """all: shapes
shapes.o: shapes.cc
\t$(CXX) -O2 -g -c -o $@ shapes.cc
main.o: main.c
\t$(CC) -O2 -g -c -o $@ main.c
shapes: shapes.o main.o
\t$(CXX) -o $@ shapes.o main.o
install: all
\tinstall -D -m 755 shapes $(DESTDIR)/usr/bin/shapes
.PHONY: all install
"""


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "shapes"
    project.mkdir()
    (project / "shapes.cc").write_text(SHAPES)
    (project / "main.c").write_text(MAIN_C)
    (project / "Makefile").write_text(MAKEFILE)
    return project


def _diff(project: Path, name: str, old: str, new: str) -> str:
    work = project.parent / "diff"
    shutil.rmtree(work, ignore_errors=True)
    text = (project / name).read_text()
    assert old in text
    for side, content in (("a", text), ("b", text.replace(old, new))):
        (work / side).mkdir(parents=True)
        (work / side / name).write_text(content)
    return subprocess.run(["diff", "-u", f"a/{name}", f"b/{name}"], cwd=work, capture_output=True, text=True,
                          check=False).stdout


def _patched_live_then_unpatched(project: Path, patched_lines: tuple[str, ...]) -> None:
    """The built program runs, is patched live (each of ``patched_lines`` printed, and a throw
    and its catch still work), then unpatched (the original answer again), alive throughout."""
    patient = Patient([str(project / "lpmake" / "usr" / "bin" / "shapes"), "-1"])
    try:
        patient.wait_for(lambda line: line == "shapes 2 4", timeout=10, after=0)
        applied = ctl("patch", "-p", str(patient.pid), str(project / "patchroot"))
        assert applied.returncode == 0, applied.stderr
        seen = len(patient.lines)
        for expected in patched_lines:
            patient.wait_for(lambda line, expected=expected: line == expected, timeout=10, after=seen)
        patient.wait_for(lambda line: line == "shapes caught negative", timeout=10, after=seen)
        removed = ctl("unpatch", "-p", str(patient.pid))
        assert removed.returncode == 0, removed.stderr
        patient.wait_for(lambda line: line == "shapes 2 4", timeout=10)
        assert patient.alive()
    finally:
        patient.stop()


def test_changed_virtual_interface_is_refused_by_its_demangled_class_name(tmp_path):
    project = _project(tmp_path)
    (project / "cxx.patch").write_text(_diff(project, "shapes.cc", "virtual int area() const = 0;",
                                             "virtual int area() const = 0;\n\tvirtual int sides() const;"))
    before = {p.name: p.read_bytes() for p in project.iterdir() if p.is_file()}
    result = subprocess.run([PATCH_MAKE, "cxx.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert re.search(r"the (vtable|typeinfo|typeinfo name) of class (Shape|Square) changed", result.stderr), \
        result.stderr
    assert "reverting the patches" in result.stderr
    after = {name: (project / name).read_bytes() for name in before}
    assert after == before


def test_c_change_in_a_mixed_project_builds_and_cxx_output_is_unchanged(tmp_path):
    project = _project(tmp_path)
    (project / "c.patch").write_text(_diff(project, "main.c", "usleep(20000)", "usleep(30000)"))
    result = subprocess.run([PATCH_MAKE, "c.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "replaces main" in result.stdout
    program = project / "lpmake" / "usr" / "bin" / "shapes"
    run = subprocess.run([str(program)], capture_output=True, text=True, check=True, env=dict(os.environ))
    assert run.stdout.splitlines() == ["shapes caught negative", "shapes 1 1", "shapes 2 4"]
    assert (project / ".kpatch_shapes.original.s").is_file()     # the C++ unit went through kept assembler


def test_changed_leaf_member_function_is_patched_live_and_exceptions_still_work(tmp_path):
    project = _project(tmp_path)
    (project / "area.patch").write_text(_diff(project, "shapes.cc", "return side * side;",
                                              "return side * side + 1000;"))
    before = {p.name: p.read_bytes() for p in project.iterdir() if p.is_file()}
    result = subprocess.run([PATCH_MAKE, "area.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "replaces Square::area() const" in result.stdout          # reported demangled
    assert {name: (project / name).read_bytes() for name in before} == before
    # A throw and its catch around the patched virtual call work as before.
    _patched_live_then_unpatched(project, ("shapes 2 1004", "shapes 1 1001"))


def test_new_code_uses_the_classes_vtables_and_typeinfo_as_they_are(tmp_path):
    """Patched and new code refer to class data the program has: report() builds a Square (its
    vtable), a new kind() asks dynamic_cast (both classes' typeinfo); live, the virtual call,
    the cast and the exception's catch all answer right."""
    project = _project(tmp_path)
    old = '\t\tstd::printf("shapes %s %d\\n", std::to_string(geo::check(round % 3 - 1)).c_str(), shape.area());'
    new = ('\t\tstd::printf("shapes %s %d %s\\n", std::to_string(geo::check(round % 3 - 1)).c_str(), shape.area(),\n'
           '\t\t            kind(shape));')
    helper = ('__attribute__((noinline)) const char *kind(const Shape &shape)\n'
              '{\n\treturn dynamic_cast<const Square *>(&shape) ? "square" : "other";\n}\n\n'
              'extern "C" void report(int round);')
    text = (project / "shapes.cc").read_text()
    assert old in text
    patched = text.replace(old, new).replace('extern "C" void report(int round);', helper)
    work = tmp_path / "diff"
    for side, content in (("a", text), ("b", patched)):
        (work / side).mkdir(parents=True)
        (work / side / "shapes.cc").write_text(content)
    (project / "kind.patch").write_text(subprocess.run(["diff", "-u", "a/shapes.cc", "b/shapes.cc"], cwd=work,
                                                       capture_output=True, text=True, check=False).stdout)
    result = subprocess.run([PATCH_MAKE, "kind.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "replaces report" in result.stdout and "kind(Shape const&)" in result.stdout, result.stdout
    _patched_live_then_unpatched(project, ("shapes 2 4 square", "shapes 1 1 square"))
