"""The patch's relocatable ELF: read once, then linked for one address in one process.

:func:`read_patch_image` parses sections, symbols and relocations (pure, cached by the
patch's bytes). :func:`link_patch` produces the bytes of the whole patch mapping for a
given mapping address, load bias and resolved imports — pure too, so everything except
IFUNC targets is computed before the patient is stopped.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from ..errors import PatchFormatError
from ..patchfile import (
    HEADER_OFFSETS,
    HEADER_SIZE,
    INFO_ENTRY_SIZE,
    SECTION_INFO,
    InfoEntry,
    PatchFile,
    decode_info_table,
    elf_parse_errors,
    summarize,
)
from .layout import TRAP_BYTE, PatchLayout, jump_table_bytes, plan_layout, round_up
from .object_files import split_version
from .relocate import Relocation, RelocationError, RelocationInput, apply_relocations, relocation_name

SHN_UNDEF = 0
SHF_WRITE = 0x1
SHF_EXECINSTR = 0x4
SHN_ABS = 0xFFF1
STT_SECTION = 3
STT_TLS = 6
STB_LOCAL = 0
STB_WEAK = 2
# Apply-time identity of the patch: CRC-32 of the file's (unrelocated) ELF image, kept in
# the header's entries[3] in the patient copy, so "the same patch at the same level" is
# recognised from memory alone.
IDENTITY_FIELD = HEADER_OFFSETS["_entries_rest"]
# entries[4] of the patient copy: bytes of the writable pages after the read + execute part
# (0 in a patch LibCare applied: one mapping of the size the kernel reports).
DATA_SIZE_FIELD = IDENTITY_FIELD + 4


@dataclass(frozen=True)
class ImageSection:
    index: int
    name: str
    nobits: bool
    sh_addr: int
    sh_offset: int
    size: int
    writable: bool = False   # SHF_WRITE: goes to the patch's writable pages
    align: int = 1
    executable: bool = False  # SHF_EXECINSTR: code (a replacement must live in such a section)


@dataclass(frozen=True)
class ImageSymbol:
    name: str
    value: int
    shndx: int
    sym_type: int
    bind: int

    @property
    def is_import(self) -> bool:
        """An undefined, non-local, non-TLS symbol: found in the patient's libraries."""
        return self.shndx == SHN_UNDEF and self.bind != STB_LOCAL and self.sym_type != STT_TLS and bool(self.name)


@dataclass(frozen=True)
class ImageRelocation:
    section: int         # index of the section the place is in
    offset: int          # place, relative to that section
    symbol: int
    rtype: int
    addend: int


@dataclass(frozen=True)
class PatchImage:
    """A patch's ELF image, parsed."""

    patch: PatchFile
    sections: tuple[ImageSection, ...]
    symbols: tuple[ImageSymbol, ...]
    relocations: tuple[ImageRelocation, ...]
    info_offset: int                    # of .kpatch.info in the ELF image
    info_count: int
    imports: tuple[str, ...]            # undefined symbol names, jump-table order
    entry_names: tuple[str, ...]        # per info record: the function's name
    entry_is_new: tuple[bool, ...]
    identity: int
    data_offsets: tuple[tuple[int, int], ...] = ()   # (section index, offset in the data pages)
    data_size: int = 0

    @property
    def build_id(self) -> str:
        return self.patch.build_id

    @property
    def level(self) -> int:
        return self.patch.level

    @property
    def replaced_functions(self) -> tuple[str, ...]:
        return tuple(name for name, new in zip(self.entry_names, self.entry_is_new, strict=True) if not new)

    def layout(self) -> PatchLayout:
        return plan_layout(self.patch.header.total_size, len(self.imports), self.info_count, self.data_size)


# patch (its whole header and image bytes) -> its parse. Keyed on the patch itself, not on a
# digest of it: a parse carries its patch, whose bytes are what gets written into processes.
_images: dict[PatchFile, PatchImage] = {}


def patch_identity(patch: PatchFile) -> int:
    """What tells two patches apart: CRC-32 of the ELF image (never 0)."""
    return zlib.crc32(patch.elf_image) or 1


def read_patch_image(patch: PatchFile) -> PatchImage:
    """Parse the patch's ELF image (cached: an equal patch, header and bytes, gets the same parse)."""
    cached = _images.get(patch)
    if cached is not None:
        return cached
    identity = patch_identity(patch)
    try:
        image = _parse(patch, identity)
    except PatchFormatError:
        raise
    except elf_parse_errors() as exc:
        raise PatchFormatError(f"patch for {patch.build_id}: ELF image is corrupt: {type(exc).__name__}: {exc}"
                               ) from None
    if len(_images) > 64:
        _images.clear()
    _images[patch] = image
    return image


def _number(value, table: dict[str, int]) -> int:
    return value if isinstance(value, int) else table.get(value, 0)


_TYPES = {"STT_NOTYPE": 0, "STT_OBJECT": 1, "STT_FUNC": 2, "STT_SECTION": 3, "STT_FILE": 4, "STT_TLS": 6,
          "STT_LOOS": 10, "STT_GNU_IFUNC": 10}
_BINDS = {"STB_LOCAL": 0, "STB_GLOBAL": 1, "STB_WEAK": 2}
_SHNDX = {"SHN_UNDEF": SHN_UNDEF, "SHN_ABS": SHN_ABS, "SHN_COMMON": 0xFFF2}


def _parse(patch: PatchFile, identity: int) -> PatchImage:
    elf = ELFFile(io.BytesIO(patch.elf_image))
    sections = [_image_section(patch, index, section) for index, section in enumerate(elf.iter_sections())]
    symbols = _image_symbols(patch, elf)
    relocations = _image_relocations(patch, elf, sections)
    info = next((s for s in sections if s.name == SECTION_INFO and not s.nobits), None)
    if info is None:
        raise PatchFormatError(f"patch for {patch.build_id} has no {SECTION_INFO} section")
    entries = decode_info_table(patch.elf_image[info.sh_offset:info.sh_offset + info.size])
    entry_names, entry_is_new = _entry_names(patch, entries, info, relocations)
    imports = []
    for relocation in relocations:
        symbol = symbols[relocation.symbol]
        if symbol.is_import and symbol.name not in imports:
            imports.append(symbol.name)
    data_offsets, data_size = _data_placement(sections)
    return PatchImage(patch, tuple(sections), symbols, tuple(relocations), info.sh_offset, len(entries),
                      tuple(imports), entry_names, entry_is_new, identity, data_offsets, data_size)


def _image_section(patch: PatchFile, index: int, section) -> ImageSection:
    """One section of the patch's ELF image; a ``.kpatch*`` section must have contents, aligned in the file."""
    nobits = section["sh_type"] == "SHT_NOBITS"
    if section.name.startswith(".kpatch") and section["sh_size"]:
        if nobits:
            raise PatchFormatError(f"patch for {patch.build_id}: {section.name} has no contents in the file")
        # The mapping is page aligned; the image starts at kpatch_offset in it.
        if (patch.header.kpatch_offset + section["sh_offset"]) % max(section["sh_addralign"], 1):
            raise PatchFormatError(f"patch for {patch.build_id}: {section.name} needs {section['sh_addralign']}-"
                                   "byte alignment, which its place in the patch file does not give")
    return ImageSection(index, section.name, nobits, section["sh_addr"],
                        section["sh_offset"], section["sh_size"],
                        bool(section["sh_flags"] & SHF_WRITE) and section.name.startswith(".kpatch"),
                        max(section["sh_addralign"], 1), bool(section["sh_flags"] & SHF_EXECINSTR))


def _image_symbols(patch: PatchFile, elf: ELFFile) -> tuple[ImageSymbol, ...]:
    """The symbol table of the patch's ELF image."""
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        raise PatchFormatError(f"patch for {patch.build_id} has no symbol table")
    return tuple(
        ImageSymbol(symbol.name, symbol["st_value"], _number(symbol["st_shndx"], _SHNDX),
                    _number(symbol["st_info"]["type"], _TYPES), _number(symbol["st_info"]["bind"], _BINDS))
        for symbol in symtab.iter_symbols()
    )


def _image_relocations(patch: PatchFile, elf: ELFFile, sections: list[ImageSection]) -> list[ImageRelocation]:
    """Every RELA entry of the image (SHT_REL is refused; stripped sections must have none left)."""
    relocations = []
    for section in elf.iter_sections():
        if section["sh_type"] == "SHT_REL":
            raise PatchFormatError(f"patch for {patch.build_id}: SHT_REL section {section.name} is not supported")
        if section["sh_type"] != "SHT_RELA":
            continue
        target = sections[section["sh_info"]]
        entries = list(section.iter_relocations())
        if target.nobits:
            # binutils 2.40 leaves .rela.* of stripped sections full of R_X86_64_NONE.
            if any(entry["r_info_type"] != 0 for entry in entries):
                raise PatchFormatError(
                    f"patch for {patch.build_id}: {section.name} relocates {target.name}, which has no contents"
                )
            continue
        for entry in entries:
            relocations.append(ImageRelocation(target.index, entry["r_offset"], entry["r_info_sym"],
                                               entry["r_info_type"], entry["r_addend"]))
    return relocations


def _entry_names(patch: PatchFile, entries: list[InfoEntry], info: ImageSection,
                 relocations: list[ImageRelocation]) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """The function name of each info entry, and whether it is a new function (no original to replace)."""
    summary = summarize(patch)
    names_iter = iter(function.name for function in summary.functions)
    new_iter = iter(summary.new_functions)
    entry_names = []
    entry_is_new = []
    info_relocated = {r.offset for r in relocations if r.section == info.index and r.rtype != 0}
    for number, entry in enumerate(entries):
        is_new = entry.dlen == 0 and (number * INFO_ENTRY_SIZE) not in info_relocated
        entry_is_new.append(is_new)
        entry_names.append(next(new_iter, f"<new {number}>") if is_new else next(names_iter, f"<entry {number}>"))
    return tuple(entry_names), tuple(entry_is_new)


def _data_placement(sections: list[ImageSection]) -> tuple[tuple[tuple[int, int], ...], int]:
    """Where each writable section with contents goes in the data pages, and their size."""
    placed = []
    size = 0
    for section in sections:
        if section.writable and not section.nobits and section.size:
            offset = round_up(size, section.align)
            placed.append((section.index, offset))
            size = offset + section.size
    return tuple(placed), size


@dataclass(frozen=True)
class LinkedPatch:
    """The bytes of a patch mapping for one address, and its info records (absolute)."""

    address: int
    layout: PatchLayout
    mapping: bytes               # header + image + jump table + (zero) undo area + trap
    entries: tuple[InfoEntry, ...]


def section_addresses(image: PatchImage, address: int, load_bias: int) -> dict[int, int]:
    """Patient address of each section: contents live in the mapping (writable ones on the
    data pages); placeholders (original sections) at their link address plus the load bias."""
    kpatch_offset = image.patch.header.kpatch_offset
    data_start = address + image.layout().data_offset
    addresses = {index: data_start + offset for index, offset in image.data_offsets}
    for section in image.sections:
        if section.index in addresses:
            continue
        if not section.nobits and section.index:
            addresses[section.index] = address + kpatch_offset + section.sh_offset
        elif section.sh_addr:
            addresses[section.index] = section.sh_addr + load_bias
        else:
            addresses[section.index] = 0
    return addresses


def link_patch(image: PatchImage, address: int, load_bias: int, import_addresses: dict[str, int]) -> LinkedPatch:
    """Relocate ``image`` for a mapping at ``address`` in an object loaded at ``load_bias``.

    ``import_addresses`` maps every name of ``image.imports`` to its address in the
    patient (an IFUNC's resolver may be given for now and the jump table fixed later).
    """
    layout = image.layout()
    kpatch_offset = image.patch.header.kpatch_offset
    addresses = section_addresses(image, address, load_bias)
    jump_entry = {name: address + layout.jump_entry_offset(i) for i, name in enumerate(image.imports)}
    elf_bytes = bytearray(image.patch.elf_image)
    relocations = [_link_relocation(image, relocation, addresses, import_addresses, jump_entry, load_bias)
                   for relocation in image.relocations]
    apply_relocations(elf_bytes, relocations)

    header = bytearray(image.patch.to_bytes()[:HEADER_SIZE])
    for name, value in (("jmp_offset", layout.jmp_offset), ("user_undo", layout.user_undo),
                        ("user_info", kpatch_offset + image.info_offset), ("user_level", image.level),
                        ("csum", image.patch.header.csum)):
        struct.pack_into("<I", header, HEADER_OFFSETS[name], value & 0xFFFFFFFF)
    struct.pack_into("<I", header, IDENTITY_FIELD, image.identity)
    struct.pack_into("<I", header, DATA_SIZE_FIELD, layout.data_size)
    mapping = bytearray(layout.mapping_size)
    for index, offset in image.data_offsets:       # writable sections move to the data pages
        section = image.sections[index]
        start = layout.data_offset + offset
        mapping[start:start + section.size] = elf_bytes[section.sh_offset:section.sh_offset + section.size]
        elf_bytes[section.sh_offset:section.sh_offset + section.size] = bytes(section.size)
    mapping[:HEADER_SIZE] = header
    mapping[kpatch_offset:kpatch_offset + len(elf_bytes)] = elf_bytes
    if image.imports:
        table = jump_table_bytes([import_addresses[name] for name in image.imports])
        mapping[layout.jmp_offset:layout.jmp_offset + len(table)] = table
    mapping[layout.trap_offset:layout.trap_offset + 1] = TRAP_BYTE
    info_start = kpatch_offset + image.info_offset
    entries = tuple(decode_info_table(bytes(mapping[info_start:info_start + image.info_count * INFO_ENTRY_SIZE + 24])))
    return LinkedPatch(address, layout, bytes(mapping), entries)


def _symbol_value(symbol: ImageSymbol, addresses: dict[int, int], import_addresses: dict[str, int]) -> int:
    """The patient address (or absolute value) a relocation against ``symbol`` uses."""
    if symbol.is_import:
        if symbol.name not in import_addresses:
            raise RelocationError(f"symbol {symbol.name} was not resolved")
        return import_addresses[symbol.name]
    if symbol.sym_type == STT_SECTION:
        return addresses.get(symbol.shndx, 0)
    if symbol.shndx == SHN_ABS or symbol.sym_type == STT_TLS:
        return symbol.value
    if symbol.shndx == SHN_UNDEF:
        if symbol.bind == STB_WEAK or not symbol.name:
            return 0
        raise RelocationError(f"undefined local symbol {symbol.name!r} in the patch")
    return addresses.get(symbol.shndx, 0) + symbol.value


def _link_relocation(image: PatchImage, relocation: ImageRelocation, addresses: dict[int, int],
                     import_addresses: dict[str, int], jump_entry: dict[str, int], load_bias: int) -> Relocation:
    """One relocation of the image, with its symbol's value and its place in the patient."""
    symbol = image.symbols[relocation.symbol]
    value = _symbol_value(symbol, addresses, import_addresses)
    entry = jump_entry[symbol.name] if symbol.is_import else None
    section = image.sections[relocation.section]
    place_in_elf = section.sh_offset + relocation.offset
    place = addresses[section.index] + relocation.offset
    where = f"{section.name}+{relocation.offset:#x} ({relocation_name(relocation.rtype)} {symbol.name or '?'})"
    return Relocation(place_in_elf, relocation.rtype,
                      RelocationInput(value, relocation.addend, place, entry, load_bias), where,
                      (section.sh_offset, section.sh_offset + section.size))


def split_import(name: str) -> tuple[str, str | None]:
    """An import's name and required version."""
    return split_version(name)
