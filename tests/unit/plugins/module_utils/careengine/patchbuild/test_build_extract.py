"""Extraction on hand-made tiny links: the asm diff's output shape, written by hand."""

from __future__ import annotations

import io
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine import patchfile
from plugins.module_utils.careengine.errors import BuildError
from plugins.module_utils.careengine.patchbuild import extract

ORIGINAL_C = r"""
#include <stdio.h>
int counter = 5;
static const char msg[] = "hello";
int target(int x) { counter += x; return printf("%s UNPATCHED %d\n", msg, counter); }
int main(void) { return target(1) < 0; }
"""

# What the asm diff emits after the original `target` (see DESIGN.md section 3).
KPATCH_PART = """\
target.Lfe:
\t.pushsection .kpatch.text,"ax",@progbits
\t.p2align 4
\t.type\ttarget.kpatch, @function
target.kpatch:
\tpushq\t%rbx
\tmovl\t%edi, %ebx
\tcall\thelper
\tmovq\tcounter@GOTPCREL(%rip), %rdx
\taddl\t%ebx, (%rdx)
\tleaq\t.LC0.kpatch(%rip), %rdi
\tcall\tputs@PLT
\tleaq\tmsg(%rip), %rsi
\tmovl\t(%rsi), %eax
\tpopq\t%rbx
\tret
target.kpatch_end:
\t.size\ttarget.kpatch, .-target.kpatch
\t.type\thelper, @function
helper:
\tmovl\t$3, %eax
\tret
helper.kpatch_end:
\t.size\thelper, .-helper
\t.popsection
\t.pushsection .kpatch.data,"aw",@progbits
.LC0.kpatch:
\t.string\t"PATCHED"
\t.popsection
\t.pushsection .kpatch.strtab,"a",@progbits
kpatch_strtab1:
\t.string\t"target.kpatch"
kpatch_strtab2:
\t.string\t"helper"
\t.popsection
\t.pushsection .kpatch.info,"aw",@progbits
\t.quad\ttarget
\t.quad\ttarget.kpatch
\t.long\ttarget.Lfe - target
\t.long\ttarget.kpatch_end - target.kpatch
\t.quad\tkpatch_strtab1
\t.quad\t0
\t.long\t0
\t.byte\t0,0,0,0
\t.quad\t0
\t.quad\thelper
\t.long\t0
\t.long\thelper.kpatch_end - helper
\t.quad\tkpatch_strtab2
\t.quad\t0
\t.long\t0
\t.byte\t0,0,0,0
\t.popsection
"""


def _run(*command: str, cwd) -> None:
    subprocess.run(command, cwd=cwd, check=True)


def _instrument(original_asm: str, function: str, kpatch_part: str) -> str:
    end = f"\t.size\t{function}, .-{function}\n"
    assert end in original_asm
    return original_asm.replace(end, end + kpatch_part, 1)


def _link_pair(tmp_path, c_source: str, kpatch_part: str, function: str = "target",
               cflags=("-O2",), ldflags=()) -> tuple[str, str]:
    (tmp_path / "orig.c").write_text(c_source)
    _run("gcc", *cflags, "-S", "-o", "orig.s", "orig.c", cwd=tmp_path)
    original_asm = (tmp_path / "orig.s").read_text()
    (tmp_path / "patched.s").write_text(_instrument(original_asm, function, kpatch_part))
    for name in ("orig", "patched"):
        _run("gcc", *cflags, "-c", "-o", f"{name}.o", f"{name}.s", cwd=tmp_path)
        _run("gcc", *cflags, "-o", name, f"{name}.o", "-Wl,-q", *ldflags, cwd=tmp_path)
    return str(tmp_path / "patched"), str(tmp_path / "orig")


def _elf(image: bytes) -> ELFFile:
    return ELFFile(io.BytesIO(image))


def _symbols(path: str) -> dict[str, int]:
    with open(path, "rb") as stream:
        return {s.name: s["st_value"] for s in ELFFile(stream).get_section_by_name(".symtab").iter_symbols()}


def _sections(path: str) -> dict[str, int]:
    with open(path, "rb") as stream:
        return {s.name: s["sh_addr"] for s in ELFFile(stream).iter_sections()}


@pytest.fixture(params=[(), ("-no-pie", "-fno-pie")], ids=["pie", "nonpie"])
def pair(request, tmp_path):
    flags = request.param
    cflags = ("-O2",) + tuple(f for f in flags if f.startswith("-f"))
    ldflags = tuple(f for f in flags if not f.startswith("-f"))
    return _link_pair(tmp_path, ORIGINAL_C, KPATCH_PART, cflags=cflags, ldflags=ldflags)


def test_image_is_relocatable_with_placeholders_at_original_addresses(pair):
    patched, original = pair
    result = extract.extract_image(patched, original)
    elf = _elf(result.elf_image)
    assert elf["e_type"] == "ET_REL" and elf["e_machine"] == "EM_X86_64"
    assert elf.num_segments() == 0
    original_addresses = _sections(original)
    names = [s.name for s in elf.iter_sections()]
    for section in elf.iter_sections():
        if section.name.startswith(".kpatch"):
            assert section["sh_type"] in ("SHT_PROGBITS", "SHT_NOBITS")
        elif section["sh_flags"] & 2:   # SHF_ALLOC
            assert section["sh_type"] == "SHT_NOBITS"
            assert section["sh_addr"] == original_addresses[section.name]
    assert {".kpatch.text", ".kpatch.data", ".kpatch.info", ".kpatch.strtab", ".symtab", ".strtab",
            ".shstrtab"} <= set(names)
    relas = {s.name for s in elf.iter_sections() if s["sh_type"] == "SHT_RELA"}
    assert relas == {".rela.kpatch.text", ".rela.kpatch.info"}
    info = elf.get_section_by_name(".kpatch.info").data()
    assert len(info) == 2 * patchfile.INFO_ENTRY_SIZE + patchfile.INFO_TERMINATOR_SIZE
    assert info.endswith(b"\0" * patchfile.INFO_TERMINATOR_SIZE)
    assert result.functions == ("target",)
    assert result.new_functions == ("helper",)


def test_relocations_designate_the_original_objects(pair):
    patched, original = pair
    elf = _elf(extract.extract_image(patched, original).elf_image)
    symtab = elf.get_section_by_name(".symtab")
    original_symbols = _symbols(original)
    seen = {}
    for rela_name in (".rela.kpatch.text", ".rela.kpatch.info"):
        rela = elf.get_section_by_name(rela_name)
        for reloc in rela.iter_relocations():
            assert reloc["r_info_type"] not in (0, 4), "no NONE, no PLT32 left"
            symbol = symtab.get_symbol(reloc["r_info_sym"])
            seen[symbol.name or elf.get_section(symbol["st_shndx"]).name] = (symbol, reloc)
    puts, reloc = seen["puts@GLIBC_2.2.5"]
    assert puts["st_shndx"] == "SHN_UNDEF" and puts["st_info"]["bind"] == "STB_GLOBAL"
    assert reloc["r_info_type"] == 2   # PC32
    for name in ("counter", "target"):
        symbol, _ = seen[name]
        placeholder = elf.get_section(symbol["st_shndx"])
        assert placeholder["sh_type"] == "SHT_NOBITS"
        assert placeholder["sh_addr"] + symbol["st_value"] == original_symbols[name]
    assert seen["target"][0]["st_info"]["type"] == "STT_FUNC"
    new_function, _ = seen["target.kpatch"]
    assert elf.get_section(new_function["st_shndx"]).name == ".kpatch.text"
    assert new_function["st_info"]["type"] == "STT_FUNC" and new_function["st_value"] == 0
    # msg is a local object of .rodata: section-relative reference to the original bytes.
    rodata_symbol, rodata_reloc = seen[".rodata"]
    rodata = elf.get_section(rodata_symbol["st_shndx"])
    assert rodata["sh_addr"] + rodata_reloc["r_addend"] + 4 == original_symbols["msg"]


def test_patch_round_trips_and_names_functions(pair):
    patched, original = pair
    patch, extracted = extract.extract_patch(patched, original)
    decoded = patchfile.decode_patch(patch.to_bytes())
    summary = patchfile.summarize(decoded)
    assert [(f.name, f.orig_size > 0, f.new_size > 0) for f in summary.functions] == [("target", True, True)]
    assert summary.new_functions == ("helper",)
    assert decoded.build_id == patch.build_id == _build_id(original)
    assert extracted.functions == ("target",)


def _build_id(path: str) -> str:
    from plugins.module_utils.careengine.elf import read_build_id

    return read_build_id(path)


def test_unrelaxed_got_load_becomes_lea(tmp_path):
    patched, original = _link_pair(tmp_path, ORIGINAL_C, KPATCH_PART, ldflags=("-Wl,--no-relax",))
    with open(patched, "rb") as stream:
        elf = ELFFile(stream)
        text = elf.get_section_by_name(".kpatch.text")
        got_relocs = [r for r in elf.get_section_by_name(".rela.kpatch.text").iter_relocations()
                      if r["r_info_type"] in (9, 41, 42)]
        assert got_relocs, "the link kept the GOT load"
        opcode_offsets = [r["r_offset"] - text["sh_addr"] - 2 for r in got_relocs]
        assert all(text.data()[offset] == 0x8B for offset in opcode_offsets)
    image = _elf(extract.extract_image(patched, original).elf_image)
    data = image.get_section_by_name(".kpatch.text").data()
    assert all(data[offset] == 0x8D for offset in opcode_offsets)
    types = {r["r_info_type"] for r in image.get_section_by_name(".rela.kpatch.text").iter_relocations()}
    assert types & {9, 41, 42}, "relocation type is kept"


TINY_C = r"""
int tiny(void) { return 0; }
int main(void) { return tiny(); }
"""
TINY_PART = """\
tiny.Lfe:
\t.pushsection .kpatch.text,"ax",@progbits
\t.type\ttiny.kpatch, @function
tiny.kpatch:
\tmovl\t$1, %eax
\tret
tiny.kpatch_end:
\t.size\ttiny.kpatch, .-tiny.kpatch
\t.popsection
\t.pushsection .kpatch.strtab,"a",@progbits
kpatch_strtab1:
\t.string\t"tiny.kpatch"
\t.popsection
\t.pushsection .kpatch.info,"aw",@progbits
\t.quad\ttiny
\t.quad\ttiny.kpatch
\t.long\ttiny.Lfe - tiny
\t.long\ttiny.kpatch_end - tiny.kpatch
\t.quad\tkpatch_strtab1
\t.quad\t0
\t.long\t0
\t.byte\t0,0,0,0
\t.popsection
"""


def test_too_small_function_is_refused(tmp_path):
    patched, original = _link_pair(tmp_path, TINY_C, TINY_PART, function="tiny", cflags=("-O2",))
    with pytest.raises(BuildError, match="tiny is too small"):
        extract.extract_image(patched, original)


TLS_C = r"""
__thread int tls_counter = 7;
int target(int x) { tls_counter += x; return tls_counter; }
int main(void) { return target(1) == 0; }
"""
TLS_PART = """\
target.Lfe:
\t.pushsection .kpatch.text,"ax",@progbits
\t.type\ttarget.kpatch, @function
target.kpatch:
\tmovl\t%fs:tls_counter@tpoff, %eax
\taddl\t%edi, %eax
\taddl\t%edi, %eax
\tmovl\t%eax, %fs:tls_counter@tpoff
\tret
target.kpatch_end:
\t.size\ttarget.kpatch, .-target.kpatch
\t.popsection
\t.pushsection .kpatch.strtab,"a",@progbits
kpatch_strtab1:
\t.string\t"target.kpatch"
\t.popsection
\t.pushsection .kpatch.info,"aw",@progbits
\t.quad\ttarget
\t.quad\ttarget.kpatch
\t.long\ttarget.Lfe - target
\t.long\ttarget.kpatch_end - target.kpatch
\t.quad\tkpatch_strtab1
\t.quad\t0
\t.long\t0
\t.byte\t0,0,0,0
\t.popsection
"""


def test_local_exec_tls_is_checked_and_dropped(tmp_path):
    patched, original = _link_pair(tmp_path, TLS_C, TLS_PART, cflags=("-O2", "-fno-pie"), ldflags=("-no-pie",))
    with open(patched, "rb") as stream:
        linked = ELFFile(stream).get_section_by_name(".rela.kpatch.text")
        assert 23 in {r["r_info_type"] for r in linked.iter_relocations()}, "the link has TPOFF32"
    image = _elf(extract.extract_image(patched, original).elf_image)
    rela = image.get_section_by_name(".rela.kpatch.text")
    types = {r["r_info_type"] for r in rela.iter_relocations()} if rela is not None else set()
    assert 23 not in types and 0 not in types   # TPOFF32 handled, nothing left as NONE


def test_general_dynamic_tls_is_refused(tmp_path):
    part = TLS_PART.replace(
        "\tmovl\t%fs:tls_counter@tpoff, %eax\n\taddl\t%edi, %eax\n\taddl\t%edi, %eax\n"
        "\tmovl\t%eax, %fs:tls_counter@tpoff\n\tret\n",
        "\tsubq\t$8, %rsp\n\t.byte\t0x66\n\tleaq\ttls_counter@tlsgd(%rip), %rdi\n\t.value\t0x6666\n"
        "\trex64\n\tcall\t__tls_get_addr@PLT\n\tmovl\t(%rax), %eax\n\taddq\t$8, %rsp\n\tret\n")
    patched, original = _link_pair(tmp_path, TLS_C, part, cflags=("-O2", "-fPIC"), ldflags=("-shared",))
    with pytest.raises(BuildError, match="non-supported TLS model"):
        extract.extract_image(patched, original)


def test_initial_exec_tls_points_at_the_original_got_slot(tmp_path):
    part = TLS_PART.replace(
        "\tmovl\t%fs:tls_counter@tpoff, %eax\n\taddl\t%edi, %eax\n\taddl\t%edi, %eax\n"
        "\tmovl\t%eax, %fs:tls_counter@tpoff\n\tret\n",
        "\tmovq\ttls_counter@gottpoff(%rip), %rax\n\tmovl\t%fs:(%rax), %eax\n\taddl\t%edi, %eax\n\tret\n")
    patched, original = _link_pair(tmp_path, TLS_C, part, cflags=("-O2", "-fPIC", "-ftls-model=initial-exec"),
                                   ldflags=("-shared",))
    image = _elf(extract.extract_image(patched, original).elf_image)
    relocs = [r for r in image.get_section_by_name(".rela.kpatch.text").iter_relocations()
              if r["r_info_type"] == 22]
    assert len(relocs) == 1
    with open(original, "rb") as stream:
        elf = ELFFile(stream)
        slots = [r["r_offset"] for r in elf.get_section_by_name(".rela.dyn").iter_relocations()
                 if r["r_info_type"] == 18]
    assert relocs[0]["r_addend"] in slots


def test_binary_without_kpatch_sections_is_refused(tmp_path):
    (tmp_path / "a.c").write_text("int main(void) { return 0; }\n")
    _run("gcc", "-o", "a", "a.c", "-Wl,-q", cwd=tmp_path)
    assert not extract.has_patch_sections(str(tmp_path / "a"))
    with pytest.raises(BuildError, match="nothing to extract"):
        extract.extract_image(str(tmp_path / "a"), str(tmp_path / "a"))


def test_new_copy_relocation_is_refused_not_misplaced(tmp_path):
    # A direct (non-GOT) load of libc's stderr makes the patched link copy it into .bss,
    # shifting .bss: the patch could not address the original's .bss correctly.
    part = KPATCH_PART.replace("\tmovl\t(%rsi), %eax\n", "\tmovl\t(%rsi), %eax\n\tmovq\tstderr(%rip), %rax\n")
    patched, original = _link_pair(tmp_path, ORIGINAL_C, part, cflags=("-O2", "-fno-pie"), ldflags=("-no-pie",))
    with pytest.raises(BuildError, match="stderr|copy relocation"):
        extract.extract_image(patched, original)


def test_imported_variable_through_the_got_stays_undefined(tmp_path):
    part = KPATCH_PART.replace("\tmovl\t(%rsi), %eax\n",
                               "\tmovl\t(%rsi), %eax\n\tmovq\tstderr@GOTPCREL(%rip), %rax\n\tmovq\t(%rax), %rax\n")
    patched, original = _link_pair(tmp_path, ORIGINAL_C, part, cflags=("-O2", "-fno-pie"), ldflags=("-no-pie",))
    image = _elf(extract.extract_image(patched, original).elf_image)
    symtab = image.get_section_by_name(".symtab")
    found = [(symtab.get_symbol(r["r_info_sym"]), r["r_info_type"])
             for r in image.get_section_by_name(".rela.kpatch.text").iter_relocations()
             if symtab.get_symbol(r["r_info_sym"]).name.startswith("stderr")]
    assert len(found) == 1
    symbol, rtype = found[0]
    assert symbol["st_shndx"] == "SHN_UNDEF" and symbol.name == "stderr@GLIBC_2.2.5"
    assert rtype in (9, 41, 42)
