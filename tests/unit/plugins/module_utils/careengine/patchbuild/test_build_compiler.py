"""libcare-cc: exact pass-through, kept assembler, no added diagnostics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine.patchbuild import compiler

ROOT = Path(__file__).resolve().parents[6]
LIBCARE_CC = str(ROOT / "bin" / "libcare-cc")
GCC = "/usr/bin/gcc"

SOURCE = r"""
#include <stdio.h>
static int counter;
int bump(int x);
int bump(int x) { return x + counter++; }
int main(void) { printf("%d\n", bump(2)); return 0; }
"""
STRICT = ["-O2", "-Wall", "-Wextra", "-Werror", "-Wmissing-prototypes", "-Wstrict-prototypes", "-pedantic"]


def _run(argv, cwd, stage=None, compiler_path=LIBCARE_CC):
    env = dict(os.environ)
    env.pop("KPATCH_STAGE", None)
    if stage is not None:
        env["KPATCH_STAGE"] = stage
    return subprocess.run([compiler_path, *argv], cwd=cwd, env=env, capture_output=True, check=False)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "a.c").write_text(SOURCE)
    (tmp_path / "b.c").write_text("int helper(void);\nint helper(void) { return 42; }\n")
    return tmp_path


def _kept(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".kpatch_"))


@pytest.mark.parametrize("stage", [None, "configure", "original", "patched"])
@pytest.mark.parametrize("argv", [["--version"], ["-dumpversion"], ["-print-prog-name=as"], ["-E", "a.c"],
                                  ["-M", "a.c"], ["-MM", "a.c"], ["-v", "-E", "a.c"]],
                         ids=["version", "dumpversion", "print", "E", "M", "MM", "vE"])
def test_queries_pass_through_exactly(project, stage, argv):
    ours = _run(argv, project, stage)
    real = _run(argv, project, compiler_path=GCC)
    assert ours.returncode == real.returncode == 0
    assert ours.stdout == real.stdout
    if "-v" not in argv:
        assert ours.stderr == real.stderr
    assert _kept(project) == []


@pytest.mark.parametrize("stage", [None, "configure"])
def test_configure_stage_is_exactly_gcc(project, stage):
    ours = _run(["-O2", "-g", "-c", "a.c", "-o", "ours.o"], project, stage)
    real = _run(["-O2", "-g", "-c", "a.c", "-o", "real.o"], project, compiler_path=GCC)
    assert ours.returncode == real.returncode == 0
    assert ours.stderr == real.stderr == b""
    assert (project / "ours.o").read_bytes() == (project / "real.o").read_bytes()
    assert _kept(project) == []


def test_conftest_passes_through_in_any_stage(project):
    (project / "conftest.c").write_text("int main(void) { return 0; }\n")
    result = _run(["-o", "conftest", "conftest.c"], project, "original")
    assert result.returncode == 0
    assert _kept(project) == []
    with open(project / "conftest", "rb") as stream:
        assert ELFFile(stream).get_section_by_name(".rela.text") is None   # no -Wl,-q added


def test_original_stage_keeps_assembler_and_adds_no_warnings(project):
    result = _run([*STRICT, "-c", "a.c", "-o", "a.o"], project, "original")
    assert result.returncode == 0
    assert result.stdout == result.stderr == b""
    assert _kept(project) == [".kpatch_a.original.aux", ".kpatch_a.original.s"]
    assert "bump" in (project / ".kpatch_a.original.s").read_text()
    assert "bump" in (project / ".kpatch_a.original.aux").read_text()
    real = _run(["-O2", "-c", "a.c", "-o", "real.o"], project, compiler_path=GCC)
    assert real.returncode == 0
    assert (project / "a.o").read_bytes() == (project / "real.o").read_bytes()


def test_compiler_errors_are_the_compilers(project):
    (project / "bad.c").write_text("int broken(void) { return undeclared_name; }\n")
    ours = _run(["-c", "bad.c", "-o", "bad.o"], project, "original")
    assert ours.returncode != 0
    assert b"undeclared_name" in ours.stderr and b"error" in ours.stderr
    assert not (project / "bad.o").exists()


def test_dependency_file_names_the_object(project):
    (project / "obj").mkdir()
    result = _run(["-O2", "-MD", "-MP", "-c", "a.c", "-o", "obj/a.o"], project, "original")
    assert result.returncode == 0 and result.stderr == b""
    dependencies = (project / "obj" / "a.d").read_text()
    assert dependencies.startswith("obj/a.o:")
    assert _kept(project / "obj") == [".kpatch_a.original.aux", ".kpatch_a.original.s"]


def test_preprocessor_dependency_option_names_the_object(project):
    result = _run(["-O2", "-Wp,-MD,a.dep", "-c", "a.c", "-o", "a.o"], project, "original")
    assert result.returncode == 0 and result.stderr == b""
    assert (project / "a.dep").read_text().startswith("a.o:")


def test_dash_S_writes_the_assembler(project):
    result = _run(["-O2", "-S", "a.c", "-o", "a.s"], project, "original")
    assert result.returncode == 0
    assert (project / "a.s").read_text() == (project / ".kpatch_a.original.s").read_text()


def test_several_sources_with_dash_c(project):
    result = _run(["-O2", "-c", "a.c", "b.c"], project, "original")
    assert result.returncode == 0 and result.stderr == b""
    assert (project / "a.o").exists() and (project / "b.o").exists()
    assert ".kpatch_b.original.s" in _kept(project)


def _has_emitted_relocs(path: Path) -> bool:
    with open(path, "rb") as stream:
        return ELFFile(stream).get_section_by_name(".rela.text") is not None


def test_link_keeps_relocations(project):
    assert _run(["-O2", "-c", "a.c", "-o", "a.o"], project, "original").returncode == 0
    result = _run(["-o", "prog", "a.o"], project, "original")
    assert result.returncode == 0 and result.stderr == b""
    assert _has_emitted_relocs(project / "prog")
    assert subprocess.run([str(project / "prog")], capture_output=True, check=True).stdout == b"2\n"


def test_compile_and_link_in_one_command(project):
    result = _run([*STRICT, "-o", "prog", "a.c", "b.c", "-lm"], project, "original")
    assert result.returncode == 0 and result.stderr == b""
    assert _has_emitted_relocs(project / "prog")
    assert ".kpatch_a.original.s" in _kept(project) and ".kpatch_b.original.s" in _kept(project)
    assert not any(p.name.endswith(".lcc.o") for p in project.iterdir())


def test_parse_invocation():
    inv = compiler.parse_invocation(["-O2", "-I", "inc", "-c", "x.c", "-o", "out/x.o", "-MF", "x.d"])
    assert inv.mode == "-c" and inv.output == "out/x.o"
    assert inv.sources == [("", "x.c")]
    assert inv.flags == ["-O2", "-I", "inc", "-MF", "x.d"]
    assert compiler.parse_invocation(["-xc", "-c", "-"]).query
    assert compiler.parse_invocation(["--version"]).query
    assert compiler.kept_asm_path("out/x", "original").endswith("out/.kpatch_x.original.s")


def test_output_to_dev_null_is_a_probe(project):
    result = _run(["-O2", "-Wall", "-c", "a.c", "-o", "/dev/null"], project, "original")
    assert result.returncode == 0 and result.stderr == b""
    assert _kept(project) == []


def test_patched_stage_without_original_assembler_treats_everything_as_new(project):
    pytest.importorskip("plugins.module_utils.careengine.asm.gensrc")
    result = _run(["-O2", "-c", "b.c", "-o", "b.o"], project, "patched")
    assert result.returncode == 0, result.stderr
    assert ".kpatch_b.s" in _kept(project)
    with open(project / "b.o", "rb") as stream:
        assert ELFFile(stream).get_section_by_name(".kpatch.text") is not None


def test_patched_stage_adds_no_warnings_and_instruments(project):
    pytest.importorskip("plugins.module_utils.careengine.asm.gensrc")
    assert _run([*STRICT, "-c", "a.c", "-o", "a.o"], project, "original").returncode == 0
    (project / "a.c").write_text(SOURCE.replace("return x + counter++;", "return 2 * x + counter++;"))
    result = _run([*STRICT, "-c", "a.c", "-o", "a.o"], project, "patched")
    assert result.returncode == 0 and result.stdout == result.stderr == b""
    assert ".kpatch_a.s" in _kept(project) and ".kpatch_a.patched.s" in _kept(project)
    with open(project / "a.o", "rb") as stream:
        elf = ELFFile(stream)
        assert elf.get_section_by_name(".kpatch.info") is not None
        names = {s.name for s in elf.get_section_by_name(".symtab").iter_symbols()}
    assert "bump.kpatch" in names


def test_patched_stage_refuses_a_signature_change(project):
    pytest.importorskip("plugins.module_utils.careengine.asm.gensrc")
    assert _run(["-O2", "-c", "a.c", "-o", "a.o"], project, "original").returncode == 0
    (project / "a.c").write_text(SOURCE.replace("int bump(int x)", "long bump(long x)"))
    result = _run(["-O2", "-c", "a.c", "-o", "a.o"], project, "patched")
    assert result.returncode != 0
    assert b"bump" in result.stderr and b"libcare-cc" in result.stderr


def test_pass_through_path_imports_no_elf_reader():
    code = ("import sys; from plugins.module_utils.careengine import cli; "
            "from plugins.module_utils.careengine.patchbuild import compiler; "
            "print(sorted(m for m in sys.modules if m.startswith(('elftools', 'subprocess'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
