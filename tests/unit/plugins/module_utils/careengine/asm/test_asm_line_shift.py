"""``__LINE__`` immediates shifted by inserted lines are not changes (with gcc -g).

tests/fixtures/asm/line_shift: five functions use an assert-like ``CHECK`` macro that
passes ``__LINE__``; the patch inserts five lines above them and changes ``changed``
(a real change) and ``threshold`` (a literal that becomes the new line number of its
CHECK: still a change, the constant is not its own statement's line). With ``-g`` only
those two are replaced; without ``-g`` nothing tells a line number from a constant and
every shifted function is replaced (the rule's scope).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from plugins.module_utils.careengine.asm import gensrc, parse

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

FIXTURE = Path(__file__).resolve().parents[6] / "tests" / "fixtures" / "asm" / "line_shift"
SHIFTED = ("first", "second", "changed", "threshold", "last")
REALLY_CHANGED = ("changed", "threshold")


def compile_to_asm(source: Path, directory: Path, flags: tuple[str, ...]) -> str:
    """gcc -S of ``source`` copied to ``directory/unit.c``; the assembler text."""
    directory.mkdir(parents=True)
    shutil.copyfile(source, directory / "unit.c")
    subprocess.run(["gcc", "-S", *flags, "-o", "unit.s", "unit.c"], cwd=directory, check=True)
    return (directory / "unit.s").read_text()


def diff_fixture(flags: tuple[str, ...], tmp_path: Path) -> gensrc.GensrcResult:
    original = compile_to_asm(FIXTURE / "orig.c", tmp_path / "orig", flags)
    patched = compile_to_asm(FIXTURE / "patched.c", tmp_path / "patched", flags)
    return gensrc.generate(original, patched, filename="unit.c")


@pytest.mark.parametrize("flags", [("-O0", "-g"), ("-O2", "-g"), ("-O3", "-g"), ("-O2", "-g", "-fPIC")],
                         ids=" ".join)
def test_with_debug_info_only_real_changes_are_replaced(flags: tuple[str, ...], tmp_path: Path) -> None:
    result = diff_fixture(flags, tmp_path)
    assert sorted(result.changed_functions) == sorted(REALLY_CHANGED)
    assert result.new_functions == ()
    for unchanged in set(SHIFTED) - set(REALLY_CHANGED):
        assert f"{unchanged}.kpatch" not in result.text
    (tmp_path / "out.s").write_text(result.text)
    subprocess.run(["gcc", "-c", "-o", "out.o", "out.s"], cwd=tmp_path, check=True)


@pytest.mark.parametrize("flags", [("-O0",), ("-O2",)], ids=" ".join)
def test_without_debug_info_every_shifted_function_is_replaced(flags: tuple[str, ...], tmp_path: Path) -> None:
    result = diff_fixture(flags, tmp_path)
    assert sorted(result.changed_functions) == sorted(SHIFTED)


def test_the_shift_really_is_in_the_immediates(tmp_path: Path) -> None:
    """The fixture does what it claims: first() differs only in its __LINE__ (10 -> 15)."""
    original = compile_to_asm(FIXTURE / "orig.c", tmp_path / "orig", ("-O0", "-g"))
    patched = compile_to_asm(FIXTURE / "patched.c", tmp_path / "patched", ("-O0", "-g"))
    assert "movl\t$10, %esi" in original and "movl\t$10, %esi" not in patched
    assert "movl\t$15, %esi" in patched


FUNCTION = """\
\t.file\t"unit.c"
\t.text
\t.file 1 "{file}"
\t.globl\tf
\t.type\tf, @function
f:
\t.loc 1 {line} 5
{body}
\tcall\treport_failure@PLT
\t.loc 1 {next} 1
\tret
\t.size\tf, .-f
"""


def diff_one_function(original: dict[str, object], patched: dict[str, object]) -> tuple[str, ...]:
    def text(values: dict[str, object]) -> str:
        fields = {"file": "unit.c", "next": 99, **values}
        return FUNCTION.format(**fields)

    return gensrc.generate(text(original), text(patched)).changed_functions


LINE_SHIFT_CASES = {
    "line immediate follows its .loc": (
        {"line": 10, "body": "\tmovl\t$10, %esi"}, {"line": 15, "body": "\tmovl\t$15, %esi"}, ()),
    "several immediates, each a line": (
        {"line": 10, "body": "\tmovl\t$10, %esi\n\tmovl\t$10, %edx"},
        {"line": 15, "body": "\tmovl\t$15, %esi\n\tmovl\t$15, %edx"}, ()),
    "original value is not its line": (
        {"line": 10, "body": "\tmovl\t$9, %esi"}, {"line": 15, "body": "\tmovl\t$14, %esi"}, ("f",)),
    "patched value is not its line": (
        {"line": 10, "body": "\tmovl\t$10, %esi"}, {"line": 15, "body": "\tmovl\t$16, %esi"}, ("f",)),
    "register changed too": (
        {"line": 10, "body": "\tmovl\t$10, %esi"}, {"line": 15, "body": "\tmovl\t$15, %edx"}, ("f",)),
    "displacement, not an immediate": (
        {"line": 10, "body": "\tmovl\t%eax, 10(%rsp)"}, {"line": 15, "body": "\tmovl\t%eax, 15(%rsp)"}, ("f",)),
    "other source file": (
        {"line": 10, "body": "\tmovl\t$10, %esi"}, {"line": 15, "body": "\tmovl\t$15, %esi", "file": "other.h"},
        ("f",)),
    "data directive": (
        {"line": 10, "body": "\t.long\t10"}, {"line": 15, "body": "\t.long\t15"}, ("f",)),
}


@pytest.mark.parametrize("case", LINE_SHIFT_CASES, ids=str)
def test_line_immediate_rule(case: str) -> None:
    original, patched, changed = LINE_SHIFT_CASES[case]
    assert diff_one_function(original, patched) == changed


def test_without_loc_any_difference_is_a_change() -> None:
    original = FUNCTION.format(file="unit.c", line=10, next=99, body="\tmovl\t$10, %esi").replace("\t.loc 1 10 5\n", "")
    patched = FUNCTION.format(file="unit.c", line=15, next=99, body="\tmovl\t$15, %esi").replace("\t.loc 1 15 5\n", "")
    assert ".loc 1 10" not in original
    assert gensrc.generate(original, patched).changed_functions == ("f",)


def test_loc_of_the_previous_function_does_not_carry_over() -> None:
    """A function without its own .loc does not inherit the last one of the function before."""
    before = "\t.globl\tg\n\t.type\tg, @function\ng:\n\t.loc 1 {line} 1\n\tret\n\t.size\tg, .-g\n"
    original = FUNCTION.format(file="unit.c", line=10, next=99, body="\tmovl\t$10, %esi").replace("\t.loc 1 10 5\n", "")
    patched = FUNCTION.format(file="unit.c", line=15, next=99, body="\tmovl\t$15, %esi").replace("\t.loc 1 15 5\n", "")
    original = original.replace("\t.globl\tf\n", before.format(line=10) + "\t.globl\tf\n")
    patched = patched.replace("\t.globl\tf\n", before.format(line=15) + "\t.globl\tf\n")
    assert gensrc.generate(original, patched).changed_functions == ("f",)


def test_lines_carry_the_source_position_of_the_nearest_loc() -> None:
    text = FUNCTION.format(file="dir/unit.c", line=10, next=12, body="\tmovl\t$10, %esi")
    sources = {line.text: line.source for line in parse.parse(text).lines if line.kind is parse.Kind.INSTRUCTION}
    assert sources == {
        "movl\t$10, %esi": parse.SourceLine("dir/unit.c", 10),
        "call\treport_failure@PLT": parse.SourceLine("dir/unit.c", 10),
        "ret": parse.SourceLine("dir/unit.c", 12),
    }
