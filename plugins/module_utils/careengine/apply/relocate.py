"""Relocation arithmetic for the patch image: one recipe per x86-64 relocation type.

Like pyelftools' ``_RELOCATION_RECIPES_X64``: a table of (size in bytes, value range,
calculation) and one loop that reads, calculates and writes. Adding a type is one row.

The calculation gets a :class:`RelocationInput`: ``S`` the symbol's address, ``A`` the
addend, ``P`` the patient address of the place, plus what some types need: the address
of the symbol's jump-table entry (imported symbols: calls go through it, its target word
serves as GOT slot) and the object's load bias (``GOTTPOFF``: the addend holds the vaddr
of the ORIGINAL object's GOT slot of the TLS variable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from elftools.elf.enums import ENUM_RELOC_TYPE_x64

from ..errors import CareError
from .layout import JUMP_ENTRY_SLOT, DisplacementOverflow

# The numbers come from pyelftools, which (0.32) lacks R_X86_64_GOTPCRELX (41, x86-64 psABI).
_RELOCATION_NUMBERS = {"R_X86_64_GOTPCRELX": 41, **ENUM_RELOC_TYPE_x64}
R_X86_64 = {
    name: _RELOCATION_NUMBERS["R_X86_64_" + name]
    for name in ("NONE", "64", "PC32", "PLT32", "GOTPCREL", "32", "32S", "TPOFF64", "GOTTPOFF", "TPOFF32",
                 "PC64", "GOTPCRELX", "REX_GOTPCRELX")
}
RELOCATION_NAMES = {number: "R_X86_64_" + name for name, number in R_X86_64.items()}


class RelocationError(CareError):
    """A relocation of the patch cannot be applied (unknown type, value out of range)."""


@dataclass(frozen=True)
class RelocationInput:
    """What one relocation is computed from."""

    S: int                      # symbol address (a real address; imported: the real target)
    A: int                      # addend
    P: int                      # patient address of the place being relocated
    jump_entry: int | None = None   # imported symbol: address of its jump-table entry
    load_bias: int = 0          # of the patched object


def _direct(value: RelocationInput) -> int:
    return value.S + value.A


def _pc_relative(value: RelocationInput) -> int:
    # Calls and jumps to imported functions go through the jump-table entry, which can
    # always be reached; everything else is reached directly.
    target = value.jump_entry if value.jump_entry is not None else value.S
    return target + value.A - value.P


def _got_relative(value: RelocationInput) -> int:
    # Imported symbol: the entry's target word is the GOT slot. Defined symbol: the
    # build turned the GOT load (mov) into lea, so this is a plain PC-relative address.
    if value.jump_entry is not None:
        return value.jump_entry + JUMP_ENTRY_SLOT + value.A - value.P
    return value.S + value.A - value.P


def _got_tp_offset(value: RelocationInput) -> int:
    # The addend is the link-time vaddr of the original object's GOT slot holding the
    # variable's TP offset; the instruction's own -4 was replaced by it.
    return value.A + value.load_bias - 4 - value.P


SIGNED32 = (-(1 << 31), 1 << 31)
UNSIGNED32 = (0, 1 << 32)
ANY64 = (-(1 << 63), 1 << 64)


@dataclass(frozen=True)
class Recipe:
    """How to apply one relocation type: bytes written, allowed range, calculation."""

    size: int
    value_range: tuple[int, int] | None
    calc: Callable[[RelocationInput], int] | None    # None: nothing to write


RELOCATION_RECIPES_X64: dict[int, Recipe] = {
    R_X86_64["NONE"]: Recipe(0, None, None),
    R_X86_64["64"]: Recipe(8, ANY64, _direct),
    R_X86_64["PC32"]: Recipe(4, SIGNED32, _pc_relative),
    R_X86_64["PLT32"]: Recipe(4, SIGNED32, _pc_relative),
    R_X86_64["PC64"]: Recipe(8, ANY64, _pc_relative),
    R_X86_64["32"]: Recipe(4, UNSIGNED32, _direct),
    R_X86_64["32S"]: Recipe(4, SIGNED32, _direct),
    R_X86_64["GOTPCREL"]: Recipe(4, SIGNED32, _got_relative),
    R_X86_64["GOTPCRELX"]: Recipe(4, SIGNED32, _got_relative),
    R_X86_64["REX_GOTPCRELX"]: Recipe(4, SIGNED32, _got_relative),
    R_X86_64["GOTTPOFF"]: Recipe(4, SIGNED32, _got_tp_offset),
    # Local-exec TLS: the linked bytes already hold the (checked) offset.
    R_X86_64["TPOFF32"]: Recipe(0, None, None),
    R_X86_64["TPOFF64"]: Recipe(0, None, None),
}


def relocation_name(rtype: int) -> str:
    """``R_X86_64_PC32`` for 2, ``type 99`` for unknown numbers."""
    return RELOCATION_NAMES.get(rtype, f"type {rtype}")


def compute_relocation(rtype: int, value: RelocationInput, where: str = "") -> bytes:
    """The bytes a relocation of type ``rtype`` writes (empty: nothing to write)."""
    recipe = RELOCATION_RECIPES_X64.get(rtype)
    if recipe is None:
        raise RelocationError(f"unsupported relocation {relocation_name(rtype)}{' at ' + where if where else ''}")
    if recipe.calc is None:
        return b""
    result = recipe.calc(value)
    low, high = recipe.value_range
    if not low <= result < high:
        message = (f"{relocation_name(rtype)}{' at ' + where if where else ''}: value {result:#x} does not fit"
                   f" in {recipe.size * 8} bits (target too far from the patch)")
        raise DisplacementOverflow(message)
    return (result & ((1 << (recipe.size * 8)) - 1)).to_bytes(recipe.size, "little")


@dataclass(frozen=True)
class Relocation:
    """One relocation to apply to a buffer: where (offset in it) and from what."""

    offset: int
    rtype: int
    value: RelocationInput
    where: str = ""
    section: tuple[int, int] | None = None   # [start, end) of its section in the buffer (None: all of it)


def apply_relocations(buffer: bytearray, relocations: list[Relocation]) -> None:
    """Read, calculate, write: apply every relocation to ``buffer`` in place.

    A place must lie inside its own section, not merely inside the buffer: a relocation
    that spills into the next section (``.kpatch.info``, say) is refused.
    """
    for relocation in relocations:
        data = compute_relocation(relocation.rtype, relocation.value, relocation.where)
        if not data:
            continue
        start, limit = relocation.section or (0, len(buffer))
        end = relocation.offset + len(data)
        if relocation.offset < max(start, 0) or end > min(limit, len(buffer)):
            raise RelocationError(f"relocation at {relocation.where or hex(relocation.offset)} lies outside its section")
        buffer[relocation.offset:end] = data
