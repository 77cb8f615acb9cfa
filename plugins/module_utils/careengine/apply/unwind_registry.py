"""The patch code's unwind tables in the patient's unwinder (libgcc's frame registry).

A patch built from code with unwind info carries ``.kpatch.eh_frame`` (see
:mod:`..asm.eh_frame`) and a zeroed writable ``.kpatch.eh_object``. The patient's
unwinder finds the tables of loaded objects itself, but not those of a patch mapping:
they are registered with ``__register_frame_info(eh_frame, object)`` called in the
patient (libgcc's, as the dynamic linker binds it: ``libgcc_s.so.1`` or a copy in the
executable). The object lives in the patch's writable pages, so registering allocates
nothing (no ``malloc`` in a thread stopped at an arbitrary place).

Order, so that a SIGKILLed engine leaves the patient resumable: registered after the
mapping is written and sealed and before any jump; deregistered with
``__deregister_frame_info(eh_frame)`` before the mapping is unmapped (unpatch, level
replacement, rollback, cleanup of a leftover). libgcc aborts the process when asked to
deregister tables it does not hold, and a registration that outlives its memory is a
dangling pointer for every later throw, so the engine keeps the state in the patch's
own memory (a word after libgcc's object), written before and after each call:
registering, registered, deregistering, released. A mapping is unmapped only when its
tables are known not to be registered. After a kill between a call and the word that
follows it, the next run asks the unwinder itself (``_Unwind_Find_FDE`` on the patch
code, a remote call) whether the tables are registered; if that cannot be asked, or any
call fails (a stopped thread holds libgcc's lock: timeout), the mapping stays mapped,
which is always safe.

A patient without the registry (a C program that never loaded ``libgcc_s``) runs C
patches without registration (nothing there unwinds through patch code but backtrace
tools); a patch with C++ exception handling (an exception table, a personality routine
or C++ names) is refused there.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from ..errors import ProcessError, SymbolNotFound
from ..patchfile import JUMP_SIZE, SECTION_EH_FRAME, SECTION_EH_OBJECT, SECTION_EXCEPT_TABLE
from ..process import StoppedProcess
from ..process.sigframe import CALL_RETURN_STUB
from .image import ImageSection, PatchImage, _data_placement, section_addresses
from .layout import PAGE_SIZE, TRAP_BYTE, round_up

REGISTER = "__register_frame_info"
DEREGISTER = "__deregister_frame_info"
FIND_FDE = "_Unwind_Find_FDE"
CXX_PREFIX = "_Z"
PERSONALITY_MARK = "personality"
# In .kpatch.eh_object: libgcc's struct object (48 bytes: pc_begin first), then ours.
OBJECT_PC_BEGIN = 0
STATE_OFFSET = 56          # the registration state word
BASES_OFFSET = 64          # 24 bytes: the struct dwarf_eh_bases _Unwind_Find_FDE fills in
OBJECT_READ_SIZE = 64
_WORD = struct.Struct("<Q")


class State:
    """Values of the state word (distinct from zeroed memory and from one another)."""

    NEVER = 0
    REGISTERING = 0x4B50_4548_0000_0001
    REGISTERED = 0x4B50_4548_0000_0002
    DEREGISTERING = 0x4B50_4548_0000_0003
    RELEASED = 0x4B50_4548_0000_0004


class RegistryMissing(SymbolNotFound):
    """The patch needs the patient's unwinder to know its code, and the patient has none."""


@dataclass(frozen=True)
class FrameRegistry:
    """Where libgcc's registration functions are in the patient (``find_fde``: 0 if unknown)."""

    register: int
    deregister: int
    provider: str
    find_fde: int = 0


@dataclass(frozen=True)
class MappedTables:
    """A patch's unwind tables in the patient: the eh_frame, libgcc's object (and our
    state word after it), and an address of patch code they describe."""

    eh_frame: int
    eh_object: int
    code: int


def find_registry(objects, lookup) -> FrameRegistry | None:
    """The first object (in ``objects``' order: the dynamic linker's) defining both
    functions; ``lookup(mapped, name)`` is a symbol's address in the patient or None."""
    for mapped in objects:
        register = lookup(mapped, REGISTER)
        deregister = lookup(mapped, DEREGISTER)
        if register and deregister:
            return FrameRegistry(register, deregister, mapped.path, lookup(mapped, FIND_FDE) or 0)
    return None


def _section(image: PatchImage, name: str):
    return next((s for s in image.sections if s.name == name and not s.nobits and s.size), None)


def has_unwind_tables(image: PatchImage) -> bool:
    """The patch carries ``.kpatch.eh_frame`` (and the room to register it)."""
    return _section(image, SECTION_EH_FRAME) is not None and _section(image, SECTION_EH_OBJECT) is not None


def needs_registry(image: PatchImage) -> bool:
    """Exceptions may pass through its code: an exception table, a personality routine
    or C++ names (a C++ unit; a throw through an unregistered frame terminates)."""
    if _section(image, SECTION_EXCEPT_TABLE) is not None:
        return True
    return any(symbol.name.startswith(CXX_PREFIX) or PERSONALITY_MARK in symbol.name for symbol in image.symbols)


def plan_tables(image: PatchImage, address: int, load_bias: int, code: int, registry: FrameRegistry | None,
                pid: int) -> MappedTables | None:
    """The tables of ``image`` mapped at ``address`` (``code``: its first new code), to
    register; None when there is nothing to register (no tables, or a C patch in a
    patient without the registry). Refuses a patch that needs the registry in a patient
    without one."""
    if not has_unwind_tables(image):
        return None
    if registry is None:
        if needs_registry(image):
            raise RegistryMissing(
                f"the patch has C++ exception handling, but process {pid} has no {REGISTER} (libgcc_s not "
                "loaded, or a stripped static copy) to make its unwinder know the patch code: refusing (an "
                "exception through it would terminate the process)")
        return None
    addresses = section_addresses(image, address, load_bias)
    return MappedTables(addresses[_section(image, SECTION_EH_FRAME).index],
                        addresses[_section(image, SECTION_EH_OBJECT).index], code)


def tables_in_mapping(mapping_start: int, contents: bytes, kpatch_offset: int, data_start: int,
                      code: int) -> MappedTables | None:
    """The tables of an applied patch, from its mapped bytes (the ELF image's section
    table; writable sections are on the data pages at ``data_start``, placed as
    :mod:`.image` places them); None when it has none or they cannot be read."""
    offsets = _table_offsets(memoryview(contents)[kpatch_offset:])
    if offsets is None:
        return None
    eh_frame_offset, eh_object_offset = offsets
    return MappedTables(mapping_start + kpatch_offset + eh_frame_offset, data_start + eh_object_offset, code)


# The offsets read from an image, by the SHA-256 of exactly the bytes parsed (pyelftools
# took 1.2-1.4 ms per applied patch, read again by every unpatch and info); bounded, the
# oldest entry dropped first.
_OFFSETS_CACHE: dict[bytes, tuple[int, int] | None] = {}
OFFSETS_CACHE_SIZE = 256


def _table_offsets(image: memoryview) -> tuple[int, int] | None:
    """(``.kpatch.eh_frame``'s offset in ``image``, ``.kpatch.eh_object``'s on the data
    pages), or None; remembered by the digest of ``image``."""
    digest = hashlib.sha256(image).digest()
    if digest in _OFFSETS_CACHE:
        return _OFFSETS_CACHE[digest]
    offsets = _read_table_offsets(image)
    if len(_OFFSETS_CACHE) >= OFFSETS_CACHE_SIZE:
        del _OFFSETS_CACHE[next(iter(_OFFSETS_CACHE))]
    _OFFSETS_CACHE[digest] = offsets
    return offsets


def _read_table_offsets(image: memoryview) -> tuple[int, int] | None:
    """:func:`_table_offsets` read from the ELF image's section table (pyelftools)."""
    try:
        elf = ELFFile(io.BytesIO(image))
        sections = [ImageSection(index, section.name, section["sh_type"] == "SHT_NOBITS", section["sh_addr"],
                                 section["sh_offset"], section["sh_size"],
                                 bool(section["sh_flags"] & SH_FLAGS.SHF_WRITE) and section.name.startswith(".kpatch"),
                                 max(section["sh_addralign"], 1))
                    for index, section in enumerate(elf.iter_sections())]
    except (ELFError, ValueError, KeyError, IndexError, OSError, AttributeError, TypeError, struct.error):
        return None
    eh_frame = next((s for s in sections if s.name == SECTION_EH_FRAME and s.size and not s.nobits), None)
    eh_object = next((s for s in sections if s.name == SECTION_EH_OBJECT and s.size and not s.nobits), None)
    if eh_frame is None or eh_object is None or eh_frame.sh_offset + eh_frame.size > len(image):
        return None
    placement = dict(_data_placement(sections)[0])
    return eh_frame.sh_offset, placement[eh_object.index]


def trap_offset(user_undo: int, entries: int) -> int:
    """Offset of the trap slot (the remote-call return stub) in a mapping: after the undo
    area, 16-byte aligned (:func:`.layout.plan_layout`)."""
    return round_up(user_undo + JUMP_SIZE * entries, 16)


def data_pages_offset(user_undo: int, entries: int) -> int:
    """Offset of a mapping's writable pages: the code part ends after the trap slot,
    rounded up to whole pages (:func:`.layout.plan_layout`). /proc/PID/maps shows one
    range for both parts while they have the same protections (a run killed before the
    seal), so this is computed, not read from the maps."""
    return round_up(trap_offset(user_undo, entries) + len(TRAP_BYTE), PAGE_SIZE)


def return_stub_in_mapping(mapping_start: int, contents: bytes, user_undo: int, entries: int) -> int:
    """Address of the remote-call return stub the engine wrote in an applied mapping; 0
    when it is not there."""
    offset = trap_offset(user_undo, entries)
    if contents[offset:offset + len(CALL_RETURN_STUB)] != CALL_RETURN_STUB:
        return 0
    return mapping_start + offset


def _set_state(stopped: StoppedProcess, tables: MappedTables, state: int) -> None:
    stopped.write(tables.eh_object + STATE_OFFSET, _WORD.pack(state))


def register_tables(stopped: StoppedProcess, registry: FrameRegistry, tables: MappedTables, return_stub: int) -> None:
    """``__register_frame_info(eh_frame, object)`` in the patient, between state words."""
    _set_state(stopped, tables, State.REGISTERING)
    stopped.remote_call(registry.register, (tables.eh_frame, tables.eh_object), return_stub)
    _set_state(stopped, tables, State.REGISTERED)


def release_tables(stopped: StoppedProcess, registry: FrameRegistry | None, tables: MappedTables,
                   return_stub: int) -> None:
    """Make sure the tables are not registered (deregistering them if they are), so
    the mapping can be unmapped. Raises ProcessError when that cannot be made sure: the
    caller keeps the mapping."""
    raw = stopped.read(tables.eh_object, OBJECT_READ_SIZE)
    state = _WORD.unpack_from(raw, STATE_OFFSET)[0]
    pc_begin = _WORD.unpack_from(raw, OBJECT_PC_BEGIN)[0]
    if state in (State.NEVER, State.RELEASED) or (state == State.REGISTERING and pc_begin == 0):
        return                   # never registered (the registering call never started)
    if registry is None or not return_stub:
        raise ProcessError(f"the unwind tables at {tables.eh_frame:#x} may be registered and cannot be "
                           "deregistered here: keeping their mapping")
    registered = state == State.REGISTERED or _registered(stopped, registry, tables, return_stub)
    if registered:
        _set_state(stopped, tables, State.DEREGISTERING)
        stopped.remote_call(registry.deregister, (tables.eh_frame,), return_stub)
    _set_state(stopped, tables, State.RELEASED)


def _registered(stopped: StoppedProcess, registry: FrameRegistry, tables: MappedTables, return_stub: int) -> bool:
    """Whether the unwinder finds the patch code's FDE (an interrupted call left the
    state word behind)."""
    if not registry.find_fde or not tables.code:
        raise ProcessError(f"whether the unwind tables at {tables.eh_frame:#x} are registered cannot be asked "
                           f"({FIND_FDE} not found): keeping their mapping")
    return stopped.remote_call(registry.find_fde, (tables.code, tables.eh_object + BASES_OFFSET), return_stub) != 0
