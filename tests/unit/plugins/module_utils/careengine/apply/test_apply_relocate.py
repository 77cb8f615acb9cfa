"""Relocation recipes: arithmetic per type, range checks, the apply loop."""

from __future__ import annotations

import struct

import pytest

from plugins.module_utils.careengine.apply.layout import JUMP_ENTRY_SLOT, DisplacementOverflow
from plugins.module_utils.careengine.apply.relocate import (
    R_X86_64,
    RELOCATION_RECIPES_X64,
    Relocation,
    RelocationError,
    RelocationInput,
    apply_relocations,
    compute_relocation,
)

S, A, P = 0x7F00_0000_1000, -4, 0x7F00_0000_0100


def value(rtype: str, **fields) -> int:
    data = compute_relocation(R_X86_64[rtype], RelocationInput(**{"S": S, "A": A, "P": P, **fields}))
    return int.from_bytes(data, "little", signed=rtype not in ("64", "32"))


@pytest.mark.parametrize(("rtype", "expected"), [
    ("64", S + A),
    ("PC32", S + A - P),
    ("PLT32", S + A - P),
    ("PC64", S + A - P),
    ("GOTPCREL", S + A - P),
    ("GOTPCRELX", S + A - P),
    ("REX_GOTPCRELX", S + A - P),
])
def test_defined_symbol_arithmetic(rtype, expected):
    assert value(rtype) == expected


def test_absolute_32_bit_forms():
    assert value("32", S=0x40_1000, A=8) == 0x40_1008
    assert value("32S", S=0x40_1000, A=-0x2000) == 0x40_1000 - 0x2000


def test_imported_call_goes_through_the_jump_entry():
    entry = P + 0x800
    assert value("PC32", jump_entry=entry) == entry + A - P
    # ... while absolute references use the real address
    assert value("64", A=0, jump_entry=entry) == S


@pytest.mark.parametrize("rtype", ["GOTPCREL", "GOTPCRELX", "REX_GOTPCRELX"])
def test_imported_got_reference_uses_the_entry_target_word(rtype):
    entry = P + 0x800
    assert value(rtype, jump_entry=entry) == entry + JUMP_ENTRY_SLOT + A - P


def test_gottpoff_points_at_the_original_got_slot():
    bias, slot_vaddr = 0x5555_5555_4000, 0x3FD8
    got = value("GOTTPOFF", A=slot_vaddr, load_bias=bias, P=bias + 0x1200)
    assert got == slot_vaddr + bias - 4 - (bias + 0x1200)


@pytest.mark.parametrize("rtype", ["NONE", "TPOFF32", "TPOFF64"])
def test_types_that_write_nothing(rtype):
    assert compute_relocation(R_X86_64[rtype], RelocationInput(S, A, P)) == b""


@pytest.mark.parametrize("rtype", ["PC32", "GOTPCREL", "32S"])
def test_32_bit_overflow_is_an_error(rtype):
    with pytest.raises(DisplacementOverflow, match="does not fit in 32 bits"):
        compute_relocation(R_X86_64[rtype], RelocationInput(S=P + (1 << 31) + 4, A=0, P=P if rtype != "32S" else 0))


def test_32_bit_edges_fit():
    assert value("PC32", S=P + (1 << 31) - 1, A=0) == (1 << 31) - 1
    assert value("PC32", S=P - (1 << 31), A=0) == -(1 << 31)
    with pytest.raises(DisplacementOverflow):
        compute_relocation(R_X86_64["32"], RelocationInput(S=-8, A=0, P=0))


def test_unknown_type_is_refused():
    with pytest.raises(RelocationError, match="unsupported relocation R_X86_64_GOT32|unsupported relocation type 3"):
        compute_relocation(3, RelocationInput(S, A, P))


def test_every_recipe_size_matches_its_range():
    for recipe in RELOCATION_RECIPES_X64.values():
        if recipe.calc is not None:
            assert recipe.value_range[1] <= 1 << (recipe.size * 8)


def test_apply_loop_reads_calculates_writes():
    buffer = bytearray(16)
    apply_relocations(buffer, [
        Relocation(0, R_X86_64["64"], RelocationInput(0x1122334455667788, 0, 0)),
        Relocation(8, R_X86_64["PC32"], RelocationInput(0x2000, -4, 0x1000)),
        Relocation(12, R_X86_64["NONE"], RelocationInput(0, 0, 0)),
    ])
    assert struct.unpack("<Qii", buffer) == (0x1122334455667788, 0xFFC, 0)
    with pytest.raises(RelocationError, match="outside its section"):
        apply_relocations(buffer, [Relocation(14, R_X86_64["PC32"], RelocationInput(0, 0, 0))])
