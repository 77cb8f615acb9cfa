"""The binary patch file: the ONE definition of its byte layout.

A patch file is LibCare's ``.kpatch`` format: a 688-byte header (magic ``KPATCH1``)
followed by an ELF64 relocatable object that holds the ``.kpatch.text``, ``.kpatch.data``,
``.kpatch.info`` and ``.kpatch.strtab`` sections and their relocations, padded with
zeros to a multiple of 16. All integers are little-endian.

Compatibility with LibCare goes both ways: files written here load in LibCare's
``libcare-ctl`` and files made by LibCare's ``kpatch_make`` load here. Beyond LibCare,
the header's ``csum`` field carries a CRC-32 of the ELF image; LibCare writes 0 there,
which we accept (no checksum), while a non-zero value that does not match is refused.

Fields of ``entries[16]`` are used at apply time (in the patient's copy): ``user_undo``
(offset of the saved original bytes), ``user_info`` (offset of ``.kpatch.info`` from the
header start) and ``user_level`` (the patch level). We also write the level into
``user_level`` in the file so a flat ``.kpatch`` carries its own level.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from dataclasses import dataclass, field, replace

from .errors import PatchFormatError

MAGIC = b"KPATCH1\0"
HEADER_SIZE = 688
ALIGNMENT = 16
BUILD_ID_FIELD_SIZE = 256

# (field name, struct code). The header layout, described once.
_HEADER_FIELDS: tuple[tuple[str, str], ...] = (
    ("magic", "8s"),
    ("flags", "B"),
    ("safety_method", "B"),
    ("_pad1", "6s"),
    ("modulename", "64s"),
    ("uname", "256s"),          # target build-id, lowercase hex, NUL-terminated
    ("build_time", "Q"),
    ("csum", "I"),
    ("nr_reloc", "I"),
    ("kpatch_offset", "I"),     # offset of the ELF image
    ("rel_offset", "I"),
    ("total_size", "I"),        # header + ELF image rounded up to 16
    ("jmp_offset", "I"),        # apply time: offset of the jump table in the mapping
    ("user_undo", "I"),         # entries[0]: apply time: offset of saved bytes
    ("user_info", "I"),         # entries[1]: apply time: offset of .kpatch.info data
    ("user_level", "I"),        # entries[2]: patch level
    ("_entries_rest", "52s"),   # entries[3..15]
    ("srcversion", "25s"),
    ("_pad2", "231s"),
)
_HEADER_STRUCT = struct.Struct("<" + "".join(code for _, code in _HEADER_FIELDS))
assert _HEADER_STRUCT.size == HEADER_SIZE

# Offsets of the apply-time fields, for the loader that patches them in the patient copy.
HEADER_OFFSETS: dict[str, int] = {}
_offset = 0
for _name, _code in _HEADER_FIELDS:
    HEADER_OFFSETS[_name] = _offset
    _offset += struct.calcsize("<" + _code)
del _offset, _name, _code

# struct kpatch_info: one record of .kpatch.info, 48 bytes.
_INFO_FIELDS: tuple[tuple[str, str], ...] = (
    ("daddr", "Q"),    # original function (0 for a new function)
    ("saddr", "Q"),    # new function
    ("dlen", "I"),     # original function size (0 for a new function)
    ("slen", "I"),     # new function size
    ("symstr", "Q"),   # -> name in .kpatch.strtab
    ("vaddr", "Q"),
    ("flags", "I"),
    ("_pad", "4s"),
)
_INFO_STRUCT = struct.Struct("<" + "".join(code for _, code in _INFO_FIELDS))
INFO_ENTRY_SIZE = _INFO_STRUCT.size
INFO_TERMINATOR_SIZE = 24   # an entry whose first 24 bytes are zero ends the table
INFO_FIELD_OFFSETS = {"daddr": 0, "saddr": 8, "dlen": 16, "slen": 20, "symstr": 24, "vaddr": 32, "flags": 40}
assert INFO_ENTRY_SIZE == 48

JUMP_SIZE = 5               # jmp rel32 written at each replaced function
KPATCH_SECTION_PREFIX = ".kpatch"
SECTION_TEXT = ".kpatch.text"
SECTION_DATA = ".kpatch.data"
SECTION_INFO = ".kpatch.info"
SECTION_STRTAB = ".kpatch.strtab"
# Optional (patches of code with unwind info): the patch code's call-frame records in
# .eh_frame format, ended by a zero 4-byte length, and the exception tables they name.
# A patch without them loads as before; LibCare's tools ignore them.
SECTION_EH_FRAME = ".kpatch.eh_frame"
SECTION_EXCEPT_TABLE = ".kpatch.gcc_except_table"
EH_FRAME_TERMINATOR = b"\0" * 4
# With .kpatch.eh_frame: zeroed writable room for the unwinder's bookkeeping of it
# (libgcc's ``struct object``, 48 bytes on x86-64, then the engine's registration state
# and scratch), so registering it allocates nothing.
SECTION_EH_OBJECT = ".kpatch.eh_object"
EH_OBJECT_SIZE = 96
NEW_SYMBOL_SUFFIX = ".kpatch"


@dataclass(frozen=True)
class PatchHeader:
    """The decoded 688-byte header of a patch file."""

    build_id: str
    level: int = 0
    build_time: int = 0
    csum: int = 0
    kpatch_offset: int = HEADER_SIZE
    rel_offset: int = HEADER_SIZE
    total_size: int = HEADER_SIZE
    jmp_offset: int = 0
    user_undo: int = 0
    user_info: int = 0
    flags: int = 0
    modulename: str = ""


@dataclass(frozen=True)
class InfoEntry:
    """One ``struct kpatch_info`` record: an original function and its replacement."""

    daddr: int
    saddr: int
    dlen: int
    slen: int
    symstr: int = 0
    vaddr: int = 0
    flags: int = 0

    @property
    def is_new(self) -> bool:
        """A new function replaces nothing (``daddr == dlen == 0``)."""
        return self.daddr == 0 and self.dlen == 0


@dataclass(frozen=True)
class ReplacedFunction:
    """A function the patch replaces, by the original symbol's name."""

    name: str
    orig_size: int
    new_size: int


@dataclass(frozen=True)
class PatchSummary:
    """What a patch does, as shown by ``libcare-dump`` and ``info``."""

    build_id: str
    level: int
    total_size: int
    elf_size: int
    build_time: int
    functions: tuple[ReplacedFunction, ...]
    new_functions: tuple[str, ...]
    sections: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict (the ``--json`` form of ``libcare-dump``)."""
        return {
            "build_id": self.build_id,
            "level": self.level,
            "total_size": self.total_size,
            "elf_size": self.elf_size,
            "build_time": self.build_time,
            "functions": [
                {"name": f.name, "orig_size": f.orig_size, "new_size": f.new_size}
                for f in self.functions
            ],
            "new_functions": list(self.new_functions),
            "sections": dict(self.sections),
        }


@dataclass(frozen=True)
class PatchFile:
    """A patch file: its header and the embedded relocatable ELF image."""

    header: PatchHeader
    elf_image: bytes

    @property
    def build_id(self) -> str:
        return self.header.build_id

    @property
    def level(self) -> int:
        return self.header.level

    def with_level(self, level: int) -> PatchFile:
        """The same patch with another patch level in its header."""
        return replace(self, header=replace(self.header, level=level))

    def to_bytes(self) -> bytes:
        """Serialise the patch (header, ELF image, zero padding to 16 bytes)."""
        return encode_patch(self.header, self.elf_image)


def _round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def normalize_build_id(build_id: str) -> str:
    """Lowercase hex build-id; raise PatchFormatError if it is not hex."""
    text = build_id.strip().lower()
    if not text or len(text) % 2 or any(c not in "0123456789abcdef" for c in text):
        raise PatchFormatError(f"invalid build-id {build_id!r}: expected an even number of hex digits")
    if len(text) >= BUILD_ID_FIELD_SIZE:
        raise PatchFormatError(f"build-id {build_id!r} is too long for the patch header")
    return text


def image_checksum(elf_image_padded: bytes) -> int:
    """CRC-32 of the ELF image as stored (with padding); never 0 (0 means 'none')."""
    return zlib.crc32(elf_image_padded) or 1


def encode_patch(header: PatchHeader, elf_image: bytes) -> bytes:
    """Serialise a header and an ELF image into patch file bytes.

    Sizes, offsets and the checksum are computed here; apply-time fields
    (``jmp_offset``, ``user_undo``, ``user_info``) are written as given (0 in files).
    """
    padded = elf_image + b"\0" * (_round_up(len(elf_image), ALIGNMENT) - len(elf_image))
    values = {
        "magic": MAGIC,
        "flags": header.flags,
        "safety_method": 0,
        "_pad1": b"",
        "modulename": header.modulename.encode(),
        "uname": normalize_build_id(header.build_id).encode() + b"\0",
        "build_time": header.build_time,
        "csum": image_checksum(padded),
        "nr_reloc": 0,
        "kpatch_offset": HEADER_SIZE,
        "rel_offset": HEADER_SIZE,
        "total_size": HEADER_SIZE + len(padded),
        "jmp_offset": header.jmp_offset,
        "user_undo": header.user_undo,
        "user_info": header.user_info,
        "user_level": header.level,
        "_entries_rest": b"",
        "srcversion": b"",
        "_pad2": b"",
    }
    raw = _HEADER_STRUCT.pack(*(values[name] for name, _ in _HEADER_FIELDS))
    return raw + padded


def make_patch(build_id: str, elf_image: bytes, level: int = 0, build_time: int | None = None) -> PatchFile:
    """A new patch for the object with ``build_id`` from a relocatable ELF image."""
    _check_elf_image(elf_image)
    header = PatchHeader(
        build_id=normalize_build_id(build_id),
        level=level,
        build_time=int(time.time()) if build_time is None else build_time,
        total_size=HEADER_SIZE + _round_up(len(elf_image), ALIGNMENT),
    )
    return PatchFile(header=header, elf_image=elf_image)


def decode_header(raw: bytes) -> PatchHeader:
    """Decode the first 688 bytes of a patch file (no checks beyond the magic)."""
    if len(raw) < HEADER_SIZE:
        raise PatchFormatError(f"patch file is truncated: {len(raw)} bytes, the header alone is {HEADER_SIZE}")
    fields = dict(zip((name for name, _ in _HEADER_FIELDS), _HEADER_STRUCT.unpack_from(raw, 0), strict=True))
    if fields["magic"] != MAGIC:
        raise PatchFormatError("not a patch file: missing KPATCH1 magic")
    return PatchHeader(
        build_id=_cstr(fields["uname"]).lower(),
        level=fields["user_level"],
        build_time=fields["build_time"],
        csum=fields["csum"],
        kpatch_offset=fields["kpatch_offset"],
        rel_offset=fields["rel_offset"],
        total_size=fields["total_size"],
        jmp_offset=fields["jmp_offset"],
        user_undo=fields["user_undo"],
        user_info=fields["user_info"],
        flags=fields["flags"],
        modulename=_cstr(fields["modulename"]),
    )


def _check_elf_image(elf_image: bytes) -> None:
    if len(elf_image) < 64 or elf_image[:4] != b"\x7fELF":
        raise PatchFormatError("patch file is corrupt: no ELF image after the header")
    if elf_image[4] != 2 or elf_image[5] != 1:
        raise PatchFormatError("patch file is corrupt: ELF image is not 64-bit little-endian")
    e_type, e_machine = struct.unpack_from("<HH", elf_image, 16)
    e_shentsize = struct.unpack_from("<H", elf_image, 58)[0]
    if e_type != 1:
        raise PatchFormatError(f"patch file is corrupt: ELF image is not relocatable (e_type={e_type})")
    if e_machine != 62:
        raise PatchFormatError(f"patch is not for x86_64 (e_machine={e_machine})")
    if e_shentsize != 64:
        raise PatchFormatError("patch file is corrupt: bad ELF section header size")


def decode_patch(raw: bytes, source: str = "patch") -> PatchFile:
    """Decode and verify patch file bytes (magic, sizes, ELF header, checksum)."""
    try:
        header = decode_header(raw)
    except PatchFormatError as exc:
        raise PatchFormatError(f"{source}: {exc}") from None
    if header.kpatch_offset < HEADER_SIZE or header.total_size < header.kpatch_offset:
        raise PatchFormatError(f"{source}: patch file is corrupt: bad offsets in header")
    if header.total_size > len(raw):
        raise PatchFormatError(
            f"{source}: patch file is truncated: header says {header.total_size} bytes, file has {len(raw)}"
        )
    image_padded = raw[header.kpatch_offset:header.total_size]
    if header.csum and image_checksum(image_padded) != header.csum:
        raise PatchFormatError(f"{source}: patch file is corrupt: checksum mismatch")
    try:
        _check_elf_image(image_padded)
    except PatchFormatError as exc:
        raise PatchFormatError(f"{source}: {exc}") from None
    if not header.build_id:
        raise PatchFormatError(f"{source}: patch header names no build-id")
    return PatchFile(header=header, elf_image=bytes(image_padded))


def load_patch(path: str) -> PatchFile:
    """Read and verify the patch file at ``path``."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as exc:
        raise PatchFormatError(f"cannot read patch file {path}: {exc.strerror}") from None
    return decode_patch(raw, source=path)


def save_patch(patch: PatchFile, path: str) -> None:
    """Write ``patch`` to ``path``."""
    with open(path, "wb") as stream:
        stream.write(patch.to_bytes())


def encode_info_entry(entry: InfoEntry) -> bytes:
    """The 48 bytes of one ``.kpatch.info`` record."""
    return _INFO_STRUCT.pack(entry.daddr, entry.saddr, entry.dlen, entry.slen,
                             entry.symstr, entry.vaddr, entry.flags, b"")


def decode_info_table(raw: bytes) -> list[InfoEntry]:
    """Decode ``.kpatch.info`` contents up to the terminator (or the end)."""
    entries = []
    for offset in range(0, len(raw) - INFO_TERMINATOR_SIZE + 1, INFO_ENTRY_SIZE):
        if raw[offset:offset + INFO_TERMINATOR_SIZE] == b"\0" * INFO_TERMINATOR_SIZE:
            break
        if offset + INFO_ENTRY_SIZE > len(raw):
            raise PatchFormatError(".kpatch.info is truncated")
        daddr, saddr, dlen, slen, symstr, vaddr, flags, _ = _INFO_STRUCT.unpack_from(raw, offset)
        entries.append(InfoEntry(daddr, saddr, dlen, slen, symstr, vaddr, flags))
    return entries


def info_terminator() -> bytes:
    """The zero bytes that end a ``.kpatch.info`` table."""
    return b"\0" * INFO_TERMINATOR_SIZE


def elf_parse_errors() -> tuple[type[BaseException], ...]:
    """What pyelftools raises on a malformed ELF image.

    It trusts the image's offsets, counts, links and names, so a corrupt image surfaces as
    any of these rather than only as ``ELFError``; readers of a patch's image turn them into
    :class:`PatchFormatError`.
    """
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError

    return (ELFError, ConstructError, ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError,
            ZeroDivisionError, UnicodeDecodeError, struct.error, EOFError)


def _strip_new_suffix(name: str) -> str:
    return name[: -len(NEW_SYMBOL_SUFFIX)] if name.endswith(NEW_SYMBOL_SUFFIX) else name


def summarize(patch: PatchFile) -> PatchSummary:
    """Decode what the patch replaces and adds, by symbol names.

    Names come from the relocations of ``.kpatch.info``: the one at ``daddr`` names the
    original function, the one at ``saddr`` the new one; a record without a ``daddr``
    relocation (and ``dlen == 0``) is a new function.
    """
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(patch.elf_image))
        info_section = elf.get_section_by_name(SECTION_INFO)
        if info_section is None or info_section["sh_type"] == "SHT_NOBITS":
            raise PatchFormatError("patch has no .kpatch.info section")
        entries = decode_info_table(info_section.data())
        names_at: dict[int, str] = {}
        rela = elf.get_section_by_name(".rela" + SECTION_INFO)
        if rela is not None:
            if rela["sh_type"] != "SHT_RELA":
                raise PatchFormatError(f".rela{SECTION_INFO} is not a relocation section ({rela['sh_type']})")
            symtab = elf.get_section(rela["sh_link"])
            if symtab["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM"):
                raise PatchFormatError(f".rela{SECTION_INFO} links to section {rela['sh_link']}, not a symbol table")
            for reloc in rela.iter_relocations():
                symbol = symtab.get_symbol(reloc["r_info_sym"])
                names_at[reloc["r_offset"]] = symbol.name
        sections = {
            s.name: s["sh_size"] for s in elf.iter_sections() if s.name.startswith(KPATCH_SECTION_PREFIX)
        }
    except PatchFormatError:
        raise
    except elf_parse_errors() as exc:
        raise PatchFormatError(f"patch ELF image is corrupt: {type(exc).__name__}: {exc}") from None
    functions: list[ReplacedFunction] = []
    new_functions: list[str] = []
    for index, entry in enumerate(entries):
        base = index * INFO_ENTRY_SIZE
        orig_name = names_at.get(base + INFO_FIELD_OFFSETS["daddr"])
        new_name = names_at.get(base + INFO_FIELD_OFFSETS["saddr"], f"<entry {index}>")
        if orig_name is None and entry.dlen == 0:
            new_functions.append(_strip_new_suffix(new_name))
        else:
            functions.append(ReplacedFunction(orig_name or _strip_new_suffix(new_name), entry.dlen, entry.slen))
    return PatchSummary(
        build_id=patch.build_id,
        level=patch.level,
        total_size=patch.header.total_size,
        elf_size=len(patch.elf_image),
        build_time=patch.header.build_time,
        functions=tuple(functions),
        new_functions=tuple(new_functions),
        sections=sections,
    )
