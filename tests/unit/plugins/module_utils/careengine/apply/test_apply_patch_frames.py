"""Unwind records of applied patch code: decoded from ``.eh_frame`` bytes as mapped, and
used by the safety check's walk to go on through patch frames."""

from __future__ import annotations

import struct

from plugins.module_utils.careengine.apply.patch_frames import PatchCode, PatchFrames, decoded_frames, record_offsets
from plugins.module_utils.careengine.apply.safety import (
    FrameRules,
    GuardedRange,
    RangeIndex,
    ThreadState,
    scan_candidates,
    unwind_is_busy,
    walk_frames,
)

CODE = 0x7F00_0000_1000          # the patch mapping's code: [CODE, CODE + 0x1000)
CODE_END = CODE + 0x1000
EH_FRAME = CODE + 0x800          # where its .kpatch.eh_frame is mapped
LEAF = CODE + 0x100              # a function called by the patch code: CFA = rsp + 8 throughout
PATCHED = CODE + 0x200           # the patch's f': pushes %rbp at its first byte
OUTER = CODE + 0x300             # the outermost frame (return address undefined)
STACK = 0x7FFF_0000
DW_CFA_DEF_CFA = bytes([0x0C, 7, 8])                  # CFA = rsp + 8
RA_AT_CFA_MINUS_8 = bytes([0x80 | 16, 1])             # return address at CFA - 8
PUSH_RBP = bytes([0x40 | 1, 0x0E, 16, 0x80 | 6, 2])   # advance 1; CFA = rsp + 16; rbp at CFA - 16
RA_UNDEFINED = bytes([0x07, 16])


def _padded(body: bytes) -> bytes:
    body += b"\0" * (-(len(body) + 4) % 8)           # DW_CFA_nop
    return struct.pack("<I", len(body)) + body


def eh_frame(address: int, functions: list[tuple[int, int, bytes]]) -> bytes:
    """``.eh_frame`` bytes as mapped at ``address``: one CIE ("zR", PC-relative sdata4),
    one FDE per (start, size, instructions), a zero terminator."""
    cie = _padded(b"\0\0\0\0" + b"\x01zR\0" + bytes([1, 0x78, 16, 1, 0x1B]) + DW_CFA_DEF_CFA + RA_AT_CFA_MINUS_8)
    data = cie
    for start, size, instructions in functions:
        here = len(data)
        pc_begin = start - (address + here + 8)
        data += _padded(struct.pack("<Iii", here + 4, pc_begin, size) + b"\0" + instructions)
    return data + b"\0\0\0\0"


def records() -> bytes:
    return eh_frame(EH_FRAME, [(LEAF, 0x40, b""), (PATCHED, 0x40, PUSH_RBP), (OUTER, 0x40, RA_UNDEFINED)])


def thread(rip: int, rsp: int = STACK) -> ThreadState:
    return ThreadState(99, {"rip": rip, "rsp": rsp, "rbp": 0, "rbx": 0, "r12": 0, "r13": 0, "r14": 0, "r15": 0})


def stack(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}Q", *words)


def test_records_are_listed_up_to_the_terminator():
    data = records()
    offsets, end = record_offsets(data + b"garbage after the terminator")
    assert len(offsets) == 4 and end == len(data) - 4
    assert record_offsets(data[:10]) == ([], 0)           # a truncated first record


def test_rules_come_from_the_fde_at_the_mapped_address():
    frames = PatchFrames(EH_FRAME, records(), CODE, CODE_END)
    assert frames.ranges == [(LEAF, LEAF + 0x40), (PATCHED, PATCHED + 0x40), (OUTER, OUTER + 0x40)]
    entry = frames.frame_rule(PATCHED)
    assert (entry.cfa_register, entry.cfa_offset, dict(entry.saved)) == (7, 8, {16: -8})
    pushed = frames.frame_rule(PATCHED + 5)
    assert (pushed.cfa_register, pushed.cfa_offset, dict(pushed.saved)) == (7, 16, {16: -8, 6: -16})
    assert frames.frame_rule(OUTER + 1).outermost
    assert frames.frame_rule(PATCHED + 0x40) is None and frames.frame_rule(CODE) is None


def test_records_for_code_outside_the_patch_mapping_are_ignored():
    data = eh_frame(EH_FRAME, [(CODE - 0x100, 0x40, b""), (PATCHED, 0x40, b""), (CODE_END - 0x20, 0x40, b"")])
    frames = PatchFrames(EH_FRAME, data, CODE, CODE_END)
    assert frames.ranges == [(PATCHED, PATCHED + 0x40)]
    assert frames.frame_rule(CODE - 0x100) is None and frames.frame_rule(CODE_END - 0x10) is None


def test_the_same_records_are_decoded_once():
    first = decoded_frames(EH_FRAME, records() + b"\xff" * 64, CODE, CODE_END)
    assert decoded_frames(EH_FRAME, records(), CODE, CODE_END) is first
    assert decoded_frames(EH_FRAME + 0x1000, records(), CODE, CODE_END + 0x1000) is not first


# The thread is in LEAF, called by the patch's f' (after its push of %rbp), called by OUTER.
WALKED = stack(PATCHED + 0x11, 0x1111, OUTER + 0x21, 0)
GUARDED = GuardedRange(OUTER, 0x40, "c")


def rules(frames: PatchFrames | None) -> FrameRules:
    return FrameRules([], {}, [PatchCode(CODE, CODE_END, "the level-1 patch code (f)", frames)])


def test_the_walk_goes_through_the_patch_frame_to_its_caller():
    frames, complete = walk_frames(thread(LEAF + 4), WALKED, STACK, rules(PatchFrames(EH_FRAME, records(), CODE,
                                                                                        CODE_END)))
    assert complete
    assert [frame.pc for frame in frames] == [LEAF + 4, PATCHED + 0x11, OUTER + 0x21]
    assert [frame.cfa for frame in frames] == [STACK + 8, STACK + 24, None]      # the outermost: no caller


def test_a_caller_above_patch_code_is_seen_returned_into():
    found = unwind_is_busy(thread(LEAF + 4), WALKED, STACK, RangeIndex([GUARDED]),
                           scan_candidates(WALKED, STACK, RangeIndex([GUARDED])),
                           rules(PatchFrames(EH_FRAME, records(), CODE, CODE_END)))
    assert found is not None and (found.how, found.address, found.note) == ("returns into", OUTER + 0x21, "")


def test_a_stale_word_in_a_patch_frame_is_not_busy_once_the_walk_goes_through_it():
    stale = GuardedRange(CODE + 0x400, 0x40, "g")
    words = stack(PATCHED + 0x11, stale.start + 0x10, OUTER + 0x21, 0)   # f' saved a %rbp that looks like one
    index = RangeIndex([stale])
    candidates = scan_candidates(words, STACK, index)
    assert candidates == [(STACK + 8, stale)]
    with_records = rules(PatchFrames(EH_FRAME, records(), CODE, CODE_END))
    assert unwind_is_busy(thread(LEAF + 4), words, STACK, index, candidates, with_records) is None
    found = unwind_is_busy(thread(LEAF + 4), words, STACK, index, candidates, rules(None))
    assert found is not None and found.how == "may return into" and found.address == STACK + 8


def test_patch_code_without_records_stops_the_walk_and_the_reason_says_so():
    index = RangeIndex([GUARDED])
    found = unwind_is_busy(thread(PATCHED + 0x11), WALKED[8:], STACK + 8, index,
                           scan_candidates(WALKED[8:], STACK + 8, index), rules(None))
    assert found is not None and found.how == "may return into"
    assert "the level-1 patch code (f) has no unwind records" in found.describe()
    assert rules(None)(PATCHED) == (None, True)
