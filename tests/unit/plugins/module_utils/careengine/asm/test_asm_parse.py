"""Parsing, section tracking, normalisation and naming rules of the asm package, on small texts."""

from __future__ import annotations

import pytest

from plugins.module_utils.careengine.asm import match, normalize, parse
from plugins.module_utils.careengine.errors import AsmParseError

SPLITS = (
    ("\tmovl\t$1, %eax", ["movl\t$1, %eax"]),
    ("foo: movl $1, %eax # comment", ["foo:", "movl $1, %eax"]),
    ('\t.string\t"a;b#c: d"  ; nop', ['.string\t"a;b#c: d"', "nop"]),
    ('\t.string\t"quote \\" ; inside"', ['.string\t"quote \\" ; inside"']),
    ("\tmovl\t%fs:counter@tpoff, %eax", ["movl\t%fs:counter@tpoff, %eax"]),
    ("1:\t.long 0", ["1:", ".long 0"]),
    ("# 0 \"\" 2", []),
    ("", []),
)


@pytest.mark.parametrize(("physical", "statements"), SPLITS)
def test_split_statements(physical: str, statements: list[str]) -> None:
    assert parse.split_statements(physical) == statements


KINDS = (
    (".LC0:", parse.Kind.LABEL),
    (".LVL3:", parse.Kind.DEBUG_LABEL),
    (".LCOLDB1:", parse.Kind.DEBUG_LABEL),
    (".Ldebug_info0:", parse.Kind.DEBUG_LABEL),
    ("foo.cold:", parse.Kind.LABEL),
    (".p2align 4,,10", parse.Kind.ALIGN),
    (".globl\tfoo", parse.Kind.ATTRIBUTE),
    (".cfi_startproc", parse.Kind.CFI),
    ('.file\t"unit.c"', parse.Kind.FILE),
    ('.file 1 "unit.c"', parse.Kind.DEBUG),
    (".loc 1 5 3 view .LVU3", parse.Kind.DEBUG),
    (".quad\t.LC2", parse.Kind.DATA),
    (".comm\tcalls.0,4,4", parse.Kind.COMM),
    (".set\tg,real_g", parse.Kind.SET),
    ("call\tputs@PLT", parse.Kind.INSTRUCTION),
    (".pushsection .kpatch.text,\"ax\",@progbits", parse.Kind.SECTION),
)


@pytest.mark.parametrize(("statement", "kind"), KINDS)
def test_classify(statement: str, kind: parse.Kind) -> None:
    assert parse.classify(statement)[0] is kind


def test_sections_follow_previous_push_and_pop() -> None:
    text = "\n".join((
        "\t.text", "a:", "\t.section\t.rodata,\"a\"", "b:", "\t.previous", "c:",
        "\t.pushsection\t.data", "d:", "\t.pushsection\t.bss", "e:", "\t.popsection", "f:", "\t.popsection", "g:",
        "\t.section\t.debug_info,\"\",@progbits", "\t.long\t0", "\t.data", "h:",
    ))
    lines, specs = parse.parse_lines(text)
    sections = {line.head: line.section for line in lines if line.kind is parse.Kind.LABEL}
    assert sections == {"a": ".text", "b": ".rodata", "c": ".text", "d": ".data", "e": ".bss", "f": ".data",
                        "g": ".text", "h": ".data"}
    assert specs[".rodata"] == '.rodata,"a"'
    assert not any(line.section_after == ".debug_info" for line in lines)


def test_debug_sections_are_skipped_but_their_section_changes_and_ident_are_seen() -> None:
    text = "\n".join((
        "\t.section\t.debug_info,\"\",@progbits", ".Ldebug_info0:", "\t.long\t0x1f", "\t.string\t\"a;b\"",
        "\t.byte\t1; .text", "x:", "\t.section\t.debug_str,\"MS\",@progbits,1", ".LASF0:", "",
        "\t.string\t\"c\"", "\t.ident\t\"GCC\"", "\t.pushsection\t.data", "y:", "\t.popsection", "z:",
    ))
    lines, _ = parse.parse_lines(text)
    assert [(line.head, line.section) for line in lines if line.kind is parse.Kind.LABEL] == [
        ("x", ".text"), ("y", ".data")]
    assert [line.kind for line in lines if line.section == ".debug_str"] == [parse.Kind.IDENT, parse.Kind.SECTION]
    assert {line.number for line in lines if line.head == "x"} == {6}


def test_unbalanced_popsection_is_a_parse_error() -> None:
    with pytest.raises(AsmParseError, match="popsection"):
        parse.parse("\t.popsection\n")


BLOCKS_TEXT = """\
\t.file\t"unit.c"
\t.text
\t.section\t.rodata.str1.1,"aMS",@progbits,1
.LC0:
\t.string\t"hi"
\t.text
\t.p2align 4
\t.globl\tfoo
\t.type\tfoo, @function
foo:
\tleaq\t.LC0(%rip), %rdi
\tjmp\tputs@PLT
\t.size\tfoo, .-foo
\t.globl\tf
\t.type\tf, @gnu_indirect_function
\t.set\tf,foo
\t.section\t.init_array,"aw"
\t.align 8
\t.quad\tfoo
\t.local\tcalls.0
\t.comm\tcalls.0,4,4
\t.globl\tcounter
\t.data
\t.align 4
\t.type\tcounter, @object
\t.size\tcounter, 4
counter:
\t.long\t5
\t.ident\t"GCC"
\t.section\t.note.GNU-stack,"",@progbits
"""


def test_blocks() -> None:
    asm = parse.parse(BLOCKS_TEXT)
    summary = [(block.kind, block.name, block.section) for block in asm.blocks]
    assert summary == [
        ("other", "", ".text"),
        ("variable", ".LC0", ".rodata.str1.1"),
        ("function", "foo", ".text"),
        ("variable", "f", parse.COMMON_SECTION),
        ("other", "", ".init_array"),
        ("variable", "calls.0", parse.COMMON_SECTION),
        ("variable", "counter", ".data"),
        ("other", "", ".note.GNU-stack"),
    ]
    assert [line.text for line in asm.blocks[3].lines] == [".globl\tf", ".type\tf, @gnu_indirect_function", ".set\tf,foo"]
    assert asm.is_code(".text") and not asm.is_code(".init_array")


RENAMES = (
    ("movq\tfoo@GOTPCREL(%rip), %rax", "movq\tFOO@GOTPCREL(%rip), %rax"),
    ("leaq\t.LC0(%rip), %rdi", "leaq\t.LC0!(%rip), %rdi"),
    ('.string\t"foo"', '.string\t"foo"'),
    (".long\t0x1f+foo-.L4", ".long\t0x1f+FOO-.L4!"),
    ("addl\t$1, %fs:foo@tpoff", "addl\t$1, %fs:FOO@tpoff"),
    (".size\tfoo, .-foo", ".size\tFOO, .-FOO"),
)


@pytest.mark.parametrize(("text", "expected"), RENAMES)
def test_rename_symbols_skips_registers_modifiers_strings_and_numbers(text: str, expected: str) -> None:
    def rename(token: str) -> str:
        return {"foo": "FOO", ".LC0": ".LC0!", ".L4": ".L4!"}.get(token, token)

    assert normalize.rename_symbols(text, rename) == expected


def test_signature_ignores_label_numbers_and_debug_lines() -> None:
    first = parse.parse("\t.type\tf, @function\nf:\n.LFB0:\n\t.loc 1 2 3\n\tjmp\t.L3\n.L3:\n\tret\n\t.size\tf, .-f\n")
    second = parse.parse("\t.type\tf, @function\nf:\n.LFB7:\n\t.loc 1 9 3\n\t.cfi_startproc\n\tjmp\t.L9\n.L9:\n"
                         "\tret\n\t.size\tf, .-f\n")
    assert normalize.block_signature(first.blocks[0], str) == normalize.block_signature(second.blocks[0], str)


NAMES = (  # name, family, auto-named
    (".LC12", ".LC", True),
    ("counter.3", "counter", True),
    ("foo.part.0", "foo.part", True),
    ("foo.constprop.0.isra.0", "foo.constprop.isra", True),
    ("CSWTCH.8", "CSWTCH", True),
    ("foo.cold", "foo.cold", False),
    ("buffer2", "buffer2", False),
    ("main", "main", False),
)


@pytest.mark.parametrize(("name", "family", "auto"), NAMES)
def test_family_and_auto_names(name: str, family: str, auto: bool) -> None:
    assert match.family(name) == family
    assert match.is_auto_named(name) is auto
