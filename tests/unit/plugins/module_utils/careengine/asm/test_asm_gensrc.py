"""The assembler diff against real gcc output of the fixtures in tests/fixtures/asm/.

Each case compiles orig.c and patched.c (as unit.c in two directories, so only the
source differs) with the flags of a flag set, runs ``gensrc.generate`` and checks the
exact sets of changed/new symbols, that the output assembles, that every original
section of the object keeps its bytes, relocations and symbols, and that the
``.kpatch.info`` records describe the replaced functions.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from plugins.module_utils.careengine.asm import gensrc
from plugins.module_utils.careengine.errors import AsmParseError, UnpatchableChange

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

FIXTURES = Path(__file__).resolve().parents[6] / "tests" / "fixtures" / "asm"

FLAG_SETS = {
    "O0": ("-O0",),
    "O0-g": ("-O0", "-g"),
    "O2": ("-O2",),
    "O2-g": ("-O2", "-g"),
    "O2-sections": ("-O2", "-ffunction-sections", "-fdata-sections"),
    "O2-pic": ("-O2", "-fPIC"),
    "O3": ("-O3",),
    "O2-hardened": ("-O2", "-fcf-protection", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2", "-fno-plt"),
}


@dataclass(frozen=True)
class Case:
    """One fixture and what the diff must find in it."""

    name: str
    changed: tuple[str, ...]
    new_functions: tuple[str, ...] = ()
    new_variables: tuple[str, ...] = ()
    in_patch: tuple[str, ...] = ()
    not_in_patch: tuple[str, ...] = ()


CASES = (
    Case("one_changed", ("buggy",)),
    Case("new_helper", ("compute",), new_functions=("clamp",)),
    Case("changed_literal", ("greet",), in_patch=(r'"hello there, %s\\n"',), not_in_patch=("goodbye",)),
    Case("shared_literal", ("first",), in_patch=(r'"first"',), not_in_patch=(r"value %d",)),
    Case("new_static", ("counter",), new_variables=("extra.0",), in_patch=(r"\.long\t42",)),
    Case("static_local", ("tocks",), not_in_patch=(r"calls\.\d+\.kpatch",)),
    Case("static_renumbered", ("ticks",), new_functions=("warmup",), new_variables=("calls.1",)),
    Case("tls", ("bump",), in_patch=(r"per_thread@(tpoff|gottpoff|tlsgd)",), not_in_patch=(r"\.tbss", r"\.tdata")),
    Case("libc_extern", ("measure",), in_patch=(r"puts(@PLT)?", r"ext_var")),
    Case("cold_split", ("sum",)),
    Case("lines_only", ()),
    Case("jump_table", ("classify",)),
    Case("main_changed", ("main",)),
)


def compile_to_asm(source: Path, directory: Path, flags: tuple[str, ...]) -> str:
    """gcc -S of ``source`` copied to ``directory/unit.c``; the assembler text."""
    directory.mkdir(parents=True)
    shutil.copyfile(source, directory / "unit.c")
    subprocess.run(["gcc", "-S", *flags, "-o", "unit.s", "unit.c"], cwd=directory, check=True)
    return (directory / "unit.s").read_text()


def assemble(text: str, path: Path) -> Path:
    """gcc -c of assembler text; the object's path."""
    source = path.with_suffix(".s")
    source.write_text(text)
    completed = subprocess.run(["gcc", "-c", "-o", str(path), str(source)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    return path


def run_case(case_name: str, flags: tuple[str, ...], tmp_path: Path) -> tuple[str, str, gensrc.GensrcResult]:
    original = compile_to_asm(FIXTURES / case_name / "orig.c", tmp_path / "orig", flags)
    patched = compile_to_asm(FIXTURES / case_name / "patched.c", tmp_path / "patched", flags)
    return original, patched, gensrc.generate(original, patched, filename="unit.c")


def patch_part(text: str) -> str:
    """The lines of the output that go into .kpatch.* sections."""
    inside = False
    kept: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith(".pushsection") and ".kpatch." in line:
            inside = True
        if inside:
            kept.append(line)
        if line.strip() == ".popsection":
            inside = False
    return "\n".join(kept)


SKIPPED_SECTIONS = (".debug", ".rela.debug", ".eh_frame", ".rela.eh_frame", ".comment", ".note", ".symtab",
                    ".strtab", ".shstrtab", ".group")


def original_sections(elf: ELFFile) -> dict[str, object]:
    return {section.name: section for section in elf.iter_sections()
            if section.name and not section.name.startswith(SKIPPED_SECTIONS) and "kpatch" not in section.name}


def relocation_rows(elf: ELFFile, section: RelocationSection) -> list[tuple]:
    symbols = elf.get_section(section["sh_link"])
    rows = []
    for relocation in section.iter_relocations():
        symbol = symbols.get_symbol(relocation["r_info_sym"])
        name = symbol.name or elf.get_section(symbol["st_shndx"]).name
        rows.append((relocation["r_offset"], relocation["r_info_type"], name, relocation["r_addend"]))
    return rows


def defined_symbols(elf: ELFFile) -> dict[str, tuple]:
    table = elf.get_section_by_name(".symtab")
    assert isinstance(table, SymbolTableSection)
    result = {}
    for symbol in table.iter_symbols():
        if symbol.name and symbol["st_shndx"] not in ("SHN_UNDEF", "SHN_ABS"):
            section = symbol["st_shndx"]
            section_name = section if isinstance(section, str) else elf.get_section(section).name
            result[symbol.name] = (section_name, symbol["st_value"], symbol["st_size"], symbol["st_info"]["type"])
    return result


def assert_original_layout_kept(original_object: Path, output_object: Path) -> None:
    """Every original section has the same bytes, relocations and symbols in the output object."""
    with original_object.open("rb") as before_file, output_object.open("rb") as after_file:
        before, after = ELFFile(before_file), ELFFile(after_file)
        before_sections, after_sections = original_sections(before), original_sections(after)
        for name, section in before_sections.items():
            assert name in after_sections, f"section {name} missing from output"
            twin = after_sections[name]
            assert twin["sh_size"] == section["sh_size"], name
            if isinstance(section, RelocationSection):
                assert relocation_rows(after, twin) == relocation_rows(before, section), name
            elif section["sh_type"] != "SHT_NOBITS":
                assert twin.data() == section.data(), f"bytes of {name} differ"
        after_symbols = defined_symbols(after)
        for name, facts in defined_symbols(before).items():
            if not facts[0].startswith(SKIPPED_SECTIONS):
                assert after_symbols.get(name) == facts, f"symbol {name} moved"


def info_records(output_object: Path) -> list[tuple[int, int]]:
    """(dlen, slen) of each .kpatch.info record."""
    with output_object.open("rb") as handle:
        elf = ELFFile(handle)
        section = elf.get_section_by_name(".kpatch.info")
        if section is None:
            return []
        data = section.data()
        assert len(data) % 48 == 0
        return [struct.unpack_from("<II", data, offset + 16) for offset in range(0, len(data), 48)]


def symbol_sizes(object_path: Path) -> dict[str, int]:
    with object_path.open("rb") as handle:
        return {name: facts[2] for name, facts in defined_symbols(ELFFile(handle)).items()}


@pytest.mark.parametrize("flag_set", FLAG_SETS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_generate(case: Case, flag_set: str, tmp_path: Path) -> None:
    original, _, result = run_case(case.name, FLAG_SETS[flag_set], tmp_path)

    assert result.changed_functions == case.changed
    assert result.new_functions == case.new_functions
    assert result.new_variables == case.new_variables
    patch = patch_part(result.text)
    for pattern in case.in_patch:
        assert re.search(pattern, patch), pattern
    for pattern in case.not_in_patch:
        assert not re.search(pattern, patch), pattern

    original_object = assemble(original, tmp_path / "orig.o")
    output_object = assemble(result.text, tmp_path / "out.o")
    assert_original_layout_kept(original_object, output_object)

    records = info_records(output_object)
    assert len(records) == len(case.changed) + len(case.new_functions)
    before_sizes, after_sizes = symbol_sizes(original_object), symbol_sizes(output_object)
    for (dlen, slen), name in zip(records[:len(case.changed)], case.changed, strict=True):
        assert dlen == before_sizes[name]
        assert slen == after_sizes[name + ".kpatch"] > 0
    for (dlen, slen), name in zip(records[len(case.changed):], case.new_functions, strict=True):
        assert dlen == 0
        assert slen == after_sizes[name] > 0


@pytest.mark.parametrize("flag_set", ["O2", "O2-sections", "O2-g"])
def test_cold_part_travels_with_its_parent(flag_set: str, tmp_path: Path) -> None:
    original, patched, result = run_case("cold_split", FLAG_SETS[flag_set], tmp_path)
    assert "sum.cold:" in original and "sum.cold:" in patched
    patch = patch_part(result.text)
    assert re.search(r"^sum\.cold\.kpatch:", patch, re.M)
    assert re.search(r"jmp\t\.L\d+\.kpatch", patch)  # the cold part jumps back into the new hot part
    assert ".text.unlikely" not in patch


@pytest.mark.parametrize("flag_set", ["O0", "O2"])
def test_jump_table_travels_into_patch_data(flag_set: str, tmp_path: Path) -> None:
    _, _, result = run_case("jump_table", FLAG_SETS[flag_set], tmp_path)
    patch = patch_part(result.text)
    assert re.search(r'\.section\t\.kpatch\.data,"aw",@progbits\n(\t\.align.*\n)*\.L\d+\.kpatch:', patch)
    assert re.search(r"\.long\t\.L\d+\.kpatch-\.L\d+\.kpatch", patch)


def test_unchanged_source_gives_no_patch_sections(tmp_path: Path) -> None:
    _, _, result = run_case("lines_only", FLAG_SETS["O2-g"], tmp_path)
    assert ".kpatch" not in result.text
    assert ".loc" not in result.text and ".debug_info" not in result.text


REFUSED = (
    ("changed_initializer", "O2", r"global_counter"),
    ("changed_initializer", "O0-g", r"global_counter"),
    ("changed_array_size", "O2", r"\btable\b"),
    ("changed_array_size", "O2-sections", r"\btable\b"),
)


@pytest.mark.parametrize("flag_set", ["O0", "O2", "O2-pic"])
def test_new_thread_local_variable_is_refused(flag_set: str, tmp_path: Path) -> None:
    with pytest.raises(UnpatchableChange, match=r"^unit\.c: seen\.\d+: new thread-local data"):
        run_case("new_tls", FLAG_SETS[flag_set], tmp_path)


def test_inline_asm_labels_do_not_collide(tmp_path: Path) -> None:
    source = 'int probe(int x)\n{\n\tasm volatile("probe_point_%=: nop" ::: "memory");\n\treturn x + %d;\n}\n'
    (tmp_path / "orig.c").write_text(source.replace("%d", "1"))
    (tmp_path / "patched.c").write_text(source.replace("%d", "2"))
    original = compile_to_asm(tmp_path / "orig.c", tmp_path / "orig", ("-O2",))
    patched = compile_to_asm(tmp_path / "patched.c", tmp_path / "patched", ("-O2",))
    result = gensrc.generate(original, patched)
    assert result.changed_functions == ("probe",)
    assemble(result.text, tmp_path / "out.o")


@pytest.mark.parametrize(("case_name", "flag_set", "symbol"), REFUSED)
def test_data_changes_are_refused(case_name: str, flag_set: str, symbol: str, tmp_path: Path) -> None:
    with pytest.raises(UnpatchableChange, match=rf"^unit\.c: variable {symbol}"):
        run_case(case_name, FLAG_SETS[flag_set], tmp_path)


def aux_info(source: Path, directory: Path) -> str:
    directory.mkdir(parents=True)
    shutil.copyfile(source, directory / "unit.c")
    subprocess.run(["gcc", "-aux-info", "unit.aux", "-c", "-o", "unit.o", "unit.c"], cwd=directory, check=True)
    return (directory / "unit.aux").read_text()


def test_changed_signature_is_refused(tmp_path: Path) -> None:
    original = gensrc.parse_aux_info(aux_info(FIXTURES / "changed_signature" / "orig.c", tmp_path / "orig"))
    patched = gensrc.parse_aux_info(aux_info(FIXTURES / "changed_signature" / "patched.c", tmp_path / "patched"))
    assert original == {"add": "int add (int, int)"}
    assert patched == {"add": "long int add (long int, int)"}
    with pytest.raises(UnpatchableChange, match=r"function add: prototype changed"):
        gensrc.check_signatures(original, patched, ["add"])


def test_same_signature_with_other_parameter_names_is_accepted(tmp_path: Path) -> None:
    source = tmp_path / "src.c"
    source.write_text(
        "#include <stdio.h>\n"
        "static int apply(int (*callback)(int), const char *names[], int count, ...) { return callback(count); }\n"
        "void nothing(void) {}\n"
        "unsigned long long big(unsigned long long value, struct tm *when) { return value + (when != 0); }\n"
        "int use(void) { return apply(0, 0, 0); }\n"
    )
    renamed = tmp_path / "renamed.c"
    renamed.write_text(source.read_text().replace("callback", "cb").replace("names", "n").replace("value", "v"))
    original = gensrc.parse_aux_info(aux_info(source, tmp_path / "a"))
    patched = gensrc.parse_aux_info(aux_info(renamed, tmp_path / "b"))
    assert set(original) == {"apply", "nothing", "big", "use"}  # only definitions, not stdio's declarations
    assert original["apply"] == "int apply (int (*) (int), const char **, int, ...)"
    assert original["nothing"] == "void nothing (void)"
    gensrc.check_signatures(original, patched, ["apply", "big"])


def test_function_without_size_is_a_parse_error() -> None:
    text = "\t.text\n\t.globl\tf\n\t.type\tf, @function\nf:\n\tret\n"
    with pytest.raises(AsmParseError, match="f has no .size"):
        gensrc.generate(text, text)


def test_removed_global_variable_is_refused() -> None:
    original = "\t.globl\tkept\n\t.data\n\t.type\tkept, @object\n\t.size\tkept, 4\nkept:\n\t.long\t1\n"
    with pytest.raises(UnpatchableChange, match="variable kept was removed"):
        gensrc.generate(original, "\t.text\n")


def test_changed_constructor_table_is_refused(tmp_path: Path) -> None:
    original = compile_to_asm(FIXTURES / "jump_table" / "orig.c", tmp_path / "orig", ("-O2",))
    patched = original.replace("\t.quad\tsetup\n", "\t.quad\tsetup\n\t.quad\tsetup\n")
    with pytest.raises(UnpatchableChange, match="outside functions and variables"):
        gensrc.generate(original, patched)


# Runs the patched code: the output is linked with a driver that finds a .kpatch.info
# record by name and calls the original (daddr) and the new function (saddr). The new
# code must use the original's data (statics, TLS, globals), so calling the new function
# after the original shows their shared state.
DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
struct kpatch_info {
	unsigned long daddr, saddr;
	unsigned int dlen, slen;
	const char *name;
	unsigned long vaddr;
	unsigned int flags, pad;
};
extern struct kpatch_info kpatch_info_start[], kpatch_info_end[];
int main(int argc, char **argv)
{
	long a = atol(argv[2]), b = atol(argv[3]), c = atol(argv[4]);
	for (struct kpatch_info *info = kpatch_info_start; info < kpatch_info_end; info++) {
		if (strcmp(info->name, argv[1]) != 0)
			continue;
		int (*original)(long, long, long) = (int (*)(long, long, long))info->daddr;
		int (*patched)(long, long, long) = (int (*)(long, long, long))info->saddr;
		int before = original(a, b, c);
		printf("%d %d\n", before, patched(a, b, c));
		return 0;
	}
	return 3;
}
"""
INFO_BOUNDS_HEAD = '\t.section\t.kpatch.info,"a",@progbits\n\t.globl\tkpatch_info_start\nkpatch_info_start:\n\t.text\n'
INFO_BOUNDS_TAIL = '\t.section\t.kpatch.info,"a",@progbits\n\t.globl\tkpatch_info_end\nkpatch_info_end:\n'


def cold_sum(n: int, penalty: int) -> int:
    return sum(i * n for i in range(n)) - (penalty if n > 77 else 0)


RUNS = (  # case, record name, arguments, (original result, patched result)
    ("one_changed", "buggy.kpatch", (10, 0, 0), (15, 5)),
    ("new_helper", "compute.kpatch", (2000, 0, 0), (14000, 1000)),
    ("static_local", "tocks.kpatch", (0, 0, 0), (2, 5)),
    ("static_renumbered", "ticks.kpatch", (0, 0, 0), (1, 3)),
    ("tls", "bump.kpatch", (1, 0, 0), (5, 9)),
    ("jump_table", "classify.kpatch", (7, 2, 3), (-1, 1)),
    ("jump_table", "classify.kpatch", (5, 1, 33), (2, 2)),
    ("cold_split", "sum.kpatch", (100, 0, 0), (cold_sum(100, 3), cold_sum(100, 5))),
)


@pytest.mark.parametrize("flag_set", ["O0", "O2", "O2-sections", "O2-pic", "O2-hardened"])
@pytest.mark.parametrize(("case_name", "record", "arguments", "expected"), RUNS)
def test_patched_code_runs_on_original_data(case_name: str, record: str, arguments: tuple[int, int, int],
                                            expected: tuple[int, int], flag_set: str, tmp_path: Path) -> None:
    _, _, result = run_case(case_name, FLAG_SETS[flag_set], tmp_path)
    (tmp_path / "out.s").write_text(INFO_BOUNDS_HEAD + result.text + INFO_BOUNDS_TAIL)
    (tmp_path / "driver.c").write_text(DRIVER)
    subprocess.run(["gcc", "-o", "program", "driver.c", "out.s"], cwd=tmp_path, check=True)
    completed = subprocess.run(["./program", record, *map(str, arguments)], cwd=tmp_path, capture_output=True,
                               text=True, check=True)
    assert completed.stdout.split() == [str(value) for value in expected]
