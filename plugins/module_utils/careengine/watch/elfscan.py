"""The few facts the service needs from an ELF file, read with ``struct`` from its start.

Fast enough to look at every file of a few directories (tens of microseconds each):
build-id (from the PT_NOTE segments), whether it has an interpreter (dynamically linked)
and a PT_GNU_RELRO segment (the loader's ``mprotect`` of it marks the end of its
relocation: see :mod:`.catch`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..elf import build_id_from_notes

_IDENT = b"\x7fELF\x02\x01"                      # 64-bit little-endian
_EHDR = struct.Struct("<HHIQQQIHHH")            # from offset 16
_PHDR = struct.Struct("<IIQQQQQQ")
PT_INTERP = 3
PT_NOTE = 4
PT_GNU_RELRO = 0x6474E552
_HEAD = 4096
_MAX_NOTES = 64 * 1024


@dataclass(frozen=True)
class ElfFacts:
    """What :func:`elf_facts` found in one file."""

    build_id: str | None
    has_interp: bool
    relro_offset: int | None        # file offset of the PT_GNU_RELRO segment


def elf_facts(path: str) -> ElfFacts | None:
    """The facts of the ELF file at ``path``; None if it is not a 64-bit ELF file."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(_HEAD)
            if not head.startswith(_IDENT) or len(head) < 64:
                return None
            fields = _EHDR.unpack_from(head, 16)
            phoff, phentsize, phnum = fields[4], fields[8], fields[9]
            if phentsize != _PHDR.size:
                return None
            end = phoff + phnum * phentsize
            table = head[phoff:end] if end <= len(head) else _read_at(stream, phoff, end - phoff)
            has_interp = False
            relro = None
            build_id = None
            for index in range(phnum):
                p_type, _flags, p_offset, _vaddr, _paddr, p_filesz, _memsz, _align = _PHDR.unpack_from(
                    table, index * _PHDR.size)
                if p_type == PT_INTERP:
                    has_interp = True
                elif p_type == PT_GNU_RELRO:
                    relro = p_offset
                elif p_type == PT_NOTE and build_id is None and p_filesz <= _MAX_NOTES:
                    notes = (head[p_offset:p_offset + p_filesz] if p_offset + p_filesz <= len(head)
                             else _read_at(stream, p_offset, p_filesz))
                    build_id = build_id_from_notes(notes)
            return ElfFacts(build_id, has_interp, relro)
    except (OSError, struct.error):
        return None


def _read_at(stream, offset: int, size: int) -> bytes:
    stream.seek(offset)
    return stream.read(size)
