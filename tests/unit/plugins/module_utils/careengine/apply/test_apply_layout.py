"""Patch mapping layout, jump table bytes, jump instruction, choice of address."""

from __future__ import annotations

import struct

import pytest

from plugins.module_utils.careengine.apply.layout import (
    GUARD,
    PAGE_SIZE,
    REACH,
    DisplacementOverflow,
    PlacementError,
    choose_address,
    jump_instruction,
    jump_table_bytes,
    plan_layout,
)


def test_layout_like_libcare_with_imports():
    # LibCare's server example: image 0x1870 bytes, 3 imports, 1 info record.
    layout = plan_layout(0x1870, 3, 1)
    assert layout.jmp_offset == 0x1870
    assert layout.jump_entry_offset(0) == 0x1880 and layout.jump_entry_offset(2) == 0x18A0
    assert layout.user_undo == 0x1900
    assert layout.undo_offset(1) == 0x1905
    assert layout.trap_offset == 0x1910
    assert layout.mapping_size == 0x2000


def test_layout_without_imports():
    layout = plan_layout(0xFF4, 0, 2)
    assert layout.jmp_offset == 0 and layout.user_undo == 0xFF8
    assert layout.trap_offset == 0x1010           # after 2 x 5 undo bytes, 16-aligned
    assert layout.mapping_size == 2 * PAGE_SIZE


def test_layout_with_data_pages():
    layout = plan_layout(0x1870, 3, 1, data_size=0x1001)
    assert layout.trap_offset == 0x1910                 # the code part is laid out as before
    assert layout.data_offset == layout.code_size == 0x2000
    assert layout.data_size == 2 * PAGE_SIZE and layout.mapping_size == 0x4000
    without = plan_layout(0x1870, 3, 1)
    assert (without.data_offset, without.data_size, without.code_size) == (0, 0, without.mapping_size)


def test_jump_table_bytes():
    table = jump_table_bytes([0x7F00_1234_5678, 0x40_1000])
    assert len(table) == 16 + 2 * 16
    assert struct.unpack_from("<III", table) == (48, 2, 2)
    assert table[16:24] == bytes.fromhex("ff25020000009090")
    assert struct.unpack_from("<Q", table, 24)[0] == 0x7F00_1234_5678
    assert table[32:40] == bytes.fromhex("ff25020000009090")
    assert struct.unpack_from("<Q", table, 40)[0] == 0x40_1000


def test_jump_instruction():
    assert jump_instruction(0x1000, 0x2000) == b"\xe9" + struct.pack("<i", 0x2000 - 0x1005)
    assert jump_instruction(0x2000, 0x1000) == b"\xe9" + struct.pack("<i", 0x1000 - 0x2005)
    with pytest.raises(DisplacementOverflow):
        jump_instruction(0x1000, 0x1000 + (1 << 32))


def test_address_prefers_just_below_the_object():
    obj = (0x5555_0000_0000, 0x5555_0000_5000)
    holes = [(0x1_0000, obj[0]), (obj[1] + 0x10000, 0x7F00_0000_0000)]
    address = choose_address(holes, *obj, 0x2000)
    assert address == obj[0] - GUARD - 0x2000
    assert address % PAGE_SIZE == 0


def test_address_above_when_nothing_below_fits_and_guard_pages_kept():
    obj = (0x40_0000, 0x40_5000)
    holes = [(0x3F_F000, 0x40_0000), (0x40_5000, 0x50_0000)]
    assert choose_address(holes, *obj, 0x1000) == 0x40_5000 + GUARD


def test_address_skips_the_brk_area():
    obj = (0x40_0000, 0x40_5000)
    heap_end = 0x60_0000
    holes = [(heap_end, 0x1000_0000)]
    address = choose_address(holes, *obj, 0x1000, avoid=[(heap_end, heap_end + 0x100_0000)])
    assert address >= heap_end + 0x100_0000


def test_address_must_be_within_reach():
    obj = (0x7F00_0000_0000, 0x7F00_0010_0000)
    far_below = [(0x1_0000, obj[0] - REACH - 0x10_0000)]
    with pytest.raises(PlacementError, match="within 2 GiB"):
        choose_address(far_below, *obj, 0x1000)
    # A huge hole is clipped to the reachable window.
    address = choose_address([(0x1_0000, obj[0])], *obj, 0x1000)
    assert obj[1] - address < REACH and address < obj[0]


def test_too_small_holes_are_skipped():
    obj = (0x7F00_0000_0000, 0x7F00_0010_0000)
    holes = [(obj[0] - 0x2000, obj[0]), (obj[0] - 0x10_0000, obj[0] - 0x8_0000)]
    assert choose_address(holes, *obj, 0x2000) == obj[0] - 0x8_0000 - GUARD - 0x2000
