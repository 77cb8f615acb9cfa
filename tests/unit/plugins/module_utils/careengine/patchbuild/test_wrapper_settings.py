"""libcare-cc with LibCare's KPCC_* settings and compile lines of every shape: real gcc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from plugins.module_utils.careengine.patchbuild import compiler, project_build

ROOT = Path(__file__).resolve().parents[6]
LIBCARE_CC = str(ROOT / "bin" / "libcare-cc")

PROGRAM = r"""
#include <stdio.h>
#ifdef BROKEN
#error built with -DBROKEN
#endif
#ifndef VALUE
#define VALUE 0
#endif
int twice(int x);
int twice(int x) { return 2 * x + VALUE; }
int main(void) { printf("%d\n", twice(VALUE)); return 0; }
"""
TWO_FUNCTIONS = """
int first(int x);
int second(int x);
int first(int x) { return x + %d; }
int second(int x) { return x * %d; }
"""


def _cc(argv, cwd, stage="original", **settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KPCC_", "KPATCH_"))}
    env["KPATCH_STAGE"] = stage
    env.update(settings)
    return subprocess.run([LIBCARE_CC, *argv], cwd=cwd, env=env, capture_output=True, text=True, check=False)


@pytest.fixture
def unit(tmp_path):
    (tmp_path / "prog.c").write_text(PROGRAM)
    return tmp_path


def _output_of(program: Path) -> str:
    return subprocess.run([str(program)], capture_output=True, text=True, check=True).stdout.strip()


def test_remove_args_drops_an_argument(unit):
    assert _cc(["-DBROKEN", "-c", "prog.c"], unit).returncode != 0
    removed = _cc(["-DBROKEN", "-c", "prog.c"], unit, KPCC_REMOVE_ARGS="-DBROKEN;-Wunused")
    assert removed.returncode == 0, removed.stderr
    assert (unit / ".kpatch_prog.original.s").is_file()


def test_append_args_reach_compile_and_link(unit):
    built = _cc(["-O2", "-o", "prog", "prog.c"], unit, KPCC_APPEND_ARGS="-DVALUE=7")
    assert built.returncode == 0, built.stderr
    assert _output_of(unit / "prog") == "21"


def test_debug_shows_the_commands(unit):
    quiet = _cc(["-c", "prog.c"], unit)
    assert quiet.stderr == ""
    loud = _cc(["-c", "prog.c"], unit, KPCC_DEBUG="1")
    assert loud.returncode == 0
    assert "-S -o .kpatch_prog.original.s" in loud.stderr and "-x assembler" in loud.stderr


def test_patch_args_ignore_changes_and_refuse_unknown_options(tmp_path):
    (tmp_path / "two.c").write_text(TWO_FUNCTIONS % (1, 2))
    assert _cc(["-O2", "-c", "two.c"], tmp_path).returncode == 0
    (tmp_path / "two.c").write_text(TWO_FUNCTIONS % (5, 6))
    libcare_default = "--force-gotpcrel;--os=rhel6"
    ignored = _cc(["-O2", "-c", "two.c"], tmp_path, "patched",
                  KPCC_PATCH_ARGS=libcare_default + ";--ignore-changes=two.c:second")
    assert ignored.returncode == 0, ignored.stderr
    instrumented = (tmp_path / ".kpatch_two.s").read_text()
    assert "first.kpatch" in instrumented and "second.kpatch" not in instrumented
    both = _cc(["-O2", "-c", "two.c"], tmp_path, "patched", KPCC_PATCH_ARGS=libcare_default,
               KPCC_DBGFILTER_ARGS="--dbg-filter;--dbg-filter-eh-frame;--dbg-filter-gcc-except-table;--os=rhel6")
    assert both.returncode == 0, both.stderr
    assert "second.kpatch" in (tmp_path / ".kpatch_two.s").read_text()
    unknown = _cc(["-O2", "-c", "two.c"], tmp_path, "patched", KPCC_PATCH_ARGS="--unlink-symbols=first")
    assert unknown.returncode != 0 and "--unlink-symbols" in unknown.stderr


def test_response_file_is_expanded(unit):
    (unit / "args.rsp").write_text('-O2 "-DVALUE=3"\n-c prog.c -o "out dir.o"\n')
    built = _cc(["@args.rsp"], unit)
    assert built.returncode == 0, built.stderr
    assert (unit / "out dir.o").is_file() and (unit / ".kpatch_out dir.original.s").is_file()
    assert compiler.expand_response_files(["@missing.rsp", "-c"]) == ["@missing.rsp", "-c"]


@pytest.mark.parametrize("argv, kept", [
    (["-pipe", "-O2", "-MD", "-MQ", "obj/prog.o", "-o", "obj/prog.o", "-c", "prog.c"], "obj/.kpatch_prog.original.s"),
    (["-o", "obj/prog.o", "-O2", "-c", "prog.c", "-MD", "-MF", "obj/prog.d"], "obj/.kpatch_prog.original.s"),
    (["-c", "prog.c", "other.c", "-O2"], ".kpatch_other.original.s"),
])
def test_compile_lines_of_any_shape(unit, argv, kept):
    (unit / "obj").mkdir()
    (unit / "other.c").write_text("int other(void);\nint other(void) { return 1; }\n")
    built = _cc(argv, unit)
    assert built.returncode == 0, built.stderr
    assert (unit / kept).is_file()
    if "-MD" in argv:
        assert "obj/prog.o:" in (unit / "obj" / "prog.d").read_text()


def test_builds_see_is_libcare_cc(tmp_path):
    (tmp_path / "Makefile").write_text("all:\n\techo \"$$IS_LIBCARE_CC $$KPATCH_STAGE\" > seen.txt\n")
    project_build.ProjectBuild(str(tmp_path), str(tmp_path)).make("original")
    assert (tmp_path / "seen.txt").read_text() == "y original\n"
