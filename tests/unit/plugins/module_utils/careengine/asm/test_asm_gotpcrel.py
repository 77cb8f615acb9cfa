"""Data the unit does not define is reached through the GOT in patched function bodies.

The table of rewrites on single instructions first, then real gcc output for -fPIE,
-fno-pie (linked -no-pie) and -fPIC: the instrumented assembler assembles, imported
data is reached only through GOT relocations, the unit's own data directly, and a
program linked against a shared library that defines the imported data runs the new
code correctly (including a leaf function keeping locals in the red zone) without any
copy relocation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine.asm import gensrc, gotpcrel
from plugins.module_utils.careengine.errors import UnpatchableChange

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

SAVE = [("leaq", "-128(%rsp), %rsp"), ("pushq", "%r11")]
RESTORE = [("popq", "%r11"), ("leaq", "128(%rsp), %rsp")]

# (head, args) -> the statements replacing it (None: unchanged). Nothing is defined in
# the unit except "mine".
REWRITES = [
    # loads into a 32/64-bit register use that register for the address
    (("movq", "stderr(%rip), %rax"), [("movq", "stderr@GOTPCREL(%rip), %rax"), ("movq", "(%rax), %rax")]),
    (("movl", "4+arr(%rip), %ecx"), [("movq", "arr@GOTPCREL(%rip), %rcx"), ("movl", "4(%rcx), %ecx")]),
    (("movl", "arr+8(%rip), %r9d"), [("movq", "arr@GOTPCREL(%rip), %r9"), ("movl", "8(%r9), %r9d")]),
    (("movzbl", "flag(%rip), %edx"), [("movq", "flag@GOTPCREL(%rip), %rdx"), ("movzbl", "(%rdx), %edx")]),
    (("movslq", "arr-4(%rip), %rsi"), [("movq", "arr@GOTPCREL(%rip), %rsi"), ("movslq", "-4(%rsi), %rsi")]),
    # address-of
    (("leaq", "stderr(%rip), %rax"), [("movq", "stderr@GOTPCREL(%rip), %rax")]),
    (("leaq", "arr+16(%rip), %rdi"), [("movq", "arr@GOTPCREL(%rip), %rdi"), ("leaq", "16(%rdi), %rdi")]),
    # partial-register and non-GPR loads keep the rest of the register: scratch
    (("movb", "flag(%rip), %al"), [*SAVE, ("movq", "flag@GOTPCREL(%rip), %r11"), ("movb", "(%r11), %al"), *RESTORE]),
    (("movss", "f(%rip), %xmm0"), [*SAVE, ("movq", "f@GOTPCREL(%rip), %r11"), ("movss", "(%r11), %xmm0"),
                                   *RESTORE]),
    # stores, read-modify-write, compares
    (("movl", "%edi, v(%rip)"), [*SAVE, ("movq", "v@GOTPCREL(%rip), %r11"), ("movl", "%edi, (%r11)"), *RESTORE]),
    (("addl", "%edi, 8+arr(%rip)"), [*SAVE, ("movq", "arr@GOTPCREL(%rip), %r11"), ("addl", "%edi, 8(%r11)"),
                                     *RESTORE]),
    (("cmpq", "$0, stderr(%rip)"), [*SAVE, ("movq", "stderr@GOTPCREL(%rip), %r11"), ("cmpq", "$0, (%r11)"),
                                    *RESTORE]),
    (("lock", "addl\t$1, v(%rip)"), [*SAVE, ("movq", "v@GOTPCREL(%rip), %r11"), ("lock", "addl\t$1, (%r11)"),
                                     *RESTORE]),
    # the scratch register is one the instruction does not use
    (("movq", "%r11, v(%rip)"), [("leaq", "-128(%rsp), %rsp"), ("pushq", "%r10"),
                                 ("movq", "v@GOTPCREL(%rip), %r10"), ("movq", "%r11, (%r10)"), ("popq", "%r10"),
                                 ("leaq", "128(%rsp), %rsp")]),
    # indirect calls and jumps: r11 is dead at a call
    (("call", "*hook(%rip)"), [("movq", "hook@GOTPCREL(%rip), %r11"), ("call", "*(%r11)")]),
    (("jmp", "*hook+8(%rip)"), [("movq", "hook@GOTPCREL(%rip), %r11"), ("jmp", "*8(%r11)")]),
    # push: the value lands where the push would have put it
    (("pushq", "v(%rip)"), [*SAVE, ("movq", "v@GOTPCREL(%rip), %r11"), ("movq", "(%r11), %r11"),
                            ("movq", "%r11, 128(%rsp)"), ("popq", "%r11"), ("leaq", "120(%rsp), %rsp")]),
    # left alone: the unit's symbols, local labels, relocation modifiers, non-rip operands
    (("movl", "mine(%rip), %eax"), None),
    (("addl", "$1, mine+4(%rip)"), None),
    (("leaq", ".LC0(%rip), %rdi"), None),
    (("movq", "stderr@GOTPCREL(%rip), %rax"), None),
    (("movq", "x@gottpoff(%rip), %rax"), None),
    (("leaq", "_GLOBAL_OFFSET_TABLE_(%rip), %rbx"), None),
    (("movl", "%fs:x@tpoff, %eax"), None),
    (("movl", "8(%rsp), %eax"), None),
    (("call", "puts@PLT"), None),
    (("movl", "a+b(%rip), %eax"), None),
]


@pytest.mark.parametrize(("statement", "expected"), REWRITES, ids=lambda value: " ".join(value) if
                         isinstance(value, tuple) else "")
def test_rewrite_table(statement, expected):
    assert gotpcrel.rewrite(*statement, frozenset({"mine"}), "fn") == expected


@pytest.mark.parametrize(("displacement", "expected"), [
    ("sym", ("sym", 0)), ("sym+8", ("sym", 8)), ("8+sym", ("sym", 8)), ("sym - 4", ("sym", -4)),
    ("-4+sym", ("sym", -4)), ("0x10+sym", ("sym", 16)), ("010+sym", ("sym", 8)),
    ("a+b", None), ("8-sym", None), ("sym@GOTPCREL", None), ("sym*2", None), ("08+sym", None), ("", None),
])
def test_displacement_is_one_symbol_plus_constants(displacement, expected):
    assert gotpcrel.symbol_and_offset(displacement) == expected


@pytest.mark.parametrize("statement", [("movq", "%rsp, saved_sp(%rip)"), ("popq", "v(%rip)"),
                                       ("movl", "v(%rip), %esp")])
def test_unrewritable_accesses_are_refused_naming_the_function(statement):
    with pytest.raises(UnpatchableChange, match="function fn: .*v|function fn: .*saved_sp"):
        gotpcrel.rewrite(*statement, frozenset(), "fn")


def test_defined_symbols_are_labels_commons_and_sets():
    asm = gensrc.parse.parse("\t.text\nf:\n\tret\n\t.comm\tc,4,4\n\t.set\talias,f\n\t.data\nv:\n\t.long 1\n")
    assert gotpcrel.defined_symbols(asm) == {"f", "c", "alias", "v"}


# ---------------------------------------------------------------------------------
# Real gcc output

ORIGINAL = r"""#include <stdio.h>
extern int imported_value;
extern int imported_array[4];
int unit_global = 3;
static int local_counter;

int work(int x)
{
	local_counter += x;
	return local_counter + unit_global;
}
"""

# work() changes and reads stderr; fresh() and leaf() are new. The imported data is
# defined in a shared library.
PATCHED = r"""#include <stdio.h>
extern int imported_value;
extern int imported_array[4];
int unit_global = 3;
static int local_counter;

int work(int x)
{
	local_counter += x;
	if (x < 0)
		fprintf(stderr, "negative %d\n", x);
	return local_counter + unit_global + (stderr != NULL) * 100;
}

int fresh(int x)
{
	imported_value = x;
	imported_array[2] += x;
	unit_global++;
	return imported_array[1] + (stderr != NULL) * 1000;
}

int leaf(int x)
{
	volatile int local[2];

	local[0] = x;
	local[1] = x + 1;
	*(volatile int *)&imported_value = x * 3;
	return local[0] + local[1];
}
"""

LIBRARY = r"""int imported_value;
int imported_array[4] = {1, 2, 3, 4};
int lib_value(void) { return imported_value; }
int lib_array(int i) { return imported_array[i]; }
"""

DRIVER = r"""#include <stdio.h>
int work(int x);
int work_patched(int x) __asm__("work.kpatch");
int fresh(int x);
int leaf(int x);
int lib_value(void);
int lib_array(int i);

#define CHECK(what, expected) do { long got_ = (what); if (got_ != (expected)) { \
	printf("%s = %ld, expected %ld\n", #what, got_, (long)(expected)); failures++; } } while (0)

int main(void)
{
	int failures = 0;

	CHECK(work(1), 1 + 3);
	CHECK(work_patched(1), 2 + 3 + 100);
	CHECK(fresh(5), 2 + 1000);
	CHECK(lib_value(), 5);
	CHECK(lib_array(2), 3 + 5);
	CHECK(work_patched(1), 3 + 4 + 100);
	CHECK(leaf(10), 21);
	CHECK(lib_value(), 30);
	return failures;
}
"""

# flag set -> (compile flags, link flags)
FLAG_SETS = {
    "pie": (("-O2", "-fPIE"), ("-pie",)),
    "no-pie": (("-O2", "-fno-pie"), ("-no-pie",)),
    "pic": (("-O2", "-fPIC"), ("-pie",)),
}
IMPORTED = ("stderr", "imported_value", "imported_array")
UNIT_DATA = ("unit_global", "local_counter")
GOT_RELOCATIONS = frozenset(("R_X86_64_GOTPCREL", "R_X86_64_GOTPCRELX", "R_X86_64_REX_GOTPCRELX"))
DIRECT_ACCESS_RE = re.compile(r"(?:^|[\s,*])(?:\d+\+)?(?P<symbol>[A-Za-z_][\w.]*)(?:[+-]\d+)?\(%rip\)")


def _gcc(*args: str, cwd: Path) -> None:
    result = subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def _asm(source: str, flags: tuple[str, ...], directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "unit.c").write_text(source)
    _gcc(*flags, "-S", "-o", "unit.s", "unit.c", cwd=directory)
    return (directory / "unit.s").read_text()


def _function_body(text: str, name: str) -> list[str]:
    """Statements of the function ``name`` (its first ``name:`` label up to its .size)."""
    lines = text.splitlines()
    start = lines.index(f"{name}:")
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(".size"))
    return [line.strip() for line in lines[start + 1:end] if line.strip() and not line.strip().startswith(".")]


def _kpatch_text(text: str) -> str:
    """Everything the instrumented file puts in .kpatch.text."""
    bodies = re.findall(r'\.pushsection\t\.kpatch\.text,"ax",@progbits\n(.*?)\t\.popsection', text, re.S)
    return "\n".join(bodies)


@pytest.fixture(scope="module", params=list(FLAG_SETS))
def built(request, tmp_path_factory):
    """(flag set, instrumented text, object, linked program) for one flag set."""
    flag_set = request.param
    compile_flags, link_flags = FLAG_SETS[flag_set]
    directory = tmp_path_factory.mktemp(f"gotpcrel-{flag_set}")
    original = _asm(ORIGINAL, compile_flags, directory / "original")
    patched = _asm(PATCHED, compile_flags, directory / "patched")
    result = gensrc.generate(original, patched, filename="unit.c")
    assert set(result.changed_functions) == {"work"}
    assert set(result.new_functions) == {"fresh", "leaf"}
    # The driver calls the replacement body of work() too: make its symbol global.
    (directory / "out.s").write_text(result.text + "\t.globl\twork.kpatch\n")
    _gcc(*compile_flags, "-c", "-o", "out.o", "out.s", cwd=directory)
    (directory / "lib.c").write_text(LIBRARY)
    _gcc("-O2", "-fPIC", "-shared", "-o", "libimp.so", "lib.c", cwd=directory)
    (directory / "driver.c").write_text(DRIVER)
    _gcc(*compile_flags, *link_flags, "-o", "prog", "driver.c", "out.o", "-L.", "-limp", "-Wl,-rpath,$ORIGIN",
         cwd=directory)
    return flag_set, patched, result.text, directory


def _kpatch_relocations(path: Path) -> list[tuple[str, str]]:
    with open(path, "rb") as stream:
        elf = ELFFile(stream)
        symtab = elf.get_section_by_name(".symtab")
        rela = elf.get_section_by_name(".rela.kpatch.text")
        return [(symtab.get_symbol(reloc["r_info_sym"]).name, reloc_type_name(reloc["r_info_type"]))
                for reloc in rela.iter_relocations()]


def reloc_type_name(number: int) -> str:
    from elftools.elf.enums import ENUM_RELOC_TYPE_x64

    names = {value: name for name, value in ENUM_RELOC_TYPE_x64.items() if isinstance(value, int)}
    return {41: "R_X86_64_GOTPCRELX"}.get(number) or names.get(number, str(number))


def test_imported_data_only_through_the_got(built):
    _, _, text, directory = built
    relocations = _kpatch_relocations(directory / "out.o")
    imported = [(symbol, rtype) for symbol, rtype in relocations if symbol in IMPORTED]
    assert {symbol for symbol, _ in imported} == set(IMPORTED)
    assert all(rtype in GOT_RELOCATIONS for _, rtype in imported), imported
    direct = {found.group("symbol") for found in DIRECT_ACCESS_RE.finditer(_kpatch_text(text))}
    assert not direct & set(IMPORTED)


def test_the_units_own_data_is_reached_directly(built):
    flag_set, _, text, directory = built
    direct = {found.group("symbol") for found in DIRECT_ACCESS_RE.finditer(_kpatch_text(text))}
    # -fPIC reaches the interposable global through the GOT itself; the static stays direct.
    assert ({"local_counter"} if flag_set == "pic" else set(UNIT_DATA)) <= direct
    got_symbols = {symbol for symbol, rtype in _kpatch_relocations(directory / "out.o") if rtype in GOT_RELOCATIONS}
    assert got_symbols == set(IMPORTED) | ({"unit_global"} if flag_set == "pic" else set())


def _instructions(text: str, name: str) -> list[str]:
    return [re.sub(r"\s+", " ", line).replace(".kpatch", "") for line in _function_body(text, name)
            if not line.endswith(":")]


@pytest.mark.parametrize("built", ["pic"], indirect=True)
def test_pic_code_is_left_as_gcc_wrote_it(built):
    _, patched, text, _ = built
    for function, output_name in (("work", "work.kpatch"), ("fresh", "fresh"), ("leaf", "leaf")):
        assert _instructions(text, output_name) == _instructions(patched, function)


@pytest.mark.parametrize("built", ["pie", "no-pie"], indirect=True)
def test_non_pic_code_uses_the_red_zone_safe_sequence(built):
    _, _, text, _ = built
    leaf = _function_body(text, "leaf")
    red_zone = [line for line in leaf if re.search(r"-\d+\(%rsp\)", line) and "leaq" not in line]
    assert red_zone, "gcc no longer keeps leaf()'s locals in the red zone: the test proves nothing"
    store = next(i for i, line in enumerate(leaf) if "imported_value@GOTPCREL" in line)
    assert leaf[store - 2:store] == ["leaq\t-128(%rsp), %rsp", "pushq\t%r11"]
    assert leaf[store + 2:store + 4] == ["popq\t%r11", "leaq\t128(%rsp), %rsp"]


def test_linked_program_runs_the_new_code_without_copy_relocations(built):
    _, _, _, directory = built
    run = subprocess.run([str(directory / "prog")], capture_output=True, text=True, check=False, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    relocations = subprocess.run(["readelf", "-rW", str(directory / "prog")], capture_output=True, text=True,
                                 check=True).stdout
    assert "R_X86_64_COPY" not in relocations


def test_new_global_variable_keeps_its_binding_written_before_its_literals(tmp_path):
    """gcc writes ``.globl names`` before the literals the initializer uses (found by
    rebuilding redis' lua with every function new): the new variable must stay global,
    or another unit's reference to it fails to link."""
    original = _asm("int f(int i) { return i; }\n", ("-O2", "-fPIE"), tmp_path / "original")
    patched = _asm('const char *const names[] = {"alpha", "beta"};\nint f(int i) { return names[i][0]; }\n',
                   ("-O2", "-fPIE"), tmp_path / "patched")
    assert re.search(r"\.globl\tnames\n\t\.section\t\.rodata\.str", patched)
    result = gensrc.generate(original, patched)
    assert result.new_variables == ("names",)
    (tmp_path / "out.s").write_text(result.text)
    _gcc("-c", "-o", "out.o", "out.s", cwd=tmp_path)
    with open(tmp_path / "out.o", "rb") as stream:
        [names] = ELFFile(stream).get_section_by_name(".symtab").get_symbol_by_name("names")
        assert names["st_info"]["bind"] == "STB_GLOBAL"
