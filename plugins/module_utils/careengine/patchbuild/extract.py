"""Extraction: from a patched binary (linked with ``-Wl,-q``) to the patch's ELF image.

One pass doing what LibCare's ``kpatch_strip --strip``, ``--rel-fixup``,
``strip --strip-unneeded`` and ``--undo-link`` do together. The result is an ELF64
``ET_REL`` object holding:

* every allocated non-``.kpatch`` section of the patched binary as an ``SHT_NOBITS``
  placeholder, named as before, with ``sh_addr``/``sh_size`` of the section of the same
  name in the ORIGINAL binary (the loader adds the load bias);
* the ``.kpatch.*`` sections with their contents (``.kpatch.info`` gets the 24-byte
  terminator), ``sh_addr`` 0;
* ``.kpatch.eh_frame`` (patch code's unwind records) gets a zero 4-byte terminator and
  a zeroed writable ``.kpatch.eh_object`` beside it (the unwinder's record of it);
* ``.rela.kpatch.*`` for those (and nothing else), ``.symtab``, ``.strtab``, ``.shstrtab``.

Offsets become section-relative. The gensrc output re-emits all original code and data
verbatim and in order, so "placeholder section + offset" designates the same bytes in
the original object. Relocations are rewritten by the rules in :data:`RELOCATION_RULES`
(one row per type); symbols by :meth:`_Extractor.output_symbol`.

Inline functions and template instances (:mod:`..asm.comdat`): the patched link kept one
unit's new copy; :func:`check_comdat_copies` refuses the patch when the units' copies
differ, and a weak original must be as long as the record says (the copy kept). Units
that emit such a function unchanged were refused before, at the patched link
(:mod:`.comdat_link`): the linked binary no longer shows the copies it dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from elftools.construct import Container
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.structs import ELFStructs

from .. import patchfile
from ..asm import comdat
from ..asm.cxx import demangle
from ..errors import BuildError, UnpatchableChange

# pyelftools' table lacks R_X86_64_GOTPCRELX (41, x86-64 psABI); add it.
R = {name: number for name, number in ENUM_RELOC_TYPE_x64.items() if isinstance(number, int)}
R.setdefault("R_X86_64_GOTPCRELX", 41)
MIN_FUNCTION_SIZE = patchfile.JUMP_SIZE
_MOV_OPCODE = 0x8B
_LEA_OPCODE = 0x8D
_SHF_INFO_LINK = 0x40

# What happens to a relocation of each type (pyelftools' table-of-recipes style):
#   keep      unchanged (symbol rewritten as usual)
#   pc32      PLT32 becomes PC32 (the loader routes imported calls through its jump table)
#   got       GOT load: for a defined symbol the mov becomes lea (type kept)
#   tpoff32   local-exec TLS: checked against the original, then dropped (the linked bytes hold it)
#   gottpoff  initial-exec TLS: addend := vaddr of the ORIGINAL object's GOT slot of the variable
#   drop      nothing to do (R_X86_64_NONE left by the linker)
#   tls       any other TLS model: refused
RELOCATION_RULES: dict[int, str] = {
    R["R_X86_64_NONE"]: "drop",
    R["R_X86_64_64"]: "keep",
    R["R_X86_64_PC32"]: "keep",
    R["R_X86_64_32"]: "keep",
    R["R_X86_64_32S"]: "keep",
    R["R_X86_64_PC64"]: "keep",
    R["R_X86_64_16"]: "keep",
    R["R_X86_64_PC16"]: "keep",
    R["R_X86_64_8"]: "keep",
    R["R_X86_64_PC8"]: "keep",
    R["R_X86_64_PLT32"]: "pc32",
    R["R_X86_64_GOTPCREL"]: "got",
    R["R_X86_64_GOTPCRELX"]: "got",
    R["R_X86_64_REX_GOTPCRELX"]: "got",
    R["R_X86_64_TPOFF32"]: "tpoff32",
    R["R_X86_64_GOTTPOFF"]: "gottpoff",
    R["R_X86_64_TLSGD"]: "tls",
    R["R_X86_64_TLSLD"]: "tls",
    R["R_X86_64_DTPOFF32"]: "tls",
    R["R_X86_64_DTPOFF64"]: "tls",
    R["R_X86_64_DTPMOD64"]: "tls",
    R["R_X86_64_TPOFF64"]: "tls",
    R["R_X86_64_GOTPC32_TLSDESC"]: "tls",
    R["R_X86_64_TLSDESC_CALL"]: "tls",
    R["R_X86_64_TLSDESC"]: "tls",
}
_RELOC_NAMES = {number: name for name, number in R.items()}


@dataclass(frozen=True)
class ExtractedPatch:
    """The patch's relocatable ELF image and what it replaces and adds."""

    elf_image: bytes
    functions: tuple[str, ...]
    new_functions: tuple[str, ...]


@dataclass
class _Section:
    name: str
    sh_type: str
    sh_flags: int
    sh_addr: int
    data: bytes = b""
    size: int = 0
    sh_addralign: int = 1
    sh_entsize: int = 0
    sh_link: int = 0
    sh_info: int = 0


@dataclass(frozen=True)
class _Symbol:
    name: str
    value: int
    size: int
    bind: str
    sym_type: str
    shndx: int | str
    visibility: str = "STV_DEFAULT"


@dataclass
class _Rela:
    offset: int
    symbol: _Symbol
    rtype: int
    addend: int


def is_kpatch_section(name: str) -> bool:
    """A section made by the asm diff (``.kpatch.text``, ``.kpatch.info``, ...)."""
    return name.startswith(patchfile.KPATCH_SECTION_PREFIX)


def has_patch_sections(path: str) -> bool:
    """True if the ELF file at ``path`` has a non-empty ``.kpatch.info``."""
    with open(path, "rb") as stream:
        elf = ELFFile(stream)
        info = elf.get_section_by_name(patchfile.SECTION_INFO)
        return info is not None and bool(patchfile.decode_info_table(info.data()))


def has_symbol_table(path: str) -> bool:
    """True if the ELF file at ``path`` still has its ``.symtab`` (was not stripped)."""
    with open(path, "rb") as stream:
        return ELFFile(stream).get_section_by_name(".symtab") is not None


def extract_image(patched_path: str, original_path: str) -> ExtractedPatch:
    """The patch's ELF image from the patched binary and its original twin."""
    with open(patched_path, "rb") as patched_stream, open(original_path, "rb") as original_stream:
        try:
            patched = ELFFile(patched_stream)
            check_comdat_copies(patched, patched_path)
            return _Extractor(patched, ELFFile(original_stream), patched_path).run()
        except (BuildError, UnpatchableChange):
            raise
        except Exception as exc:  # pyelftools raises many kinds on malformed input
            raise BuildError(f"{patched_path}: cannot extract the patch: {exc}") from None


def check_comdat_copies(patched: ELFFile, label: str) -> None:
    """Refuse inline functions and template instances whose new copies differ between
    units: the link kept one of them for all (:mod:`..asm.comdat`)."""
    section = patched.get_section_by_name(comdat.DIGEST_SECTION)
    differing = comdat.differing_copies(section.data()) if section is not None else []
    if differing:
        raise UnpatchableChange(
            f"{label}: {', '.join(demangle(differing))}: inline function or template instance changed differently "
            "in different units (compiled with different flags or macros?); a patch can carry only one copy")


def extract_patch(patched_path: str, original_path: str, build_id: str | None = None,
                  level: int = 0) -> tuple[patchfile.PatchFile, ExtractedPatch]:
    """The patch file for ``original_path`` (build-id read from it unless given)."""
    from ..elf import read_build_id

    extracted = extract_image(patched_path, original_path)
    build_id = build_id or read_build_id(original_path)
    if not build_id:
        raise BuildError(f"{original_path} has no GNU build-id: link it with -Wl,--build-id")
    return patchfile.make_patch(build_id, extracted.elf_image, level=level), extracted


class _Extractor:
    """One extraction: reads both binaries, builds sections, symbols and relocations."""

    def __init__(self, patched: ELFFile, original: ELFFile, label: str) -> None:
        self.patched = patched
        self.original = original
        self.label = label
        self.symtab = patched.get_section_by_name(".symtab")
        if self.symtab is None:
            raise BuildError(f"{label} has no .symtab: do not strip the patched binary")
        self.sections: list[_Section] = [_Section("", "SHT_NULL", 0, 0)]
        self.index_of: dict[int, int] = {}     # patched section index -> output index
        self.patched_addr: dict[int, int] = {}  # patched section index -> its sh_addr
        self.symbols: dict[_Symbol, None] = {}  # insertion-ordered set
        self.original_sections = {s.name: s for s in original.iter_sections() if s["sh_flags"] & SH_FLAGS.SHF_ALLOC}
        self._original_offsets: dict[tuple[str, str], set[int]] | None = None

    # -- sections ------------------------------------------------------------------
    def run(self) -> ExtractedPatch:
        kpatch_indices = self._collect_sections()
        if not any(self.sections[self.index_of[i]].name == patchfile.SECTION_INFO for i in kpatch_indices):
            raise BuildError(f"{self.label} has no {patchfile.SECTION_INFO} section: nothing to extract")
        relocations: dict[int, list[_Rela]] = {}
        for rela in self.patched.iter_sections():
            if rela["sh_type"] != "SHT_RELA" or rela["sh_info"] not in kpatch_indices:
                continue
            if self.patched.get_section(rela["sh_link"]).name != ".symtab":
                raise BuildError(f"{self.label}: {rela.name} does not use .symtab: link with -Wl,-q")
            target = rela["sh_info"]
            relocations.setdefault(target, []).extend(self._rewrite(rela, target))
        functions, new_functions = self._check_info(relocations)
        for index in kpatch_indices:
            if self.sections[self.index_of[index]].name == patchfile.SECTION_INFO:
                self.sections[self.index_of[index]].data += patchfile.info_terminator()
            if self.sections[self.index_of[index]].name == patchfile.SECTION_EH_FRAME:
                self.sections[self.index_of[index]].data += patchfile.EH_FRAME_TERMINATOR
                self.sections.append(_Section(
                    patchfile.SECTION_EH_OBJECT, "SHT_PROGBITS", SH_FLAGS.SHF_ALLOC | SH_FLAGS.SHF_WRITE, 0,
                    data=bytes(patchfile.EH_OBJECT_SIZE), size=patchfile.EH_OBJECT_SIZE, sh_addralign=8))
        return ExtractedPatch(self._write(relocations), functions, new_functions)

    def _collect_sections(self) -> list[int]:
        kpatch_indices = []
        for index, section in enumerate(self.patched.iter_sections()):
            self.patched_addr[index] = section["sh_addr"]
            if is_kpatch_section(section.name) and section["sh_type"] != "SHT_RELA":
                data = b"" if section["sh_type"] == "SHT_NOBITS" else section.data()
                self.index_of[index] = len(self.sections)
                self.sections.append(_Section(
                    section.name, section["sh_type"], section["sh_flags"], 0, data=data,
                    size=section["sh_size"], sh_addralign=max(section["sh_addralign"], 1),
                    sh_entsize=section["sh_entsize"]))
                kpatch_indices.append(index)
            elif section["sh_flags"] & SH_FLAGS.SHF_ALLOC and not is_kpatch_section(section.name):
                original = self.original_sections.get(section.name)
                self.index_of[index] = len(self.sections)
                self.sections.append(_Section(
                    section.name, "SHT_NOBITS", section["sh_flags"],
                    original["sh_addr"] if original is not None else 0,
                    size=original["sh_size"] if original is not None else 0,
                    sh_addralign=max(section["sh_addralign"], 1), sh_entsize=section["sh_entsize"]))
        return kpatch_indices

    def _placeholder(self, patched_index: int, why: str) -> int:
        out_index = self.index_of.get(patched_index)
        if out_index is None:
            name = self.patched.get_section(patched_index).name
            raise BuildError(f"{self.label}: {why} refers to non-allocated section {name}")
        section = self.sections[out_index]
        if section.sh_type == "SHT_NOBITS" and not is_kpatch_section(section.name) and section.sh_addr == 0:
            raise BuildError(f"{self.label}: {why} refers to section {section.name}, which the original lacks")
        return out_index

    # -- symbols -------------------------------------------------------------------
    def _section_symbol(self, out_index: int) -> _Symbol:
        return _Symbol("", 0, 0, "STB_LOCAL", "STT_SECTION", out_index)

    def output_symbol(self, symbol, addend: int, why: str) -> tuple[_Symbol, int]:
        """The output symbol and addend standing for ``symbol + addend`` of the patched link."""
        shndx = symbol["st_shndx"]
        sym_type = symbol["st_info"]["type"]
        bind = symbol["st_info"]["bind"]
        if shndx == "SHN_UNDEF":
            return _Symbol(symbol.name, 0, 0, bind, sym_type, "SHN_UNDEF"), addend
        if shndx == "SHN_ABS":
            return _Symbol(symbol.name, symbol["st_value"], symbol["st_size"], bind, sym_type, "SHN_ABS"), addend
        if not isinstance(shndx, int):
            raise BuildError(f"{self.label}: {why}: symbol {symbol.name} in {shndx} is not supported")
        out_index = self._placeholder(shndx, why)
        in_placeholder = not is_kpatch_section(self.sections[out_index].name)
        if sym_type == "STT_SECTION":
            if in_placeholder:
                self._require_same_layout(shndx, why)
            return self._section_symbol(out_index), addend
        offset = symbol["st_value"] - self.patched_addr[shndx]
        if sym_type == "STT_TLS":
            return _Symbol(symbol.name, symbol["st_value"], symbol["st_size"], bind, sym_type, out_index), addend
        if symbol.name.startswith(".") or sym_type == "STT_NOTYPE":
            # Local labels (.LC0, ...) and untyped labels: section symbol + offset.
            if in_placeholder:
                self._require_same_layout(shndx, why)
            return self._section_symbol(out_index), offset + addend
        if in_placeholder:
            offset = self._original_offset(symbol.name, shndx, offset, why)
        visibility = symbol["st_other"]["visibility"]
        return _Symbol(symbol.name, offset, symbol["st_size"], bind, sym_type, out_index, visibility), addend

    def _require_same_layout(self, patched_index: int, why: str) -> None:
        """Section-relative references need the section laid out as in the original."""
        section = self.patched.get_section(patched_index)
        original = self.original_sections.get(section.name)
        if original is not None and original["sh_size"] != section["sh_size"]:
            raise BuildError(
                f"{self.label}: {why}: section {section.name} has {section['sh_size']} bytes in the patched link "
                f"but {original['sh_size']} in the original (a new copy relocation?): cannot map the reference")

    def _original_offset(self, name: str, patched_index: int, offset: int, why: str) -> int:
        """The offset of symbol ``name`` in its section of the ORIGINAL object.

        Normally equal to the patched offset; differs when the linker shifted the
        section's contents (e.g. a new copy relocation in .bss), refused when the
        original has no such symbol.
        """
        if self._original_offsets is None:
            self._original_offsets = {}
            symtab = self.original.get_section_by_name(".symtab")
            if symtab is None:
                return offset                 # stripped original: trust the layout
            sections = list(self.original.iter_sections())
            for symbol in symtab.iter_symbols():
                shndx = symbol["st_shndx"]
                if symbol.name and isinstance(shndx, int) and shndx < len(sections):
                    section = sections[shndx]
                    self._original_offsets.setdefault((symbol.name, section.name), set()).add(
                        symbol["st_value"] - section["sh_addr"])
        if not self._original_offsets:
            return offset
        section_name = self.patched.get_section(patched_index).name
        offsets = self._original_offsets.get((name, section_name), set())
        if offset in offsets:
            return offset
        if len(offsets) == 1:
            return next(iter(offsets))
        if not offsets:
            raise BuildError(f"{self.label}: {why}: {name} is not in {section_name} of the original object "
                             "(a new copy relocation or a changed layout?)")
        raise BuildError(f"{self.label}: {why}: {name} moved in {section_name} and is ambiguous in the original")

    # -- relocations ---------------------------------------------------------------
    def _rewrite(self, rela_section, target: int) -> list[_Rela]:
        section = self.sections[self.index_of[target]]
        base = self.patched_addr[target]
        rewritten = []
        for reloc in rela_section.iter_relocations():
            rtype = reloc["r_info_type"]
            offset = reloc["r_offset"] - base
            symbol = self.symtab.get_symbol(reloc["r_info_sym"])
            where = f"{section.name}+{offset:#x}"
            rule = RELOCATION_RULES.get(rtype)
            if rule is None:
                raise BuildError(f"{self.label}: {where}: unsupported relocation {_RELOC_NAMES.get(rtype, rtype)}")
            if rule == "drop":
                continue
            if rule == "tls" or (symbol["st_info"]["type"] == "STT_TLS" and rule not in ("tpoff32", "gottpoff")):
                raise BuildError(f"{self.label}: {where}: non-supported TLS model "
                                 f"({_RELOC_NAMES.get(rtype, rtype)} against {symbol.name})")
            addend = reloc["r_addend"]
            if rule == "tpoff32":
                self._check_tp_offset(symbol, where)
                continue
            if rule == "gottpoff":
                addend = self._original_tls_got_slot(symbol, where)
            if rule == "pc32":
                rtype = R["R_X86_64_PC32"]
            if rule == "got" and symbol["st_shndx"] != "SHN_UNDEF":
                self._mov_to_lea(section, offset, where)
            out_symbol, out_addend = self.output_symbol(symbol, addend, where)
            if rule == "gottpoff":
                out_addend = addend
            self.symbols.setdefault(out_symbol)
            rewritten.append(_Rela(offset, out_symbol, rtype, out_addend))
        return rewritten

    def _mov_to_lea(self, section: _Section, offset: int, where: str) -> None:
        opcode_at = offset - 2
        if opcode_at < 0 or opcode_at >= len(section.data):
            raise BuildError(f"{self.label}: {where}: GOT access outside the section")
        opcode = section.data[opcode_at]
        if opcode == _LEA_OPCODE:
            return
        if opcode != _MOV_OPCODE:
            raise BuildError(f"{self.label}: {where}: GOT access by opcode {opcode:#04x} cannot become a lea")
        data = bytearray(section.data)
        data[opcode_at] = _LEA_OPCODE
        section.data = bytes(data)

    @staticmethod
    def _tls_end(elf: ELFFile) -> int:
        for segment in elf.iter_segments():
            if segment["p_type"] == "PT_TLS":
                align = max(segment["p_align"], 1)
                return (segment["p_memsz"] + align - 1) // align * align
        return 0

    def _original_symbol(self, name: str):
        symtab = self.original.get_section_by_name(".symtab")
        found = symtab.get_symbol_by_name(name) if symtab is not None else None
        return found[0] if found else None

    def _check_tp_offset(self, symbol, where: str) -> None:
        original = self._original_symbol(symbol.name)
        if original is None:
            raise BuildError(f"{self.label}: {where}: TLS variable {symbol.name} is not in the original object")
        patched_tp = symbol["st_value"] - self._tls_end(self.patched)
        original_tp = original["st_value"] - self._tls_end(self.original)
        if patched_tp != original_tp:
            raise BuildError(f"{self.label}: {where}: TLS variable {symbol.name} moved "
                             f"(tp offset {patched_tp} vs {original_tp} in the original)")

    def _original_tls_got_slot(self, symbol, where: str) -> int:
        """The vaddr of the original's GOT slot holding ``symbol``'s TP offset."""
        original = self._original_symbol(symbol.name)
        defined = original is not None and original["st_shndx"] != "SHN_UNDEF"
        for rela in self.original.iter_sections():
            if rela["sh_type"] != "SHT_RELA" or not rela["sh_flags"] & SH_FLAGS.SHF_ALLOC:
                continue
            dynsym = self.original.get_section(rela["sh_link"]) if rela["sh_link"] else None
            for reloc in rela.iter_relocations():
                if reloc["r_info_type"] != R["R_X86_64_TPOFF64"]:
                    continue
                sym_index = reloc["r_info_sym"]
                if sym_index == 0:
                    if defined and reloc["r_addend"] == original["st_value"]:
                        return reloc["r_offset"]
                elif dynsym is not None and dynsym.get_symbol(sym_index).name == symbol.name.split("@")[0]:
                    return reloc["r_offset"]
        raise BuildError(f"{self.label}: {where}: no GOT slot for TLS variable {symbol.name} in the original object")

    # -- .kpatch.info ------------------------------------------------------------------
    def _check_info(self, relocations: dict[int, list[_Rela]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Name every info record's functions by FUNC symbols; refuse too small functions."""
        info_index = next(i for i, out in self.index_of.items() if self.sections[out].name == patchfile.SECTION_INFO)
        info = self.sections[self.index_of[info_index]]
        entries = patchfile.decode_info_table(info.data)
        by_offset = {rela.offset: rela for rela in relocations.get(info_index, [])}
        functions: list[str] = []
        new_functions: list[str] = []
        for number, entry in enumerate(entries):
            base = number * patchfile.INFO_ENTRY_SIZE
            new_rela = by_offset.get(base + patchfile.INFO_FIELD_OFFSETS["saddr"])
            if new_rela is None:
                raise BuildError(f"{self.label}: {patchfile.SECTION_INFO} record {number} names no new function")
            new_symbol = self._as_function(new_rela, f"record {number} new function")
            if not self._in_kpatch_section(new_symbol):
                raise BuildError(f"{self.label}: {patchfile.SECTION_INFO} record {number}: new function "
                                 f"{new_symbol.name} is not in a .kpatch section")
            old_rela = by_offset.get(base + patchfile.INFO_FIELD_OFFSETS["daddr"])
            if old_rela is None:
                if entry.dlen:
                    raise BuildError(f"{self.label}: {patchfile.SECTION_INFO} record {number} has no original function")
                new_functions.append(_strip_suffix(new_symbol.name))
                continue
            old_symbol = self._as_function(old_rela, f"record {number} original function",
                                           preferred=_strip_suffix(new_symbol.name))
            if not isinstance(old_symbol.shndx, int) or self._in_kpatch_section(old_symbol):
                raise BuildError(f"{self.label}: {patchfile.SECTION_INFO} record {number}: original function "
                                 f"{old_symbol.name} is not in the original code")
            if entry.dlen < MIN_FUNCTION_SIZE:
                raise BuildError(f"function {old_symbol.name} is too small to patch "
                                 f"({entry.dlen} bytes, a jump needs {MIN_FUNCTION_SIZE})")
            self._check_kept_copy(old_symbol, entry.dlen)
            functions.append(old_symbol.name)
        return tuple(functions), tuple(new_functions)

    def _check_kept_copy(self, old_symbol: _Symbol, length: int) -> None:
        """A weak function (an inline function or template instance, one copy per unit)
        must be replaced as long as the copy the original link kept: the record comes
        from the unit whose new copy the patched link kept, maybe not the same unit."""
        if old_symbol.bind != "STB_WEAK":
            return
        kept = self._original_symbol(old_symbol.name)
        if kept is not None and kept["st_size"] != length:
            raise BuildError(f"{self.label}: {demangle([old_symbol.name])[0]}: the original keeps a copy of "
                             f"{kept['st_size']} bytes, the patch replaces one of {length} (the units' copies "
                             "differ: compiled with different flags?)")

    def _in_kpatch_section(self, symbol: _Symbol) -> bool:
        return isinstance(symbol.shndx, int) and is_kpatch_section(self.sections[symbol.shndx].name)

    def _as_function(self, rela: _Rela, why: str, preferred: str = "") -> _Symbol:
        """Make ``rela`` refer to a FUNC symbol (gas often writes section + offset)."""
        symbol = rela.symbol
        if symbol.sym_type == "STT_FUNC" and rela.addend == 0:
            return symbol
        if symbol.sym_type != "STT_SECTION":
            raise BuildError(f"{self.label}: {patchfile.SECTION_INFO} {why} is {symbol.name}, not a function")
        out_index = symbol.shndx
        patched_index = next(p for p, o in self.index_of.items() if o == out_index)
        address = self.patched_addr[patched_index] + rela.addend
        candidates = [s for s in self.symtab.iter_symbols()
                      if s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] == patched_index
                      and s["st_value"] == address]
        if not candidates:
            raise BuildError(f"{self.label}: {patchfile.SECTION_INFO} {why}: no function at "
                             f"{self.sections[out_index].name}+{rela.addend:#x}")
        candidates.sort(key=lambda s: (s.name != preferred, s.name != preferred + patchfile.NEW_SYMBOL_SUFFIX,
                                       s["st_info"]["bind"] != "STB_GLOBAL"))
        chosen, _ = self.output_symbol(candidates[0], 0, why)
        self.symbols.setdefault(chosen)
        rela.symbol, rela.addend = chosen, 0
        return chosen

    # -- writing -------------------------------------------------------------------
    def _write(self, relocations: dict[int, list[_Rela]]) -> bytes:
        """The relocatable ELF image: symbols, relocation sections, string tables, then layout."""
        structs = ELFStructs(little_endian=True, elfclass=64)
        structs.create_basic_structs()
        structs.create_advanced_structs("ET_REL", "EM_X86_64", "ELFOSABI_SYSV")
        self._add_kpatch_symbols()
        ordered = [s for s in self.symbols if s.bind == "STB_LOCAL"]
        ordered += [s for s in self.symbols if s.bind != "STB_LOCAL"]
        symtab_index = len(self.sections) + len(relocations)
        self._append_relocation_sections(structs, relocations, ordered, symtab_index)
        self._append_symbol_tables(structs, ordered, symtab_index)
        name_offsets = self._append_section_names()
        return _layout_image(structs, self.sections, name_offsets)

    def _add_kpatch_symbols(self) -> None:
        """Every kpatch section gets a section symbol; functions and objects in them a symbol."""
        for out_index in self.index_of.values():
            if is_kpatch_section(self.sections[out_index].name):
                self.symbols.setdefault(self._section_symbol(out_index))
        for symbol in self.symtab.iter_symbols():
            shndx = symbol["st_shndx"]
            if (isinstance(shndx, int) and shndx in self.index_of
                    and is_kpatch_section(self.sections[self.index_of[shndx]].name)
                    and symbol["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT")):
                self.symbols.setdefault(self.output_symbol(symbol, 0, "symbol")[0])

    def _append_relocation_sections(self, structs: ELFStructs, relocations: dict[int, list[_Rela]],
                                    ordered: list[_Symbol], symtab_index: int) -> None:
        """One ``.rela<section>`` per patched section, entries sorted by offset."""
        symbol_index = {symbol: number + 1 for number, symbol in enumerate(ordered)}
        for patched_index in sorted(relocations):
            target = self.index_of[patched_index]
            data = b"".join(structs.Elf_Rela.build(_container({
                "r_offset": rela.offset, "r_info": (symbol_index[rela.symbol] << 32) | rela.rtype,
                "r_info_sym": 0, "r_info_type": 0, "r_addend": rela.addend}))
                for rela in sorted(relocations[patched_index], key=lambda r: r.offset))
            self.sections.append(_Section(".rela" + self.sections[target].name, "SHT_RELA", _SHF_INFO_LINK, 0,
                                          data=data, sh_addralign=8, sh_entsize=24,
                                          sh_link=symtab_index, sh_info=target))

    def _append_symbol_tables(self, structs: ELFStructs, ordered: list[_Symbol], symtab_index: int) -> None:
        """``.symtab`` (locals first, as ELF requires) and its ``.strtab``."""
        first_global = 1 + sum(1 for s in ordered if s.bind == "STB_LOCAL")
        strtab = _StringTable()
        symtab_bytes = structs.Elf_Sym.build(_container(_sym_fields("", 0, 0, "STB_LOCAL", "STT_NOTYPE", "SHN_UNDEF", 0)))
        for symbol in ordered:
            symtab_bytes += structs.Elf_Sym.build(_container(_sym_fields(
                symbol.name, symbol.value, symbol.size, symbol.bind, symbol.sym_type, symbol.shndx,
                strtab.add(symbol.name) if symbol.name else 0, symbol.visibility)))
        self.sections.append(_Section(".symtab", "SHT_SYMTAB", 0, 0, data=symtab_bytes, sh_addralign=8,
                                      sh_entsize=24, sh_link=symtab_index + 1, sh_info=first_global))
        self.sections.append(_Section(".strtab", "SHT_STRTAB", 0, 0, data=strtab.data()))

    def _append_section_names(self) -> list[int]:
        """``.shstrtab`` appended last; the name offset of every section, in order."""
        shstrtab = _StringTable()
        name_offsets = [shstrtab.add(section.name) if section.name else 0 for section in self.sections]
        name_offsets.append(shstrtab.add(".shstrtab"))
        self.sections.append(_Section(".shstrtab", "SHT_STRTAB", 0, 0, data=shstrtab.data()))
        return name_offsets


def _section_bodies(sections: list[_Section], ehdr_size: int) -> tuple[bytes, list[int]]:
    """The section contents after the ELF header, and their offsets in the image.

    Each is aligned where it will be in memory: the image starts ``HEADER_SIZE`` bytes into
    the patch file, which is mapped at a page boundary (a 32-byte aligned new variable).
    """
    body = bytearray()
    offsets = []
    for section in sections:
        align = max(section.sh_addralign, 1) if section.data else 1
        position = patchfile.HEADER_SIZE + ehdr_size + len(body)
        body += b"\0" * ((-position) % align)
        offsets.append(ehdr_size + len(body))
        body += section.data
    body += b"\0" * ((-(ehdr_size + len(body))) % 8)
    return bytes(body), offsets


def _section_header(section: _Section, name_offset: int, offset: int) -> dict:
    """The ``Elf64_Shdr`` fields of one section (all zero for the null section)."""
    if section.sh_type == "SHT_NULL":
        return dict(sh_name=0, sh_type="SHT_NULL", sh_flags=0, sh_addr=0, sh_offset=0, sh_size=0,
                    sh_link=0, sh_info=0, sh_addralign=0, sh_entsize=0)
    size = len(section.data) if section.sh_type != "SHT_NOBITS" else section.size
    return dict(sh_name=name_offset, sh_type=section.sh_type, sh_flags=section.sh_flags,
                sh_addr=section.sh_addr, sh_offset=offset, sh_size=size,
                sh_link=section.sh_link, sh_info=section.sh_info,
                sh_addralign=section.sh_addralign, sh_entsize=section.sh_entsize)


def _layout_image(structs: ELFStructs, sections: list[_Section], name_offsets: list[int]) -> bytes:
    """ELF header, section contents, section header table: the relocatable object's bytes."""
    ehdr_size = structs.Elf_Ehdr.sizeof()
    body, offsets = _section_bodies(sections, ehdr_size)
    shoff = ehdr_size + len(body)
    headers = b"".join(
        structs.Elf_Shdr.build(_container(_section_header(section, name_offsets[number], offsets[number])))
        for number, section in enumerate(sections)
    )
    ehdr = structs.Elf_Ehdr.build(_container({
        "e_ident": {"EI_MAG": [0x7F, ord("E"), ord("L"), ord("F")], "EI_CLASS": "ELFCLASS64",
                    "EI_DATA": "ELFDATA2LSB", "EI_VERSION": "EV_CURRENT", "EI_OSABI": "ELFOSABI_SYSV",
                    "EI_ABIVERSION": 0},
        "e_type": "ET_REL", "e_machine": "EM_X86_64", "e_version": "EV_CURRENT", "e_entry": 0,
        "e_phoff": 0, "e_shoff": shoff, "e_flags": 0, "e_ehsize": ehdr_size, "e_phentsize": 0,
        "e_phnum": 0, "e_shentsize": structs.Elf_Shdr.sizeof(), "e_shnum": len(sections),
        "e_shstrndx": len(sections) - 1,
    }))
    return ehdr + body + headers


def _container(fields: dict) -> Container:
    """pyelftools' structs build from attribute containers, nested ones too."""
    return Container(**{key: _container(value) if isinstance(value, dict) else value
                        for key, value in fields.items()})


def _sym_fields(name: str, value: int, size: int, bind: str, sym_type: str, shndx: int | str,
                name_offset: int, visibility: str = "STV_DEFAULT") -> dict:
    del name
    return {"st_name": name_offset, "st_value": value, "st_size": size,
            "st_info": {"bind": bind, "type": sym_type},
            "st_other": {"local": 0, "visibility": visibility}, "st_shndx": shndx}


def _strip_suffix(name: str) -> str:
    suffix = patchfile.NEW_SYMBOL_SUFFIX
    return name[: -len(suffix)] if name.endswith(suffix) else name


class _StringTable:
    """An ELF string table being built (deduplicated names)."""

    def __init__(self) -> None:
        self._data = bytearray(b"\0")
        self._offsets: dict[str, int] = {}

    def add(self, name: str) -> int:
        if name not in self._offsets:
            self._offsets[name] = len(self._data)
            self._data += name.encode("utf-8", errors="surrogateescape") + b"\0"
        return self._offsets[name]

    def data(self) -> bytes:
        return bytes(self._data)

