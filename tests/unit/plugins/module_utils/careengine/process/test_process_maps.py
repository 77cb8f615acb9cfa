"""Pure parts of process/: /proc/PID/maps parsing, free holes, ELF headers, registers."""

from __future__ import annotations

import copy

import pytest

from plugins.module_utils.careengine.errors import ProcessError
from plugins.module_utils.careengine.process import (
    Mapping,
    Registers,
    free_holes,
    page_down,
    page_up,
    parse_maps,
    signed64,
)
from plugins.module_utils.careengine.process.loaded_objects import _parse_headers, group_file_mappings

SAMPLE = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1311   /usr/bin/demo
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1311   /usr/bin/demo
55d0c0a03000-55d0c0a04000 rw-p 00002000 fe:01 1311   /usr/bin/demo
55d0c1e7e000-55d0c1e9f000 rw-p 00000000 00:00 0      [heap]
7f1a2c000000-7f1a2c021000 rw-p 00000000 00:00 0
7f1a2d400000-7f1a2d428000 r--p 00000000 fe:01 2201   /usr/lib/x86_64-linux-gnu/libc.so.6
7f1a2d428000-7f1a2d5bd000 r-xp 00028000 fe:01 2201   /usr/lib/x86_64-linux-gnu/libc.so.6
7f1a2d700000-7f1a2d701000 r-xp 00000000 00:2a 77     /tmp/my dir/lib thing.so (deleted)
7f1a2d7ff000-7f1a2d800000 ---p 00000000 00:00 0
7ffd4a2e0000-7ffd4a301000 rw-p 00000000 00:00 0      [stack]
7ffd4a3f0000-7ffd4a3f4000 r--p 00000000 00:00 0      [vvar]
7ffd4a3f4000-7ffd4a3f6000 r-xp 00000000 00:00 0      [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""


def test_parse_maps_fields():
    mappings = parse_maps(SAMPLE)
    assert len(mappings) == 13
    first = mappings[0]
    assert first == Mapping(0x55D0C0A00000, 0x55D0C0A01000, "r--p", 0, "fe:01", 1311, "/usr/bin/demo")
    assert mappings[1].offset == 0x1000 and mappings[1].executable and not mappings[1].writable
    assert mappings[2].writable and mappings[2].readable and not mappings[2].executable
    assert mappings[4].path == "" and not mappings[4].is_file
    assert mappings[3].path == "[heap]" and not mappings[3].is_file
    assert not mappings[8].readable and not mappings[8].executable


def test_parse_maps_path_with_spaces_and_deleted():
    odd = parse_maps(SAMPLE)[7]
    assert odd.path == "/tmp/my dir/lib thing.so (deleted)"
    assert odd.deleted and odd.is_file
    assert odd.clean_path == "/tmp/my dir/lib thing.so"
    assert not parse_maps(SAMPLE)[0].deleted
    assert parse_maps(SAMPLE)[0].clean_path == "/usr/bin/demo"


def test_parse_maps_rejects_garbage():
    with pytest.raises(ProcessError, match="malformed"):
        parse_maps("zz-yy r--p 0 00:00 0\n")
    with pytest.raises(ProcessError, match="malformed"):
        parse_maps("7f00-7f01 r--p\n")
    assert parse_maps("") == []


def test_group_file_mappings_by_device_and_inode():
    groups = group_file_mappings(parse_maps(SAMPLE))
    assert [[m.path for m in group][0] for group in groups] == [
        "/usr/bin/demo",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/tmp/my dir/lib thing.so (deleted)",
    ]
    assert [len(group) for group in groups] == [3, 2, 1]


def test_free_holes_between_mappings():
    mappings = [
        Mapping(0x20000, 0x30000, "r--p", 0, "00:00", 0, ""),
        Mapping(0x30000, 0x31000, "r--p", 0, "00:00", 0, ""),
        Mapping(0x40000, 0x41000, "r--p", 0, "00:00", 0, ""),
    ]
    assert free_holes(mappings, low=0x10000, high=0x50000) == [
        (0x10000, 0x20000),
        (0x31000, 0x40000),
        (0x41000, 0x50000),
    ]


def test_free_holes_unsorted_overlapping_and_clipped():
    mappings = [
        Mapping(0x40000, 0x41000, "r--p", 0, "00:00", 0, ""),
        Mapping(0x8000, 0x12000, "r--p", 0, "00:00", 0, ""),
        Mapping(0x30000, 0x45000, "r--p", 0, "00:00", 0, ""),  # overlaps the first
        Mapping(0x60000, 0x70000, "r--p", 0, "00:00", 0, ""),  # beyond high
    ]
    assert free_holes(mappings, low=0x10000, high=0x50000) == [(0x12000, 0x30000), (0x45000, 0x50000)]


def test_free_holes_page_aligned_bounds():
    assert free_holes([], low=0x10001, high=0x20fff) == [(0x11000, 0x20000)]
    assert free_holes([Mapping(0x10000, 0x20000, "r--p", 0, "00:00", 0, "")], low=0x10000, high=0x20000) == []


def test_free_holes_of_real_sample_default_bounds():
    holes = free_holes(parse_maps(SAMPLE))
    assert holes[0] == (0x10000, 0x55D0C0A00000)
    assert (0x55D0C0A02000, 0x55D0C0A03000) in holes
    assert holes[-1] == (0x7FFD4A3F6000, 0x7FFF_FFFF_F000)
    for start, end in holes:
        assert start % 4096 == 0 and end % 4096 == 0 and start < end


def test_page_helpers():
    assert page_down(0x1fff) == 0x1000 and page_up(0x1001) == 0x2000 and page_up(0x2000) == 0x2000


def test_parse_headers_of_a_real_elf_file():
    with open("/bin/true", "rb") as stream:
        header = stream.read(4096)
    e_type, e_phoff, e_phentsize, e_phnum = _parse_headers(header)
    assert e_type in (2, 3) and e_phoff == 64 and e_phentsize == 56 and e_phnum > 3
    assert _parse_headers(b"\x7fELF" + bytes(60)) is None
    assert _parse_headers(b"#!/bin/sh\n" + bytes(100)) is None


def test_registers_copy_and_compare():
    regs = Registers()
    regs.rip = 0x401000
    regs.orig_rax = (1 << 64) - 1
    duplicate = regs.copy()
    assert duplicate == regs and duplicate is not regs
    duplicate.rax = 5
    assert duplicate != regs and regs.rax == 0
    assert copy.copy(regs) == regs and copy.deepcopy(regs) == regs
    assert "rip=0x401000" in repr(regs)


def test_signed64():
    assert signed64((1 << 64) - 1) == -1
    assert signed64((1 << 64) - 22) == -22
    assert signed64(0x7FFF_FFFF_FFFF_FFFF) == 0x7FFF_FFFF_FFFF_FFFF


def test_same_file_loaded_twice_is_two_objects():
    text = (
        "7f0000000000-7f0000001000 r--p 00000000 fe:01 99 /lib/libx.so\n"
        "7f0000001000-7f0000002000 r-xp 00001000 fe:01 99 /lib/libx.so\n"
        "7f0000010000-7f0000011000 r--p 00000000 fe:01 99 /lib/libx.so\n"
        "7f0000011000-7f0000012000 r-xp 00001000 fe:01 99 /lib/libx.so\n"
    )
    groups = group_file_mappings(parse_maps(text))
    assert [[m.start for m in group] for group in groups] == [
        [0x7F0000000000, 0x7F0000001000],
        [0x7F0000010000, 0x7F0000011000],
    ]
