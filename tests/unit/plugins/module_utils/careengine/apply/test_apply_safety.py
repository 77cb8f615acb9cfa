"""The safety check's pure parts: candidate scan, frame walk, live vs stale words."""

from __future__ import annotations

import struct

import pytest

from plugins.module_utils.careengine.apply.object_files import FrameRule
from plugins.module_utils.careengine.apply.safety import (
    GuardedRange,
    RangeIndex,
    ThreadState,
    scan_candidates,
    scan_stack,
    stack_ranges,
    unwind_is_busy,
    walk_frames,
)
from plugins.module_utils.careengine.process import Mapping

FUNC = GuardedRange(0x40_1000, 0x40, "replaced")
OTHER = 0x40_2000          # code of callers (not guarded)
BASE = 0x7FFF_0000


def stack(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}Q", *words)


def thread(rip: int, rsp: int = BASE) -> ThreadState:
    return ThreadState(1234, {"rip": rip, "rsp": rsp, "rbp": 0, "rbx": 0, "r12": 0, "r13": 0, "r14": 0, "r15": 0})


# Every function here: CFA = rsp + 8, return address at CFA - 8 (a frame of one word) ...
LEAF = FrameRule(7, 8, ((16, -8),))
# ... or a frame with 2 extra words of locals: CFA = rsp + 24.
WIDE = FrameRule(7, 24, ((16, -8),))


def rules(table: dict[int, FrameRule | None]):
    def rule_at(pc: int):
        for start, rule in table.items():
            if start <= pc < start + 0x100:
                return rule, True
        return None, False
    return rule_at


def test_scan_ignores_function_pointers_and_finds_inner_words():
    index = RangeIndex([FUNC])
    found = scan_candidates(stack(FUNC.start, FUNC.start + 5, 0, FUNC.start + FUNC.size), BASE, index)
    assert found == [(BASE + 8, FUNC)]


def test_stack_ranges_reach_the_end_of_the_stack_mapping():
    mappings = [Mapping(BASE - 0x1000, BASE + 0x2000, "rw-p", 0, "00:00", 0, "[stack]")]
    assert stack_ranges([thread(0, BASE + 0x10)], mappings) == [(BASE + 0x10, 0x1FF0)]
    assert stack_ranges([thread(0, 0x1234)], mappings) == [(0x1230, 0)]


def test_walk_frames_to_the_outermost_frame():
    # OTHER frame (wide) returns to OTHER+0x100 region, which returns to 0 (end).
    rule_at = rules({OTHER: WIDE, OTHER + 0x100: LEAF})
    words = stack(0xAAAA, 0xBBBB, OTHER + 0x110, 0)
    frames, complete = walk_frames(thread(OTHER + 4), words, BASE, rule_at)
    assert complete
    assert [f.pc for f in frames] == [OTHER + 4, OTHER + 0x110]
    assert frames[0].cfa == BASE + 24


def test_live_return_address_is_busy():
    rule_at = rules({OTHER: LEAF, FUNC.start: WIDE})
    words = stack(FUNC.start + 0x10, 0, 0, 0)
    found = unwind_is_busy(thread(OTHER + 4), words, BASE, RangeIndex([FUNC]),
                           [(BASE, FUNC)], rule_at)
    assert found is not None and found.how == "returns into" and found.function == "replaced"


def test_stale_word_inside_a_walked_frame_is_not_busy():
    # A wide frame whose locals hold an old return address into FUNC; its real
    # return address leads out of the guarded code, to the end of the stack.
    rule_at = rules({OTHER: WIDE, OTHER + 0x100: LEAF})
    words = stack(FUNC.start + 0x10, 0xBBBB, OTHER + 0x110, 0)
    candidates = scan_candidates(words, BASE, RangeIndex([FUNC]))
    assert candidates == [(BASE, FUNC)]
    assert unwind_is_busy(thread(OTHER + 4), words, BASE, RangeIndex([FUNC]), candidates, rule_at) is None


def test_a_walk_that_stops_early_keeps_deeper_candidates_live():
    # No CFI for the caller at OTHER+0x110: the candidate above it cannot be ruled out.
    rule_at = rules({OTHER: WIDE})
    words = stack(0, 0, OTHER + 0x110, 0, FUNC.start + 0x20, 0)
    candidates = scan_candidates(words, BASE, RangeIndex([FUNC]))
    found = unwind_is_busy(thread(OTHER + 4), words, BASE, RangeIndex([FUNC]), candidates, rule_at)
    assert found is not None and found.how == "may return into" and found.address == BASE + 32


def test_executing_thread_is_busy():
    found = unwind_is_busy(thread(FUNC.start + 3), stack(0), BASE, RangeIndex([FUNC]), [], rules({FUNC.start: LEAF}))
    assert found is not None and found.how == "executing"
    assert "thread 1234 executing replaced" in found.describe()


TRAMPOLINE = 0x7F00_0000_0500


def test_walk_crosses_a_signal_frame_to_the_interrupted_code():
    # Handler frame (LEAF) returns into the trampoline; at that point the ucontext is at
    # the stack pointer: gregs hold the interrupted rip (inside FUNC) and rsp.
    gregs = [0] * 23
    gregs[16] = FUNC.start + 0x8          # rip
    gregs[15] = 0x1000                    # rsp on another stack
    ucontext = stack(0, 0, 0, 0, 0, *gregs)
    words = stack(TRAMPOLINE) + ucontext
    rule_at = rules({OTHER: LEAF, FUNC.start: LEAF})
    found = unwind_is_busy(thread(OTHER + 4), words, BASE, RangeIndex([FUNC]), [], rule_at,
                           None, frozenset({TRAMPOLINE}), True)
    assert found is not None and found.how == "executing" and found.function == "replaced"


def test_handler_whose_interrupted_frames_cannot_be_read_is_busy():
    words = stack(TRAMPOLINE)             # no ucontext readable after it
    rule_at = rules({OTHER: LEAF})
    found = unwind_is_busy(thread(OTHER + 4), words, BASE, RangeIndex([FUNC]), [], rule_at,
                           None, frozenset({TRAMPOLINE}), True)
    assert found is not None and "signal handler" in found.how


def test_scan_notices_signal_frames():
    candidates, in_handler = scan_stack(stack(1, TRAMPOLINE, 2), BASE, RangeIndex([FUNC]), frozenset({TRAMPOLINE}))
    assert candidates == [] and in_handler


@pytest.mark.parametrize("guarded", [
    GuardedRange(0x40_1000, 0x40, "non-pie"),
    GuardedRange(0x40_1FF0, 0x40, "crosses a byte boundary"),
    GuardedRange(0x7F12_3456_7200, 0x300, "library"),
    GuardedRange(0x5555_5555_0000, 0x1_0000_0000, "huge"),
])
def test_scan_finds_every_inner_word_and_nothing_else(guarded):
    inside = [guarded.start + 1, guarded.start + guarded.size // 2, guarded.start + guarded.size - 1]
    outside = [guarded.start, guarded.start + guarded.size, guarded.start - 1, 0, 0x7FFD_0000_1000]
    words = [w for pair in zip(outside, inside + [0, 0], strict=False) for w in pair]
    data = stack(*words)
    # the same bytes misaligned by 4 must not count
    found = scan_candidates(b"\0\0\0\0" + data + b"\0\0\0\0", BASE, RangeIndex([guarded]))
    assert found == []
    found = scan_candidates(data, BASE, RangeIndex([guarded]))
    assert sorted(BASE + 8 * words.index(w) for w in inside) == [address for address, _ in found]
