"""C++ exceptions through live-patched code: a patched function that calls a function
that throws lets the exception pass to its caller's handler, a patched function with
its own handler catches it, exactly as before the patch; unpatch restores the old code;
and a patch whose unwind tables the patient cannot register is refused, never applied."""

from __future__ import annotations

import json
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
CTL = str(ROOT / "bin" / "libcare-ctl")

SOURCE = r"""#include <cstdio>
#include <stdexcept>
#include <string>

__attribute__((noinline)) int thrower(int n)
{
	if (n % 3 == 0)
		throw std::runtime_error("three " + std::to_string(n));
	return n;
}

__attribute__((noinline)) int through(int n)
{
	return thrower(n) * 10;
}

__attribute__((noinline)) int catcher(int n)
{
	try {
		return thrower(n) + 1;
	} catch (const std::runtime_error &error) {
		std::printf("inner %d caught %s\n", n, error.what());
		return -1;
	}
}

extern "C" void report(int round)
{
	try {
		std::printf("through %d %d\n", round, through(round));
	} catch (const std::exception &error) {
		std::printf("outer %d caught %s\n", round, error.what());
	}
	std::printf("catcher %d %d\n", round, catcher(round));
	std::fflush(stdout);
}
"""
MAIN_C = r"""#include <stdlib.h>
#include <unistd.h>
void report(int round);
int main(int argc, char **argv)
{
	for (int i = 0;; i++) {
		report(i);
		usleep(20000);
	}
	return 0;
}
"""
MAKEFILE = """all: throws
throws.o: throws.cc
\t$(CXX) -O2 -g -c -o $@ throws.cc
main.o: main.c
\t$(CC) -O2 -g -c -o $@ main.c
throws: throws.o main.o
\t$(CXX) -o $@ throws.o main.o
install: all
\tinstall -D -m 755 throws $(DESTDIR)/usr/bin/throws
.PHONY: all install
"""
CHANGES = (("return thrower(n) * 10;", "return thrower(n) * 100;"), ("return -1;", "return -2;"))


def _diff(project: Path, name: str, changes) -> str:
    work = project.parent / "diff"
    shutil.rmtree(work, ignore_errors=True)
    text = (project / name).read_text()
    changed = text
    for old, new in changes:
        assert old in changed
        changed = changed.replace(old, new)
    for side, content in (("a", text), ("b", changed)):
        (work / side).mkdir(parents=True)
        (work / side / name).write_text(content)
    return subprocess.run(["diff", "-u", f"a/{name}", f"b/{name}"], cwd=work, capture_output=True, text=True,
                          check=False).stdout


def _build(tmp_path_factory, link_flags: str) -> Path:
    project = tmp_path_factory.mktemp("throws") / "throws"
    project.mkdir()
    (project / "throws.cc").write_text(SOURCE)
    (project / "main.c").write_text(MAIN_C)
    (project / "Makefile").write_text(MAKEFILE.replace("$(CXX) -o $@", f"$(CXX) {link_flags} -o $@"))
    (project / "throws.patch").write_text(_diff(project, "throws.cc", CHANGES))
    result = subprocess.run([PATCH_MAKE, "throws.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "through(int)" in result.stdout and "catcher(int)" in result.stdout
    return project


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "")


@pytest.fixture(scope="module")
def built_static(tmp_path_factory) -> Path:
    """libgcc and libstdc++ linked into the executable: the unwinder is its own copy."""
    return _build(tmp_path_factory, "-static-libgcc -static-libstdc++")


def _round_lines(patient: Patient, start: int) -> dict[int, list[str]]:
    """Output lines from index ``start``, by the round they name."""
    rounds: dict[int, list[str]] = {}
    for line in patient.lines[start:]:
        found = re.match(r"^\w+ (\d+) ", line)
        if found:
            rounds.setdefault(int(found.group(1)), []).append(line)
    return rounds


def _expected(round_number: int, patched: bool) -> list[str]:
    factor, handled = (100, -2) if patched else (10, -1)
    if round_number % 3 == 0:
        return [f"outer {round_number} caught three {round_number}",
                f"inner {round_number} caught three {round_number}", f"catcher {round_number} {handled}"]
    return [f"through {round_number} {round_number * factor}", f"catcher {round_number} {round_number + 1}"]


def _complete_rounds(patient: Patient, start: int, count: int, timeout: float = 20) -> dict[int, list[str]]:
    """At least ``count`` whole rounds printed after line ``start`` (the first and the
    last may be cut by the patch: they are left out)."""
    patient.wait_for(lambda _line: len(_round_lines(patient, start)) >= count + 2, timeout=timeout, after=start)
    rounds = _round_lines(patient, start)
    numbers = sorted(rounds)[1:-1]
    return {number: rounds[number] for number in numbers}


def test_patch_carries_unwind_tables_that_libcare_dump_reads(built):
    patch = next((built / "patchroot").glob("*.kpatch"))
    dumped = subprocess.run([DUMP, "--json", str(patch)], capture_output=True, text=True, check=False)
    assert dumped.returncode == 0, dumped.stderr
    sections = json.loads(dumped.stdout)
    text = json.dumps(sections)
    for name in (".kpatch.eh_frame", ".kpatch.gcc_except_table", ".kpatch.eh_object"):
        assert name in text


def test_exceptions_through_patched_code_are_caught_where_they_were(built):
    patient = Patient([str(built / "lpmake" / "usr" / "bin" / "throws")])
    try:
        before = _complete_rounds(patient, 0, 6)
        assert all(lines == _expected(number, False) for number, lines in before.items()), before
        applied = ctl("patch", "-p", str(patient.pid), str(built / "patchroot"))
        assert applied.returncode == 0, applied.stderr
        after = _complete_rounds(patient, len(patient.lines), 7)
        assert any(number % 3 == 0 for number in after)            # thrown through the patched code
        assert all(lines == _expected(number, True) for number, lines in after.items()), after
        removed = ctl("unpatch", "-p", str(patient.pid))
        assert removed.returncode == 0, removed.stderr
        restored = _complete_rounds(patient, len(patient.lines), 7)
        assert all(lines == _expected(number, False) for number, lines in restored.items()), restored
        # patched again after the unpatch (the registration was released and is made anew)
        again = ctl("patch", "-p", str(patient.pid), str(built / "patchroot"))
        assert again.returncode == 0, again.stderr
        repatched = _complete_rounds(patient, len(patient.lines), 7)
        assert all(lines == _expected(number, True) for number, lines in repatched.items()), repatched
        assert patient.alive()
    finally:
        patient.stop()


def test_static_libgcc_registers_in_the_executables_own_unwinder(built_static):
    program = built_static / "lpmake" / "usr" / "bin" / "throws"
    assert "libgcc_s" not in subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout
    patient = Patient([str(program)])
    try:
        _complete_rounds(patient, 0, 3)
        applied = ctl("patch", "-p", str(patient.pid), str(built_static / "patchroot"))
        assert applied.returncode == 0, applied.stderr
        after = _complete_rounds(patient, len(patient.lines), 7)
        assert all(lines == _expected(number, True) for number, lines in after.items()), after
        removed = ctl("unpatch", "-p", str(patient.pid))
        assert removed.returncode == 0, removed.stderr
        assert patient.alive()
    finally:
        patient.stop()


def test_a_patient_whose_unwinder_cannot_be_found_is_refused(built_static, tmp_path):
    """Stripped, the executable's copy of libgcc has no names: the C++ patch is refused
    (an exception through it would terminate the process) and the old code keeps running."""
    stripped = tmp_path / "throws"
    shutil.copy(built_static / "lpmake" / "usr" / "bin" / "throws", stripped)
    subprocess.run(["strip", str(stripped)], check=True)
    patient = Patient([str(stripped)])
    try:
        _complete_rounds(patient, 0, 3)
        refused = ctl("patch", "-p", str(patient.pid), str(built_static / "patchroot"))
        assert refused.returncode != 0
        assert "__register_frame_info" in refused.stdout + refused.stderr
        after = _complete_rounds(patient, len(patient.lines), 4)
        assert all(lines == _expected(number, False) for number, lines in after.items()), after
    finally:
        patient.stop()


def _ctl_killed_at(fault: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIBCARE_FAULT_INJECT=fault)
    return subprocess.run([CTL, *args], capture_output=True, text=True, check=False, timeout=60, env=env)


def _each_line_old_or_new(rounds: dict[int, list[str]]) -> bool:
    return all(set(lines) <= set(_expected(number, False)) | set(_expected(number, True))
               for number, lines in rounds.items())


@pytest.mark.parametrize("operation, fault", [
    ("patch", "after:write-image"),       # written, not sealed: code and data pages are one range in the maps
    ("patch", "at:call-return"),          # __register_frame_info returned, the engine dies in the stub
    ("patch", "before:safety-check"),     # registered, no jump yet
    ("patch", "after:jump"),              # registered, one jump of two
    ("unpatch", "before:unmap"),          # the old code runs again; the tables are still registered
    ("unpatch", "at:call-return"),        # deregistered, the mapping not unmapped yet
])
def test_a_killed_engine_leaves_exceptions_working_and_the_next_run_finishes(built, operation, fault):
    patient = Patient([str(built / "lpmake" / "usr" / "bin" / "throws")])
    patchroot = str(built / "patchroot")
    try:
        _complete_rounds(patient, 0, 3)
        if operation == "unpatch":
            assert ctl("patch", "-p", str(patient.pid), patchroot).returncode == 0
        killed = _ctl_killed_at(fault, operation, "-p", str(patient.pid), *((patchroot,) if operation == "patch"
                                                                         else ()))
        assert killed.returncode == -9, (killed.returncode, killed.stderr)      # the fault was reached
        between = _complete_rounds(patient, len(patient.lines), 4)              # throws go on being caught
        assert _each_line_old_or_new(between), between
        removed = ctl("unpatch", "-p", str(patient.pid))                        # finishes the interrupted run
        assert removed.returncode == 0, removed.stdout + removed.stderr
        restored = _complete_rounds(patient, len(patient.lines), 7)
        assert all(lines == _expected(number, False) for number, lines in restored.items()), restored
        assert ctl("patch", "-p", str(patient.pid), patchroot).returncode == 0
        patched = _complete_rounds(patient, len(patient.lines), 7)
        assert all(lines == _expected(number, True) for number, lines in patched.items()), patched
        assert patient.alive()
    finally:
        patient.stop()
