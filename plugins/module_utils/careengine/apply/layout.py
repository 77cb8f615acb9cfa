"""Where things go: the patch mapping's layout, its address, and the instruction stubs.

The patch mapping (LibCare's layout, so either tool can read what the other applied)::

    0                 header (688 bytes; apply-time fields filled in)
    kpatch_offset     the relocated ELF image        (up to total_size)
    jmp_offset        jump table: 16-byte header + one 16-byte entry per imported symbol
    user_undo         5 saved original bytes per .kpatch.info record
    trap_offset       one 0xCC byte: return address for remote calls (IFUNC resolvers)
    data_offset       the patch's writable sections (.kpatch.data), on pages of their own

The part up to ``data_offset`` is rounded up to whole pages and mapped read + execute once
written; the data pages stay read + write (W^X: no page is both writable and executable,
unlike LibCare's single RWX mapping). All of it is pure arithmetic over sizes and addresses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import CareError
from ..patchfile import JUMP_SIZE
from ..process.maps import PAGE_SIZE

JUMP_ENTRY_SIZE = 16
JUMP_TABLE_HEADER_SIZE = 16
# jmp *2(%rip); nop; nop — then the 8-byte absolute target the jmp reads.
JUMP_ENTRY_CODE = bytes((0xFF, 0x25, 0x02, 0x00, 0x00, 0x00, 0x90, 0x90))
JUMP_ENTRY_SLOT = len(JUMP_ENTRY_CODE)   # offset of the target word (acts as a GOT slot)
JMP_REL32_OPCODE = 0xE9
TRAP_BYTE = b"\xcc"
REACH = 1 << 31                          # what a signed 32-bit displacement reaches
GUARD = PAGE_SIZE                        # keep one free page either side of the mapping


class PlacementError(CareError):
    """No free address range near enough to the object for the patch."""


class DisplacementOverflow(CareError):
    """A 32-bit displacement cannot reach its target."""


def round_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment``."""
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class PatchLayout:
    """Offsets inside the patch mapping (relative to its start, the header)."""

    total_size: int
    jmp_offset: int
    jump_entries: int
    user_undo: int
    info_entries: int
    trap_offset: int
    mapping_size: int                # the whole mapping: code part, then data part
    data_offset: int = 0             # start of the writable pages (0: none)

    @property
    def code_size(self) -> int:
        """Bytes mapped read + execute: everything but the data pages."""
        return self.data_offset or self.mapping_size

    @property
    def data_size(self) -> int:
        """Bytes of the writable pages."""
        return self.mapping_size - self.code_size if self.data_offset else 0

    def jump_entry_offset(self, index: int) -> int:
        """Offset of jump-table entry ``index``."""
        return self.jmp_offset + JUMP_TABLE_HEADER_SIZE + index * JUMP_ENTRY_SIZE

    def undo_offset(self, index: int) -> int:
        """Offset of the 5 saved bytes of info record ``index``."""
        return self.user_undo + JUMP_SIZE * index


def plan_layout(total_size: int, jump_entries: int, info_entries: int, data_size: int = 0) -> PatchLayout:
    """The layout for an image of ``total_size`` bytes (header included) whose writable
    sections need ``data_size`` bytes."""
    if jump_entries:
        jmp_offset = round_up(total_size, 8)
        table_size = JUMP_TABLE_HEADER_SIZE + jump_entries * JUMP_ENTRY_SIZE
        user_undo = round_up(jmp_offset + table_size, 128)
    else:
        jmp_offset = 0
        user_undo = round_up(total_size, 8)
    trap_offset = round_up(user_undo + JUMP_SIZE * info_entries, 16)
    code_size = round_up(trap_offset + len(TRAP_BYTE), PAGE_SIZE)
    return PatchLayout(
        total_size=total_size,
        jmp_offset=jmp_offset,
        jump_entries=jump_entries,
        user_undo=user_undo,
        info_entries=info_entries,
        trap_offset=trap_offset,
        mapping_size=code_size + round_up(data_size, PAGE_SIZE),
        data_offset=code_size if data_size else 0,
    )


def jump_table_bytes(targets: list[int]) -> bytes:
    """The jump table: header (size, used, capacity) then one entry per target address."""
    count = len(targets)
    header = struct.pack("<III4x", JUMP_TABLE_HEADER_SIZE + count * JUMP_ENTRY_SIZE, count, count)
    return header + b"".join(JUMP_ENTRY_CODE + struct.pack("<Q", target) for target in targets)


def jump_instruction(site: int, target: int) -> bytes:
    """``jmp rel32`` at ``site`` to ``target`` (5 bytes)."""
    displacement = target - (site + JUMP_SIZE)
    if not -REACH <= displacement < REACH:
        raise DisplacementOverflow(f"jump from {site:#x} to {target:#x} does not fit in 32 bits")
    return struct.pack("<Bi", JMP_REL32_OPCODE, displacement)


def reach_window(low: int, high: int, size: int) -> tuple[int, int]:
    """Addresses ``[start, end)`` where a mapping of ``size`` bytes reaches all of
    ``[low, high)`` (and is reached from it) with signed 32-bit displacements."""
    return max(high - REACH + PAGE_SIZE, 0), low + REACH - PAGE_SIZE


def choose_address(holes: list[tuple[int, int]], low: int, high: int, size: int,
                   avoid: list[tuple[int, int]] = ()) -> int:
    """A page-aligned address for a mapping of ``size`` bytes within reach of ``[low, high)``.

    Deterministic: prefers the free space just below the object (an executable's
    ``[heap]`` grows upward right after it, so the space above is left alone), then the
    space just above it; a guard page stays free on both sides. ``avoid`` ranges (such
    as the brk area above the heap) are never used.
    """
    window_start, window_end = reach_window(low, high, size)
    below: list[int] = []
    above: list[int] = []
    for hole_start, hole_end in holes:
        start = max(hole_start + GUARD, window_start)
        end = min(hole_end - GUARD, window_end)
        start = round_up(start, PAGE_SIZE)
        end -= end % PAGE_SIZE
        for avoid_start, avoid_end in avoid:
            if avoid_start <= start < avoid_end:
                start = round_up(avoid_end, PAGE_SIZE)
        if end - start < size:
            continue
        if end <= low:
            below.append(end - size)          # as close to the object as possible
        elif start >= high:
            above.append(start)
    if below:
        return max(below)
    if above:
        return min(above)
    raise PlacementError(
        f"no free {size}-byte range within 2 GiB of {low:#x}-{high:#x}: the address space is too crowded"
    )
