"""Pure steps of the engine: level decisions, reading an applied patch from memory bytes."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from plugins.module_utils.careengine.apply.engine import by_object, decide_level, decode_applied
from plugins.module_utils.careengine.apply.image import DATA_SIZE_FIELD, IDENTITY_FIELD, PatchImage
from plugins.module_utils.careengine.patchfile import (
    HEADER_OFFSETS,
    HEADER_SIZE,
    InfoEntry,
    PatchHeader,
    encode_info_entry,
    encode_patch,
    info_terminator,
)
from plugins.module_utils.careengine.patchfile import PatchFile as PatchFileType
from plugins.module_utils.careengine.process import Mapping

BUILD_ID = "ab" * 20
ELF_STUB = b"\x7fELF" + b"\0" * 60


def image(level: int, identity: int) -> PatchImage:
    patch = PatchFileType(PatchHeader(BUILD_ID, level=level), ELF_STUB)
    return PatchImage(patch, (), (), (), 0, 0, (), (), (), identity)


def applied_bytes(level: int, identity: int, start: int) -> bytes:
    """A patch mapping as the loader leaves it: header, info table, names, undo bytes."""
    user_info, strtab, user_undo, size = 0x300, 0x380, 0x400, 0x1000
    header = bytearray(encode_patch(PatchHeader(BUILD_ID, level=level), ELF_STUB)[:HEADER_SIZE])
    for name, value in (("user_info", user_info), ("user_undo", user_undo)):
        struct.pack_into("<I", header, HEADER_OFFSETS[name], value)
    struct.pack_into("<I", header, IDENTITY_FIELD, identity)
    mapping = bytearray(size)
    mapping[:HEADER_SIZE] = header
    entries = [InfoEntry(0x40_1000, start + 0x2C0, 0x30, 0x20, start + strtab),
               InfoEntry(0, start + 0x2E0, 0, 0x10, start + strtab + 16)]
    table = b"".join(encode_info_entry(e) for e in entries) + info_terminator()
    mapping[user_info:user_info + len(table)] = table
    mapping[strtab:strtab + 32] = b"report.kpatch\0\0\0helper.kpatch\0\0\0"
    mapping[user_undo:user_undo + 10] = b"\xf3\x0f\x1e\xfa\x55" + b"\0" * 5
    return bytes(mapping)


def test_decode_applied_patch_from_memory():
    start = 0x7F00_0000_0000
    contents = applied_bytes(3, 0x1234, start)
    applied = decode_applied(Mapping(start, start + 0x1000, "rwxp", 0, "00:00", 0, ""), contents[:HEADER_SIZE],
                             contents)
    assert (applied.build_id, applied.level, applied.identity) == (BUILD_ID, 3, 0x1234)
    assert applied.names == ("report", "helper")
    assert applied.replaced_functions == ("report",)
    assert applied.undo[0] == b"\xf3\x0f\x1e\xfa\x55"
    assert applied.entries[1].is_new
    assert applied.data_size == 0 and applied.total_size == 0x1000     # as LibCare applies it


@pytest.mark.parametrize(("field", "data_size"), [(0x2000, 0x2000), (0x1234, 0), (1 << 31, 0)])
def test_data_pages_after_the_code_mapping(field: int, data_size: int):
    """Our loader records the size of the data pages after the r-x mapping; a value that
    cannot be ours (not whole pages, absurdly large) is ignored."""
    start = 0x7F00_0000_0000
    contents = bytearray(applied_bytes(1, 7, start))
    struct.pack_into("<I", contents, DATA_SIZE_FIELD, field)
    applied = decode_applied(Mapping(start, start + 0x1000, "r-xp", 0, "00:00", 0, ""),
                             bytes(contents[:HEADER_SIZE]), bytes(contents))
    assert applied.data_size == data_size and applied.total_size == 0x1000 + data_size


@pytest.mark.parametrize(("applied_level", "identity", "requested", "action", "words"), [
    (None, 0, 1, "apply", ""),
    (1, 7, 1, "skipped", "already applied"),
    (1, 8, 1, "failed", "different patch"),
    (1, 0, 1, "skipped", "by another tool"),
    (1, 7, 2, "replace", "replacing level 1 with level 2"),
    (3, 7, 2, "skipped", "newer"),
])
def test_level_rules(applied_level, identity, requested, action, words):
    applied = None
    if applied_level is not None:
        start = 0x7F00_0000_0000
        contents = applied_bytes(applied_level, identity, start)
        applied = replace(decode_applied(Mapping(start, start + 0x1000, "rwxp", 0, "00:00", 0, ""),
                                         contents[:HEADER_SIZE], contents), jumps_in_place=1)
    decision = decide_level(image(requested, 7), applied)
    assert decision.action == action
    assert words in decision.reason


def test_incomplete_leftover_is_replaced_even_at_the_same_level():
    start = 0x7F00_0000_0000
    contents = applied_bytes(1, 7, start)
    leftover = decode_applied(Mapping(start, start + 0x1000, "rwxp", 0, "00:00", 0, ""), contents[:HEADER_SIZE],
                              contents)
    leftover = replace(leftover, jumps_in_place=0)
    assert not leftover.complete
    decision = decide_level(image(1, 7), leftover)
    assert decision.action == "replace" and "incomplete" in decision.reason


def applied_at(level: int, identity: int, start: int, jumps: int):
    contents = applied_bytes(level, identity, start)
    decoded = decode_applied(Mapping(start, start + 0x1000, "r-xp", 0, "00:00", 0, ""), contents[:HEADER_SIZE],
                             contents)
    return replace(decoded, jumps_in_place=jumps)


def test_an_interrupted_replacement_is_one_object_with_a_leftover():
    """Killed between the jumps of a replacement: level 2 has one jump, level 1 the other."""
    level1 = applied_at(1, 7, 0x7F00_0000_0000, 1)
    level2 = applied_at(2, 9, 0x7F00_0001_0000, 1)
    [(build_id, in_force)] = by_object([level1, level2]).items()
    assert build_id == level1.build_id
    assert in_force.level == 2 and in_force.leftovers == (level1,)
    assert not in_force.in_force and in_force.interrupted().startswith("level2:1/")
    decision = decide_level(image(2, 9), in_force)
    assert decision.action == "replace" and "interrupted run" in decision.reason


def test_a_leftover_without_jumps_does_not_hide_the_level_in_force():
    """Killed after mmap of level 2: level 1 still runs, level 2 is an unused leftover; a
    request for a lower level does not downgrade it."""
    level1 = applied_at(1, 7, 0x7F00_0000_0000, 1)
    level2 = applied_at(2, 9, 0x7F00_0001_0000, 0)
    in_force = by_object([level2, level1])[level1.build_id]
    assert in_force.level == 1 and in_force.in_force and not in_force.clean
    assert decide_level(image(1, 7), in_force).action == "replace"
    assert decide_level(image(0, 7), in_force).action == "skipped"
