"""The patched stage's links: every unit emitting an inline function the patch changes changed it.

g++ emits an inline function or a template instance in each unit that needs an
out-of-line copy, in a COMDAT group; the link keeps one copy. A unit that changed such a
function puts its new copy in a group ``<symbol>.kpatch`` (:mod:`..asm.comdat`) and the
patch replaces the copy the program kept. A unit that emits the function unchanged (its
assembler did not change, a macro or flag kept the old body there, or make did not
recompile it and it has the function from another header) was built to keep the old
code: replacing every copy with another unit's new one would change that unit too, so
the link is refused (:func:`check_link`), naming the function and the units.

Read are the link's objects and the members of its archives (given by path, thin or not,
or by ``-lNAME`` in a ``-L`` directory: :func:`library_inputs`), with the standard library
only: section headers, COMDAT groups and the symbol table; a unit is named by its source
file (its ``STT_FILE`` symbol). Shared libraries and the system's archives are not read:
nothing in them was built with the patch.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

ELF_MAGIC = b"\x7fELF"
AR_MAGIC = b"!<arch>\n"
THIN_MAGIC = b"!<thin>\n"
PATCH_GROUP_SUFFIX = ".kpatch"          # asm.comdat.GROUP_SUFFIX (not imported: keep the link path light)
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_AR_HEADER_SIZE = 60
_ET_REL = 1
_ELFCLASS64, _ELFDATA2LSB = 2, 1
_SHT_GROUP, _SHT_SYMTAB_SHNDX = 17, 18
_GRP_COMDAT = 1
_STT_FUNC, _STT_FILE = 2, 4
_SHN_XINDEX = 0xFFFF


@dataclass(frozen=True)
class LinkedUnit:
    """What one link input says about COMDAT functions.

    ``emitted``: functions it defines in a COMDAT group (its original copies);
    ``changed``: those it also has a new copy of, in a ``<symbol>.kpatch`` group.
    """

    name: str
    emitted: frozenset[str]
    changed: frozenset[str]


@dataclass(frozen=True)
class _Section:
    sh_type: int
    offset: int
    size: int
    link: int
    info: int


class _ElfReader:
    """A relocatable ELF64 object at ``base`` in ``stream`` (an archive member or a whole file)."""

    def __init__(self, stream: BinaryIO, base: int) -> None:
        self.stream = stream
        self.base = base

    def read(self, offset: int, size: int) -> bytes:
        self.stream.seek(self.base + offset)
        data = self.stream.read(size)
        if len(data) != size:
            raise ValueError("truncated")
        return data

    def sections(self) -> list[_Section] | None:
        """The section headers; None unless this is a little-endian ELF64 relocatable object."""
        self.stream.seek(self.base)
        if self.stream.read(len(ELF_MAGIC)) != ELF_MAGIC:
            return None
        ehdr = _EHDR.unpack(self.read(0, _EHDR.size))
        ident, e_type, shoff, shentsize, shnum = ehdr[0], ehdr[1], ehdr[6], ehdr[11], ehdr[12]
        if ident[:4] != ELF_MAGIC or ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB or e_type != _ET_REL:
            return None
        if not shoff or shentsize != _SHDR.size:
            return []
        first = _SHDR.unpack(self.read(shoff, _SHDR.size))
        count = shnum or first[5]     # more than 0xff00 sections: the count is section 0's sh_size
        table = self.read(shoff, count * _SHDR.size)
        return [_Section(fields[1], fields[4], fields[5], fields[6], fields[7])
                for fields in _SHDR.iter_unpack(table)]

    def symbols(self, sections: list[_Section], symtab: int) -> list[tuple[bytes, int, int]]:
        """(name, type, section index) of every symbol of symbol table ``symtab``."""
        table = sections[symtab]
        strings = self.read(sections[table.link].offset, sections[table.link].size)
        extended = next((self.read(s.offset, s.size) for s in sections
                         if s.sh_type == _SHT_SYMTAB_SHNDX and s.link == symtab), b"")
        found = []
        for number, (name, info, _other, shndx, _value, _size) in enumerate(
                _SYM.iter_unpack(self.read(table.offset, table.size))):
            if shndx == _SHN_XINDEX and extended:
                shndx = struct.unpack_from("<I", extended, number * 4)[0]
            found.append((strings[name:strings.index(b"\0", name)], info & 0xF, shndx))
        return found


def _unit(reader: _ElfReader, label: str) -> LinkedUnit | None:
    """The COMDAT functions of one object; None when it has no COMDAT group."""
    sections = reader.sections()
    groups = [section for section in sections or () if section.sh_type == _SHT_GROUP]
    if not groups:
        return None
    symtab = groups[0].link
    symbols = reader.symbols(sections, symtab)
    group_of: dict[int, bytes] = {}
    patch_groups = set()
    for group in groups:
        words = struct.unpack(f"<{group.size // 4}I", reader.read(group.offset, group.size))
        signature = symbols[group.info][0]
        if not words or not words[0] & _GRP_COMDAT:
            continue
        if signature.endswith(PATCH_GROUP_SUFFIX.encode()):
            patch_groups.add(signature[:-len(PATCH_GROUP_SUFFIX)].decode(errors="surrogateescape"))
            continue
        group_of.update((index, signature) for index in words[1:])
    emitted = frozenset(name.decode(errors="surrogateescape") for name, kind, shndx in symbols
                        if kind == _STT_FUNC and shndx in group_of)
    source = next((name.decode(errors="surrogateescape") for name, kind, _ in symbols if kind == _STT_FILE and name),
                  label)
    return LinkedUnit(source, emitted, frozenset(patch_groups & emitted))


def _archive_members(stream: BinaryIO, size: int, thin: bool) -> Iterator[tuple[str, int]]:
    """(name, offset of its data) of each member of an ``ar`` archive (symbol and name tables
    left out); in a thin archive the data is the file the name gives (offset -1)."""
    offset = len(AR_MAGIC)
    long_names = b""
    while offset + _AR_HEADER_SIZE <= size:
        stream.seek(offset)
        header = stream.read(_AR_HEADER_SIZE)
        raw = header[:16].decode(errors="surrogateescape").rstrip()
        member_size = int(header[48:58].decode().strip() or 0)
        table = raw in ("/", "//", "/SYM64/")
        data = offset + _AR_HEADER_SIZE if table or not thin else -1
        if raw == "//":
            long_names = stream.read(member_size)
        elif raw.startswith("/") and raw[1:].isdigit():
            start = int(raw[1:])
            yield long_names[start:long_names.index(b"/\n", start)].decode(errors="surrogateescape"), data
        elif not table:
            yield raw.rstrip("/"), data
        offset += _AR_HEADER_SIZE + (member_size + (member_size & 1) if data >= 0 else 0)


def _places(path: str, stream: BinaryIO) -> list[tuple[str, str, int]]:
    """(label, file, offset) of each object link input ``path`` holds: itself, or its archive members."""
    magic = stream.read(len(AR_MAGIC))
    if magic.startswith(ELF_MAGIC):
        return [(path, path, 0)]
    if magic not in (AR_MAGIC, THIN_MAGIC):
        return []
    size = os.fstat(stream.fileno()).st_size
    return [(f"{path}({name})", path if where >= 0 else os.path.join(os.path.dirname(path), name), max(where, 0))
            for name, where in _archive_members(stream, size, magic == THIN_MAGIC)]


def read_units(path: str) -> list[LinkedUnit]:
    """The units of link input ``path`` that emit COMDAT functions (an object, or an
    archive's members, thin or not); nothing for anything else."""
    units = []
    try:
        with open(path, "rb") as stream:
            places = _places(path, stream)
            for label, file, base in places:
                if file == path:
                    units.append(_unit(_ElfReader(stream, base), label))
                    continue
                with open(file, "rb") as member:
                    units.append(_unit(_ElfReader(member, base), label))
    except OSError:
        return []           # not ours to judge: the linker reports inputs it cannot open
    except (ValueError, IndexError, UnicodeError, struct.error) as exc:
        from ..errors import BuildError

        raise BuildError(f"{path}: cannot read its COMDAT groups ({exc or type(exc).__name__})") from None
    return [unit for unit in units if unit is not None]


def library_inputs(flags: list[str]) -> list[str]:
    """The archives that the ``-lNAME`` options of a link's ``flags`` name, found as ld finds them
    in the ``-L`` directories given (a shared ``libNAME.so`` first unless ``-static``); the
    system directories are left out: nothing there was built with the patch."""
    directories: list[str] = []
    names: list[str] = []
    pending = ""
    for flag in flags:
        if pending:
            (directories if pending == "-L" else names).append(flag)
            pending = ""
        elif flag in ("-L", "-l"):
            pending = flag
        elif flag.startswith(("-L", "-l")):
            (directories if flag.startswith("-L") else names).append(flag[2:])
    suffixes = (".a",) if "-static" in flags else (".so", ".a")
    found = []
    for name in names:
        candidates = [name[1:]] if name.startswith(":") else [f"lib{name}{suffix}" for suffix in suffixes]
        path = next((os.path.join(directory, candidate) for directory in directories for candidate in candidates
                     if os.path.isfile(os.path.join(directory, candidate))), None)
        if path is not None and not path.endswith(".so"):
            found.append(path)
    return found


def disagreements(units: Iterable[LinkedUnit],
                  ignored: Callable[[str], Iterable[str]] = lambda _unit: ()) -> dict[str, tuple[list[str], list[str]]]:
    """Symbol -> (units that changed it, units that emit it unchanged), for every COMDAT
    function that some unit changed and another did not; ``ignored(unit)`` are the
    functions whose changes that unit was told to ignore (they do not disagree)."""
    units = list(units)
    changed_by: dict[str, list[str]] = {}
    for unit in units:
        for symbol in unit.changed:
            changed_by.setdefault(symbol, []).append(unit.name)
    found = {}
    for symbol in sorted(changed_by):
        unchanged = [unit.name for unit in units if symbol in unit.emitted and symbol not in unit.changed
                     and symbol not in ignored(unit.name)]
        if unchanged:
            found[symbol] = (changed_by[symbol], unchanged)
    return found


def check_link(inputs: Iterable[str], ignored: Callable[[str], Iterable[str]] = lambda _unit: ()) -> None:
    """Refuse a link whose units disagree on a changed COMDAT function (see the module docstring)."""
    units = [unit for path in inputs for unit in read_units(path)]
    if not any(unit.changed for unit in units):
        return
    found = disagreements(units, ignored)
    if not found:
        return
    from ..asm.cxx import demangle
    from ..errors import UnpatchableChange

    readable = dict(zip(found, demangle(list(found)), strict=True))
    raise UnpatchableChange("; ".join(
        f"{readable[symbol]}: changed in {', '.join(changed)} but not in {', '.join(unchanged)}"
        for symbol, (changed, unchanged) in found.items()) + " (compiled with other flags or macros?)")
