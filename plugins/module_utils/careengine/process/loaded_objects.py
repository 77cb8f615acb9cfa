"""The ELF objects (executable, libraries) a process maps, read from its memory.

Headers and build-ids come from the patient's memory, so they are right even when the
file was deleted, replaced or lives in another mount namespace; the file is only a
fallback (through ``/proc/PID/map_files`` or ``/proc/PID/root``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from elftools.elf.enums import ENUM_E_TYPE, ENUM_EI_CLASS, ENUM_EI_DATA, ENUM_P_TYPE_BASE

from .. import elf
from ..errors import CareError
from ..patchfile import HEADER_SIZE as PATCH_HEADER_SIZE
from ..patchfile import MAGIC as PATCH_MAGIC
from .maps import Mapping, page_down, read_maps
from .memory import read_ranges_lenient

ELFCLASS64 = ENUM_EI_CLASS["ELFCLASS64"]
ELFDATA2LSB = ENUM_EI_DATA["ELFDATA2LSB"]
ET_EXEC = ENUM_E_TYPE["ET_EXEC"]
ET_DYN = ENUM_E_TYPE["ET_DYN"]
PT_LOAD = ENUM_P_TYPE_BASE["PT_LOAD"]
PT_NOTE = ENUM_P_TYPE_BASE["PT_NOTE"]
_ELF_TYPE_NAMES = {ET_EXEC: "ET_EXEC", ET_DYN: "ET_DYN"}
# e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum
_EHDR = struct.Struct("<HHIQQQIHHH")
_EHDR_OFFSET = 16
_PHDR = struct.Struct("<IIQQQQQQ")  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_HEADER_READ = 4096
_MAX_NOTE_SIZE = 64 * 1024


@dataclass(frozen=True)
class MappedObject:
    """An ELF file mapped into a process, with where it was loaded."""

    path: str
    build_id: str | None
    load_bias: int
    start: int
    end: int
    mappings: tuple[Mapping, ...]
    elf_type: str

    def vaddr_to_address(self, vaddr: int) -> int:
        """The patient address of the ELF virtual address ``vaddr``."""
        return self.load_bias + vaddr

    @property
    def deleted(self) -> bool:
        """The file the object was loaded from is gone or replaced."""
        return any(mapping.deleted for mapping in self.mappings)


@dataclass(frozen=True)
class _Segment:
    p_type: int
    p_offset: int
    p_vaddr: int
    p_filesz: int
    p_memsz: int


def group_file_mappings(mappings: list[Mapping]) -> list[list[Mapping]]:
    """File-backed mappings grouped by (dev, inode), groups in maps order.

    A second mapping of a file's start (offset 0) after the first load of that file
    begins a new group: the same library loaded twice (``dlmopen``) is two objects.
    """
    groups: list[list[Mapping]] = []
    current: dict[tuple[str, int], list[Mapping]] = {}
    for mapping in mappings:
        if not mapping.is_file:
            continue
        key = (mapping.dev, mapping.inode)
        group = current.get(key)
        if group is None or (mapping.offset == 0 and any(m.offset == 0 for m in group)):
            group = []
            current[key] = group
            groups.append(group)
        group.append(mapping)
    return groups


def _parse_headers(header: bytes) -> tuple[int, int, int, int] | None:
    """(e_type, e_phoff, e_phentsize, e_phnum) of a 64-bit little-endian ELF header, else None."""
    if len(header) < 64 or header[:4] != elf.ELF_MAGIC or header[4] != ELFCLASS64 or header[5] != ELFDATA2LSB:
        return None
    e_type, _, _, _, e_phoff, _, _, _, e_phentsize, e_phnum = _EHDR.unpack_from(header, _EHDR_OFFSET)
    if e_type not in _ELF_TYPE_NAMES or e_phentsize < _PHDR.size:
        return None
    return e_type, e_phoff, e_phentsize, e_phnum


def _parse_segments(table: bytes, entry_size: int, count: int) -> list[_Segment]:
    segments = []
    for index in range(count):
        p_type, _, p_offset, p_vaddr, _, p_filesz, p_memsz, _ = _PHDR.unpack_from(table, index * entry_size)
        segments.append(_Segment(p_type, p_offset, p_vaddr, p_filesz, p_memsz))
    return segments


def _file_for(pid: int, mapping: Mapping) -> str:
    """A path through which this process's mapped file can be opened from here."""
    return f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}"


def _build_id_from_file(pid: int, mapping: Mapping) -> str | None:
    for candidate in (_file_for(pid, mapping), f"/proc/{pid}/root{mapping.clean_path}"):
        try:
            return elf.read_build_id(candidate)
        except CareError:
            continue
    return None


def _first_mapping(group: list[Mapping]) -> Mapping | None:
    """The mapping of the file's start (offset 0), the one holding the ELF header."""
    for mapping in group:
        if mapping.offset == 0:
            return mapping
    return None


@dataclass(frozen=True)
class _ParsedObject:
    """An object whose ELF and program headers were read from the patient."""

    group: tuple[Mapping, ...]
    first: Mapping
    e_type: int
    segments: tuple[_Segment, ...]


@dataclass(frozen=True)
class _TableRead:
    """An object whose program header table lies beyond the first read: read it apart."""

    group: tuple[Mapping, ...]
    first: Mapping
    e_type: int
    e_phoff: int
    e_phentsize: int
    e_phnum: int


def _header_candidates(mappings: list[Mapping]) -> list[tuple[list[Mapping], Mapping]]:
    """Each file's mappings with the mapping of its start, when that could hold an ELF header."""
    candidates = []
    for group in group_file_mappings(mappings):
        first = _first_mapping(group)
        if first is not None and first.readable and first.size >= 64:
            candidates.append((group, first))
    return candidates


def _parse_candidates(pid: int, candidates: list[tuple[list[Mapping], Mapping]]) -> list[_ParsedObject]:
    """The ELF objects among ``candidates``, in maps order: one bulk read of their first page,
    a second one for the program header tables that do not fit in it."""
    headers = read_ranges_lenient(pid, [(first.start, min(first.size, _HEADER_READ)) for _, first in candidates])
    parsed: list[_ParsedObject | _TableRead] = []
    for (group, first), header in zip(candidates, headers, strict=True):
        facts = _parse_headers(header) if header else None
        if facts is None:
            continue
        e_type, e_phoff, e_phentsize, e_phnum = facts
        table_end = e_phoff + e_phentsize * e_phnum
        if table_end <= len(header):
            segments = tuple(_parse_segments(header[e_phoff:table_end], e_phentsize, e_phnum))
            parsed.append(_ParsedObject(tuple(group), first, e_type, segments))
        else:
            parsed.append(_TableRead(tuple(group), first, e_type, e_phoff, e_phentsize, e_phnum))
    return _read_far_tables(pid, parsed)


def _read_far_tables(pid: int, parsed: list[_ParsedObject | _TableRead]) -> list[_ParsedObject]:
    """``parsed`` with every pending program header table read (one bulk read), order kept;
    an object whose table cannot be read is left out."""
    pending = [item for item in parsed if isinstance(item, _TableRead)]
    if not pending:
        return [item for item in parsed if isinstance(item, _ParsedObject)]
    tables = read_ranges_lenient(
        pid, [(item.first.start + item.e_phoff, item.e_phentsize * item.e_phnum) for item in pending]
    )
    tables_read = iter(tables)
    done = []
    for item in parsed:
        if isinstance(item, _ParsedObject):
            done.append(item)
            continue
        table = next(tables_read)
        if table is not None:
            segments = tuple(_parse_segments(table, item.e_phentsize, item.e_phnum))
            done.append(_ParsedObject(item.group, item.first, item.e_type, segments))
    return done


def _load_bias(parsed: _ParsedObject) -> int:
    """How far the object was moved from its link-time addresses (0 for ET_EXEC)."""
    loads = [segment for segment in parsed.segments if segment.p_type == PT_LOAD]
    if parsed.e_type == ET_EXEC or not loads:
        return 0
    return parsed.first.start - page_down(min(segment.p_vaddr for segment in loads))


def _note_ranges(parsed: _ParsedObject, load_bias: int) -> list[tuple[int, int]]:
    """The patient ranges of the object's PT_NOTE segments that are mapped readable."""
    ranges = []
    for segment in parsed.segments:
        if segment.p_type == PT_NOTE and 0 < segment.p_filesz <= _MAX_NOTE_SIZE:
            address = load_bias + segment.p_vaddr
            if any(m.contains(address) and m.readable for m in parsed.group):
                ranges.append((address, segment.p_filesz))
    return ranges


def _build_ids_from_memory(pid: int, parsed: list[_ParsedObject], load_biases: list[int]) -> dict[int, str]:
    """Build-id per index into ``parsed``, from the notes in the patient's memory (one bulk read)."""
    note_ranges: list[tuple[int, int]] = []
    note_owner: list[int] = []
    for index, (item, load_bias) in enumerate(zip(parsed, load_biases, strict=True)):
        ranges = _note_ranges(item, load_bias)
        note_ranges.extend(ranges)
        note_owner.extend([index] * len(ranges))
    notes = read_ranges_lenient(pid, note_ranges) if note_ranges else []
    build_ids: dict[int, str] = {}
    for owner, note_bytes in zip(note_owner, notes, strict=True):
        if owner not in build_ids and note_bytes:
            found = elf.build_id_from_notes(note_bytes)
            if found:
                build_ids[owner] = found
    return build_ids


def mapped_objects(pid: int, mappings: list[Mapping] | None = None) -> list[MappedObject]:
    """The ELF objects mapped by process ``pid``, in maps order.

    Two bulk reads of the patient's memory serve all objects: one for the first page of
    every object (ELF and program headers), one for the notes holding the build-ids (and
    a third when a program header table lies beyond an object's first page).
    """
    if mappings is None:
        mappings = read_maps(pid)
    parsed = _parse_candidates(pid, _header_candidates(mappings))
    load_biases = [_load_bias(item) for item in parsed]
    build_ids = _build_ids_from_memory(pid, parsed, load_biases)
    objects = []
    for index, item in enumerate(parsed):
        build_id = build_ids.get(index)
        if build_id is None:
            build_id = _build_id_from_file(pid, item.first)
        objects.append(
            MappedObject(
                path=item.first.clean_path,
                build_id=build_id,
                load_bias=load_biases[index],
                start=min(m.start for m in item.group),
                end=max(m.end for m in item.group),
                mappings=item.group,
                elf_type=_ELF_TYPE_NAMES[item.e_type],
            )
        )
    return objects


def find_applied_patches(pid: int, mappings: list[Mapping]) -> list[tuple[Mapping, bytes]]:
    """Anonymous mappings that hold an applied patch, with their 688 header bytes.

    A patch mapping starts with the patch file magic ``KPATCH1\\0``; decode the header
    with ``patchfile.decode_header``. One bulk read for all candidates.
    """
    candidates = [
        mapping
        for mapping in mappings
        if mapping.inode == 0 and not mapping.path and mapping.readable and mapping.size >= PATCH_HEADER_SIZE
    ]
    if not candidates:
        return []
    headers = read_ranges_lenient(pid, [(mapping.start, PATCH_HEADER_SIZE) for mapping in candidates])
    return [
        (mapping, header)
        for mapping, header in zip(candidates, headers, strict=True)
        if header is not None and header.startswith(PATCH_MAGIC)
    ]
