"""ELF facts of the objects a patient maps, parsed once per build-id.

What apply needs from an object's file: its dynamic symbols (looked up by name through
the GNU hash table, honouring symbol versions), its ``.symtab`` (locals too, built only
for objects being patched), ``DT_NEEDED``/``DT_SONAME`` (the dynamic linker's search
order), and its call frame information (an FDE found through ``.eh_frame_hdr``'s sorted
table and decoded alone). Nothing here iterates all of libc's symbols or CFI: see
DESIGN.md section 8.
"""

from __future__ import annotations

import bisect
import io
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.dwarf.callframe import FDE, CallFrameInfo
from elftools.dwarf.structs import DWARFStructs
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_ST_INFO_BIND, ENUM_ST_INFO_TYPE, ENUM_ST_SHNDX, ENUM_VERSYM
from elftools.elf.gnuversions import GNUVerSymSection

from ..errors import CareError
from ..process import MappedObject

SHN_UNDEF = ENUM_ST_SHNDX["SHN_UNDEF"]
VERSYM_HIDDEN = 0x8000           # the version is not the default one (``foo@V``, not ``foo@@V``)
VERSYM_INDEX_MASK = 0x7FFF
# Symbol type and binding numbers from pyelftools, which names the OS-specific ones only
# STT_LOOS / STB_LOOS: GNU's names for them are added.
STT_GNU_IFUNC = ENUM_ST_INFO_TYPE["STT_LOOS"]
_SYMBOL_TYPES = {**{name: number for name, number in ENUM_ST_INFO_TYPE.items() if name.startswith("STT_")},
                 "STT_GNU_IFUNC": STT_GNU_IFUNC}
_SYMBOL_BINDS = {**{name: number for name, number in ENUM_ST_INFO_BIND.items() if name.startswith("STB_")},
                 "STB_GNU_UNIQUE": ENUM_ST_INFO_BIND["STB_LOOS"]}
DW_EH_PE_datarel_sdata4 = 0x3B
SIGRETURN_CODE = bytes.fromhex("48c7c00f0000000f05")   # mov $15, %rax; syscall
RETURN_ADDRESS_REGISTER = 16     # x86-64 DWARF number of the return address column


class ObjectFileError(CareError):
    """The file of a mapped object cannot be read."""


@dataclass(frozen=True)
class SymbolDef:
    """A symbol defined in an object, by ELF virtual address (add the load bias)."""

    name: str
    vaddr: int
    size: int
    sym_type: int        # STT_* number
    bind: int            # STB_* number
    version: str | None = None

    @property
    def is_ifunc(self) -> bool:
        return self.sym_type == STT_GNU_IFUNC

    @property
    def is_weak(self) -> bool:
        return self.bind == _SYMBOL_BINDS["STB_WEAK"]


@dataclass(frozen=True)
class FrameRule:
    """How to find the caller's frame at one pc: CFA = reg + offset; saved registers."""

    cfa_register: int | None          # DWARF register number; None: an expression (unsupported)
    cfa_offset: int
    saved: tuple[tuple[int, int], ...]   # (DWARF register, offset from CFA) of registers saved on the stack
    outermost: bool = False              # the return address is marked undefined: no caller


def split_version(name: str) -> tuple[str, str | None]:
    """``puts@GLIBC_2.2.5`` -> (``puts``, ``GLIBC_2.2.5``); ``foo@@V`` too; ``foo`` -> (foo, None)."""
    base, at, version = name.partition("@")
    if not at:
        return name, None
    return base, version.lstrip("@") or None


def gnu_hash(name: bytes) -> int:
    """The GNU hash of a symbol name."""
    value = 5381
    for byte in name:
        value = (value * 33 + byte) & 0xFFFFFFFF
    return value


class ObjectFile:
    """One ELF file, opened once; lookups parse only what they need."""

    def __init__(self, path: str, stream) -> None:
        self.path = path
        self._stream = stream
        self.elf = ELFFile(stream)
        self.dynsym = self.elf.get_section_by_name(".dynsym")
        versym = self.elf.get_section_by_name(".gnu.version")
        self._versym = versym if isinstance(versym, GNUVerSymSection) else None
        self._version_names = self._read_version_names()
        self._gnu_hash = self._parse_gnu_hash()
        self._names_without_hash: dict[str, list[int]] | None = None
        self._symtab_by_name: dict[str, list[SymbolDef]] | None = None
        self._cold_by_function: dict[str, list[SymbolDef]] | None = None
        self.soname, self.needed = self._read_dynamic()
        self._fde_table: tuple[list[int], list[int]] | None = None
        self._cfi: CallFrameInfo | None = None
        self._eh_frame_addr = 0
        self._rules: dict[int, FrameRule | None] = {}
        self._trampolines: tuple[int, ...] | None = None
        self._code_segments: list[tuple[int, bytes]] | None = None
        self._function_entries: frozenset[int] | None = None

    def close(self) -> None:
        """Close the file (the object must not be used afterwards)."""
        self._stream.close()

    # ------------------------------------------------------------------ basics
    def _section_bytes(self, name: str) -> bytes | None:
        section = self.elf.get_section_by_name(name)
        if section is None or section["sh_type"] == "SHT_NOBITS":
            return None
        return section.data()

    def _read_version_names(self) -> dict[int, str]:
        section = self.elf.get_section_by_name(".gnu.version_d")
        names: dict[int, str] = {}
        if section is None:
            return names
        for version, auxiliaries in section.iter_versions():
            auxiliaries = list(auxiliaries)
            if auxiliaries:
                names[version["vd_ndx"]] = auxiliaries[0].name
        return names

    def _read_dynamic(self) -> tuple[str | None, tuple[str, ...]]:
        section = self.elf.get_section_by_name(".dynamic")
        if section is None:
            return None, ()
        soname = None
        needed = []
        for tag in section.iter_tags():
            if tag.entry.d_tag == "DT_NEEDED":
                needed.append(tag.needed)
            elif tag.entry.d_tag == "DT_SONAME":
                soname = tag.soname
        return soname, tuple(needed)

    def _parse_gnu_hash(self) -> tuple[int, int, tuple[int, ...], bytes, int] | None:
        raw = self._section_bytes(".gnu.hash")
        if raw is None or len(raw) < 16:
            return None
        nbuckets, symoffset, bloom_size, _ = struct.unpack_from("<4I", raw, 0)
        buckets_at = 16 + bloom_size * 8
        buckets = struct.unpack_from(f"<{nbuckets}I", raw, buckets_at)
        chains_at = buckets_at + nbuckets * 4
        return nbuckets, symoffset, buckets, raw, chains_at

    # ------------------------------------------------------------------ dynamic symbols
    def _indices_named(self, name: str) -> list[int]:
        """Indices of ``.dynsym`` entries named ``name`` (through the hash table)."""
        if self.dynsym is None:
            return []
        encoded = name.encode()
        if self._gnu_hash is not None:
            nbuckets, symoffset, buckets, raw, chains_at = self._gnu_hash
            wanted = gnu_hash(encoded)
            index = buckets[wanted % nbuckets] if nbuckets else 0
            found = []
            if index < symoffset:
                return found
            while True:
                position = chains_at + (index - symoffset) * 4
                if position + 4 > len(raw):
                    break
                chain_hash = struct.unpack_from("<I", raw, position)[0]
                if chain_hash | 1 == wanted | 1 and self.dynsym.get_symbol(index).name == name:
                    found.append(index)
                if chain_hash & 1:
                    break
                index += 1
            return found
        if self._names_without_hash is None:
            # No GNU hash table (rare): one pass, cached with the object.
            names: dict[str, list[int]] = {}
            for index, symbol in enumerate(self.dynsym.iter_symbols()):
                names.setdefault(symbol.name, []).append(index)
            self._names_without_hash = names
        return self._names_without_hash.get(name, [])

    def _version_of(self, index: int) -> tuple[int, bool]:
        """(version index, hidden) of ``.dynsym`` entry ``index``, from pyelftools' ``.gnu.version``."""
        if self._versym is None or index >= self._versym.num_symbols():
            return ENUM_VERSYM["VER_NDX_GLOBAL"], False
        value = self._versym.get_symbol(index)["ndx"]
        if isinstance(value, str):          # pyelftools names the reserved indexes
            return ENUM_VERSYM[value], False
        return value & VERSYM_INDEX_MASK, bool(value & VERSYM_HIDDEN)

    def lookup_dynamic(self, name: str, version: str | None) -> SymbolDef | None:
        """The definition of ``name`` this object exports for a reference with ``version``.

        A versioned reference binds to the definition of exactly that version (hidden,
        i.e. non-default, versions included) or to an unversioned object's symbol; an
        unversioned reference binds to the base or default version.
        """
        for index in self._indices_named(name):
            symbol = self.dynsym.get_symbol(index)
            if symbol["st_shndx"] == "SHN_UNDEF" or symbol["st_shndx"] == SHN_UNDEF:
                continue
            version_index, hidden = self._version_of(index)
            version_name = self._version_names.get(version_index)
            if version is not None:
                if self._versym is not None and version_index > 1 and version_name != version:
                    continue
            elif hidden:
                continue
            return _symbol_def(symbol, version_name if version_index > 1 else None)
        return None

    # ------------------------------------------------------------------ .symtab
    def _symtab(self) -> dict[str, list[SymbolDef]]:
        """Defined ``.symtab`` symbols by name (empty when stripped); built once."""
        if self._symtab_by_name is None:
            table: dict[str, list[SymbolDef]] = {}
            symtab = self.elf.get_section_by_name(".symtab")
            if symtab is not None:
                for symbol in symtab.iter_symbols():
                    if symbol.name and symbol["st_shndx"] not in ("SHN_UNDEF", SHN_UNDEF):
                        table.setdefault(symbol.name, []).append(_symbol_def(symbol, None))
            self._symtab_by_name = table
        return self._symtab_by_name

    def lookup_local(self, name: str) -> SymbolDef | None:
        """``name`` in ``.symtab`` (locals too), else ``.dynsym``; built once per object."""
        found = self._symtab().get(name)
        if found:
            # A global definition wins over a local of the same name.
            return sorted(found, key=lambda s: s.bind == _SYMBOL_BINDS["STB_LOCAL"])[0]
        return self.lookup_dynamic(name, None)

    def symbols_named(self, name: str) -> list[SymbolDef]:
        """Every definition of ``name`` in ``.symtab`` (same-named statics of several units),
        else its ``.dynsym`` definition; empty when there is none."""
        found = self._symtab().get(name)
        if found:
            return list(found)
        dynamic = self.lookup_dynamic(name, None)
        return [dynamic] if dynamic is not None else []

    def cold_parts(self, name: str) -> list[SymbolDef]:
        """The parts gcc split off function ``name`` (``name.cold``, ``name.cold.N`` in
        ``.text.unlikely``), from ``.symtab``; none when the object is stripped.

        Every local ``name.cold*`` is returned, even one of a same-named static function
        in another unit: a wider guard only errs on the safe side.
        """
        if self._cold_by_function is None:
            table: dict[str, list[SymbolDef]] = {}
            for symbol_name, symbols in self._symtab().items():
                base, cold, number = symbol_name.partition(".cold")
                if not cold or not base or (number and not (number[0] == "." and number[1:].isdigit())):
                    continue
                table.setdefault(base, []).extend(
                    s for s in symbols if s.sym_type == _SYMBOL_TYPES["STT_FUNC"] and s.size > 0)
            self._cold_by_function = table
        return list(self._cold_by_function.get(name, ()))

    # ------------------------------------------------------------------ CFI
    def _load_fde_table(self) -> tuple[list[int], list[int]]:
        if self._fde_table is not None:
            return self._fde_table
        starts: list[int] = []
        fdes: list[int] = []
        header = self.elf.get_section_by_name(".eh_frame_hdr")
        eh_frame = self.elf.get_section_by_name(".eh_frame")
        if header is not None and eh_frame is not None and eh_frame["sh_type"] != "SHT_NOBITS":
            raw = header.data()
            if len(raw) >= 12 and raw[0] == 1 and raw[3] == DW_EH_PE_datarel_sdata4 and raw[2] == 0x03:
                count = struct.unpack_from("<I", raw, 8)[0]
                pairs = struct.unpack_from(f"<{2 * count}i", raw, 12)
                base = header["sh_addr"]
                starts = [base + value for value in pairs[0::2]]
                fdes = [base + value for value in pairs[1::2]]
            self._eh_frame_addr = eh_frame["sh_addr"]
            structs = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)
            self._cfi = CallFrameInfo(io.BytesIO(eh_frame.data()), eh_frame["sh_size"], eh_frame["sh_addr"],
                                      structs, for_eh_frame=True)
        self._fde_table = (starts, fdes)
        return self._fde_table

    def sigreturn_trampolines(self) -> tuple[int, ...]:
        """Link addresses of ``mov $15, %rax; syscall`` (rt_sigreturn) sequences in the
        object's code: where a signal handler returns to (glibc's ``__restore_rt``)."""
        if self._trampolines is None:
            found = []
            for segment in self.elf.iter_segments():
                if segment["p_type"] != "PT_LOAD" or not segment["p_flags"] & 1:
                    continue
                code = segment.data()
                position = code.find(SIGRETURN_CODE)
                while position >= 0:
                    found.append(segment["p_vaddr"] + position)
                    position = code.find(SIGRETURN_CODE, position + 1)
            self._trampolines = tuple(found)
        return self._trampolines

    def warm_cfi(self) -> None:
        """Load the FDE search table now (before a patient is stopped), not on first use."""
        self._load_fde_table()

    def _fde_at(self, vaddr: int) -> FDE | None:
        """The FDE whose range holds link address ``vaddr``, decoded alone."""
        starts, fdes = self._load_fde_table()
        position = bisect.bisect_right(starts, vaddr) - 1
        if position < 0 or self._cfi is None:
            return None
        try:
            entry = self._cfi._parse_entry_at(fdes[position] - self._eh_frame_addr)
        except (ELFError, ValueError, KeyError, struct.error, AttributeError):
            return None
        if isinstance(entry, FDE):
            begin = entry.header["initial_location"]
            if begin <= vaddr < begin + entry.header["address_range"]:
                return entry
        return None

    def fde_range(self, vaddr: int) -> tuple[int, int] | None:
        """``[begin, end)`` link addresses of the FDE holding ``vaddr`` (None: no CFI there)."""
        entry = self._fde_at(vaddr)
        if entry is None:
            return None
        begin = entry.header["initial_location"]
        return begin, begin + entry.header["address_range"]

    def code_at(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes of the file's executable segments at link address ``vaddr``
        (empty if they are not all in one)."""
        for start, data in self._executable_segments():
            if start <= vaddr and vaddr + size <= start + len(data):
                return data[vaddr - start:vaddr - start + size]
        return b""

    def _executable_segments(self) -> list[tuple[int, bytes]]:
        if self._code_segments is None:
            self._code_segments = [(segment["p_vaddr"], segment.data()) for segment in self.elf.iter_segments()
                                   if segment["p_type"] == "PT_LOAD" and segment["p_flags"] & 1]
        return self._code_segments

    def is_function_entry(self, vaddr: int) -> bool:
        """Whether link address ``vaddr`` is known to start a function: an exported function,
        or the target of a direct ``call`` in the object's code (see :mod:`.split_parts`)."""
        if self._function_entries is None:
            from .split_parts import call_targets

            entries: set[int] = set()
            if self.dynsym is not None:
                entries.update(symbol["st_value"] for symbol in self.dynsym.iter_symbols()
                               if symbol["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC") and symbol["st_value"])
            for start, data in self._executable_segments():
                entries |= call_targets(data, start)
            self._function_entries = frozenset(entries)
        return vaddr in self._function_entries

    @property
    def has_symtab(self) -> bool:
        """Whether the file still has its ``.symtab`` (it is not stripped)."""
        return self.elf.get_section_by_name(".symtab") is not None

    def frame_rule(self, vaddr: int) -> FrameRule | None:
        """The unwind rule at link address ``vaddr``, or None if no CFI covers it."""
        if vaddr in self._rules:
            return self._rules[vaddr]
        entry = self._fde_at(vaddr)
        rule = fde_rule(entry, vaddr) if entry is not None else None
        if len(self._rules) > 4096:
            self._rules.clear()
        self._rules[vaddr] = rule
        return rule


def fde_rule(entry: FDE, vaddr: int) -> FrameRule | None:
    """The unwind rule of ``entry`` at ``vaddr`` (an address in the FDE's own terms);
    None before its first row."""
    table = entry.get_decoded().table
    row = None
    for candidate in table:
        if candidate["pc"] <= vaddr:
            row = candidate
        else:
            break
    if row is None:
        return None
    cfa = row["cfa"]
    if cfa.expr is not None or cfa.reg is None:
        return FrameRule(None, 0, ())
    saved = []
    outermost = False
    for register, register_rule in row.items():
        kind = getattr(register_rule, "type", None)
        if not isinstance(register, int):
            continue
        if kind == "OFFSET":
            saved.append((register, register_rule.arg))
        elif kind in ("EXPRESSION", "VAL_EXPRESSION"):
            return FrameRule(None, 0, ())
        elif kind == "UNDEFINED" and register == RETURN_ADDRESS_REGISTER:
            outermost = True
    return FrameRule(cfa.reg, cfa.offset, tuple(saved), outermost)


def _symbol_def(symbol, version: str | None) -> SymbolDef:
    info = symbol["st_info"]
    sym_type = info["type"] if isinstance(info["type"], int) else _SYMBOL_TYPES.get(info["type"], 0)
    bind = info["bind"] if isinstance(info["bind"], int) else _SYMBOL_BINDS.get(info["bind"], 0)
    return SymbolDef(symbol.name, symbol["st_value"], symbol["st_size"], sym_type, bind, version)


# build-id (or file identity) -> parsed object; one parse serves every process. Bounded:
# each entry keeps its file open.
_cache: OrderedDict[str, ObjectFile] = OrderedDict()
CACHE_SIZE = 256


def _cache_key(mapped: MappedObject) -> str:
    if mapped.build_id:
        return mapped.build_id
    first = mapped.mappings[0]
    return f"{mapped.path}:{first.dev}:{first.inode}"


def object_file(pid: int, mapped: MappedObject) -> ObjectFile:
    """The parsed file of ``mapped`` (cached by build-id); opened through the patient's
    ``/proc/PID/map_files`` so a deleted or replaced file is still the right one."""
    key = _cache_key(mapped)
    cached = _cache.get(key)
    if cached is not None:
        _cache.move_to_end(key)
        return cached
    first = min(mapped.mappings, key=lambda m: m.offset)
    candidates = [f"/proc/{pid}/map_files/{first.start:x}-{first.end:x}", f"/proc/{pid}/root{mapped.path}",
                  mapped.path]
    last_error = ""
    for candidate in candidates:
        try:
            stream = open(candidate, "rb")  # noqa: SIM115 - kept open with the cached object
        except OSError as exc:
            last_error = exc.strerror or str(exc)
            continue
        try:
            parsed = ObjectFile(mapped.path, stream)
        except (ELFError, ValueError, struct.error) as exc:
            stream.close()
            last_error = str(exc)
            continue
        _cache[key] = parsed
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)[1].close()
        return parsed
    raise ObjectFileError(f"cannot read the ELF file of {mapped.path}: {last_error}")


def forget_objects() -> None:
    """Drop every cached object (tests)."""
    while _cache:
        _cache.popitem()[1].close()


def search_order(objects: list[MappedObject], executable: MappedObject | None,
                 files: dict[int, ObjectFile], preload: tuple[str, ...] = ()) -> list[MappedObject]:
    """The dynamic linker's symbol search order: the executable, preloaded libraries
    (``preload``: paths or names), then DT_NEEDED libraries breadth first (by soname or
    file name), then any other loaded object in maps order (dlopen'ed, the dynamic linker)."""
    by_name: dict[str, MappedObject] = {}
    for mapped in objects:
        parsed = files.get(mapped.start)
        if parsed is not None and parsed.soname:
            by_name.setdefault(parsed.soname, mapped)
        by_name.setdefault(os.path.basename(mapped.path), mapped)
        by_name.setdefault(mapped.path, mapped)
    order: list[MappedObject] = []
    seen: set[int] = set()                  # MappedObject.start of those in order
    queue = [executable] if executable is not None else []
    queue += [by_name[name] for name in preload if name in by_name]
    while queue:
        mapped = queue.pop(0)
        if mapped.start in seen:
            continue
        seen.add(mapped.start)
        order.append(mapped)
        parsed = files.get(mapped.start)
        for name in parsed.needed if parsed is not None else ():
            dependency = by_name.get(name)
            if dependency is not None and dependency.start not in seen:
                queue.append(dependency)
    order.extend(mapped for mapped in objects if mapped.start not in seen)
    return order


def preloaded_libraries(pid: int) -> tuple[str, ...]:
    """What process ``pid`` preloads: its ``LD_PRELOAD`` and ``/etc/ld.so.preload``."""
    names: list[str] = []
    try:
        with open(f"/proc/{pid}/environ", "rb") as stream:
            for variable in stream.read().split(b"\0"):
                if variable.startswith(b"LD_PRELOAD="):
                    names += variable[len(b"LD_PRELOAD="):].decode("utf-8", "replace").replace(":", " ").split()
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/root/etc/ld.so.preload") as stream:
            names += stream.read().split()
    except OSError:
        pass
    return tuple(name for name in names if name)
