"""The unwind records of applied patches, read from the patient's memory.

A patch's code lives in an anonymous mapping, which no object file describes, so the
safety check's unwinder (:mod:`.safety`) finds no CFI there. A patch built from code
with unwind info carries its own records (``.kpatch.eh_frame``, see
:mod:`..asm.eh_frame`): ``.eh_frame`` records whose code addresses the apply step
relocated for the place the patch was mapped at. They are read back from the mapping
(the bytes the patient's own unwinder was given, no patch file needed) and decoded
once per content, so a walk goes on through a frame of patch code to its callers.

A patch without them (built without ``-fasynchronous-unwind-tables``, or by other
tools) is still known as patch code: the walk stops there, and the check treats
whatever it could not see as live (a thread there is polled, never run out).
"""

from __future__ import annotations

import bisect
import io
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from elftools.common.exceptions import ELFError
from elftools.dwarf.callframe import FDE, CallFrameInfo
from elftools.dwarf.structs import DWARFStructs

from ..process import Mapping, read_ranges_lenient
from .object_files import FrameRule, fde_rule

MAX_RECORDS = 4096          # FDEs and CIEs of one patch: more is not a patch we made
_CACHE_SIZE = 32            # decoded record sets kept (by address and bytes)
_DECODED: OrderedDict[tuple[int, int, int, bytes], PatchFrames] = OrderedDict()


class PatchFrames:
    """The FDEs of one patch's ``.kpatch.eh_frame``, decoded, by the code range they cover."""

    def __init__(self, address: int, data: bytes, code_start: int, code_end: int) -> None:
        """``data``: the records as mapped at ``address``, up to their zero terminator;
        only FDEs within ``[code_start, code_end)`` (the patch mapping) are kept."""
        structs = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8)
        cfi = CallFrameInfo(io.BytesIO(data), len(data), address, structs, for_eh_frame=True)
        covered: list[tuple[int, int, FDE]] = []
        for offset in record_offsets(data)[0]:
            try:
                entry = cfi._parse_entry_at(offset)
            except (ELFError, ValueError, KeyError, IndexError, struct.error, AttributeError):
                continue
            if not isinstance(entry, FDE):
                continue
            begin = entry.header["initial_location"]
            end = begin + entry.header["address_range"]
            if code_start <= begin < end <= code_end:
                covered.append((begin, end, entry))
        covered.sort(key=lambda item: item[0])
        self.ranges = [(begin, end) for begin, end, _ in covered]
        self._entries = [entry for _, _, entry in covered]
        self._starts = [begin for begin, _ in self.ranges]
        self._rules: dict[int, FrameRule | None] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def frame_rule(self, pc: int) -> FrameRule | None:
        """The unwind rule at address ``pc``, or None if no record covers it."""
        if pc in self._rules:
            return self._rules[pc]
        position = bisect.bisect_right(self._starts, pc) - 1
        rule = None
        if position >= 0 and pc < self.ranges[position][1]:
            rule = fde_rule(self._entries[position], pc)
        if len(self._rules) > 4096:
            self._rules.clear()
        self._rules[pc] = rule
        return rule


def record_offsets(data: bytes) -> tuple[list[int], int]:
    """Offsets of the records in ``.eh_frame`` bytes, up to the zero terminator (a
    truncated record or a 64-bit one ends the list), and where the last one ends."""
    offsets: list[int] = []
    offset = 0
    while offset + 4 <= len(data) and len(offsets) < MAX_RECORDS:
        length = struct.unpack_from("<I", data, offset)[0]
        if length == 0 or length == 0xFFFFFFFF or offset + 4 + length > len(data):
            break
        offsets.append(offset)
        offset += 4 + length
    return offsets, offset


def decoded_frames(address: int, data: bytes, code_start: int, code_end: int) -> PatchFrames:
    """:class:`PatchFrames` of ``data`` at ``address``, decoded once per content."""
    key = (address, code_start, code_end, data[:record_offsets(data)[1]])
    frames = _DECODED.get(key)
    if frames is None:
        frames = PatchFrames(address, key[3], code_start, code_end)
        _DECODED[key] = frames
        while len(_DECODED) > _CACHE_SIZE:
            _DECODED.popitem(last=False)
    else:
        _DECODED.move_to_end(key)
    return frames


@dataclass(frozen=True)
class PatchCode:
    """The code of one applied patch mapping: ``[start, end)``, a name for messages, and
    its unwind records (None: it has none)."""

    start: int
    end: int
    name: str
    frames: PatchFrames | None

    def holds(self, pc: int) -> bool:
        return self.start <= pc < self.end

    def frame_rule(self, pc: int) -> FrameRule | None:
        """The unwind rule at ``pc`` (None: no record covers it)."""
        return self.frames.frame_rule(pc) if self.frames is not None else None


class AppliedCode(Protocol):
    """What :func:`read_patch_code` needs of an applied patch (``engine.AppliedPatch``)."""

    @property
    def mapping(self) -> Mapping: ...

    @property
    def tables(self): ...            # unwind_registry.MappedTables | None

    @property
    def level(self) -> int: ...

    @property
    def replaced_functions(self) -> tuple[str, ...]: ...


def patch_code_name(applied: AppliedCode) -> str:
    """``the level-N patch code (f, g)``: how messages name an applied patch's code."""
    functions = ", ".join(applied.replaced_functions) or "new functions"
    return f"the level-{applied.level} patch code ({functions})"


def read_patch_code(pid: int, patches: Iterable[AppliedCode]) -> list[PatchCode]:
    """The code of every mapping in ``patches`` with its unwind records, read from the
    patient's memory in one call (records that cannot be read count as missing)."""
    patches = list(patches)
    spans = [(p.tables.eh_frame, p.mapping.end - p.tables.eh_frame)
             if p.tables is not None and p.mapping.start <= p.tables.eh_frame < p.mapping.end else (0, 0)
             for p in patches]
    wanted = [span for span in spans if span[1] > 0]
    contents = iter(read_ranges_lenient(pid, wanted) if wanted else [])
    code = []
    for applied, (address, size) in zip(patches, spans, strict=True):
        data = next(contents) if size > 0 else None
        frames = decoded_frames(address, data, applied.mapping.start, applied.mapping.end) if data else None
        code.append(PatchCode(applied.mapping.start, applied.mapping.end, patch_code_name(applied),
                              frames if frames is not None and len(frames) else None))
    return code
