"""What we read from ELF files, all through pyelftools.

The build side reads the objects it links; the apply side reads the objects a patient
maps. Parsed facts are cached per file identity (device, inode, size, mtime) so that one
parse serves every process mapping the same object.
"""

from __future__ import annotations

import os
import struct

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .errors import CareError

ELF_MAGIC = b"\x7fELF"
NT_GNU_BUILD_ID = 3


class ElfError(CareError):
    """An ELF file could not be read."""


def build_id_from_notes(note_bytes: bytes) -> str | None:
    """The GNU build-id (lowercase hex) in raw ELF note bytes, or None.

    Pure: works on notes read from a file or from a patient's memory.
    """
    offset = 0
    while offset + 12 <= len(note_bytes):
        namesz, descsz, note_type = struct.unpack_from("<III", note_bytes, offset)
        name_start = offset + 12
        desc_start = name_start + ((namesz + 3) & ~3)
        desc_end = desc_start + descsz
        if desc_end > len(note_bytes):
            return None
        name = note_bytes[name_start:name_start + namesz].rstrip(b"\0")
        if note_type == NT_GNU_BUILD_ID and name == b"GNU" and descsz:
            return note_bytes[desc_start:desc_end].hex()
        offset = desc_start + ((descsz + 3) & ~3)
    return None


def read_build_id(path: str) -> str | None:
    """The GNU build-id of the ELF file at ``path``, or None if it has none."""
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            for segment in elf.iter_segments():
                if segment["p_type"] == "PT_NOTE":
                    found = build_id_from_notes(segment.data())
                    if found:
                        return found
            for section in elf.iter_sections():
                if section["sh_type"] == "SHT_NOTE":
                    found = build_id_from_notes(section.data())
                    if found:
                        return found
    except (OSError, ELFError) as exc:
        raise ElfError(f"cannot read ELF file {path}: {exc}") from None
    return None


def is_elf(path: str) -> bool:
    """True if ``path`` is a regular file starting with the ELF magic."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as stream:
            return stream.read(4) == ELF_MAGIC
    except OSError:
        return False
