"""Is any thread inside code we are about to replace (patch) or remove (unpatch)?

Two passes, with every thread stopped (DESIGN.md section 8):

1. Fast and sound: each thread's used stack (stack pointer to the end of the mapping
   holding it) is read in ONE ``process_vm_readv`` for all threads; a word strictly inside
   ``(start, start + size)`` of a guarded range could be a return address into it, and a
   thread's instruction pointer in ``[start, start + size)`` is inside it. No candidate
   means safe.
2. Precise, only for threads with a candidate word: unwind the stack with the objects'
   CFI (``.eh_frame``); a candidate that is not a frame's return address is a stale word.
   If the unwind cannot get past a frame (no CFI), every candidate deeper than what was
   walked is taken to be live: we never guess in the patient's disfavour.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..process import MappedObject, Mapping, read_ranges_lenient
from .objects import FrameRule

MAX_FRAMES = 512
# DWARF register numbers (x86-64 psABI) and the user_regs_struct fields holding them.
DWARF_REGISTERS = {3: "rbx", 6: "rbp", 7: "rsp", 12: "r12", 13: "r13", 14: "r14", 15: "r15"}
DWARF_RSP = 7
DWARF_RA = 16


@dataclass(frozen=True)
class GuardedRange:
    """Code no thread may be in: ``[start, start + size)``, named for messages."""

    start: int
    size: int
    name: str

    def holds_pc(self, address: int) -> bool:
        return self.start <= address < self.start + self.size

    def holds_return_address(self, address: int) -> bool:
        # A return address never equals a function's first byte, so function pointers
        # stored on the stack are not candidates.
        return self.start < address < self.start + self.size


@dataclass(frozen=True)
class ThreadState:
    """What the check needs of one stopped thread."""

    tid: int
    registers: dict[str, int]      # rip, rsp, rbp, rbx, r12..r15


@dataclass(frozen=True)
class BusyThread:
    """A thread found inside a guarded range."""

    tid: int
    function: str
    address: int
    how: str                       # "executing" | "returns into" | "may return into"

    def describe(self) -> str:
        return f"thread {self.tid} {self.how} {self.function} (at {self.address:#x})"


class RangeIndex:
    """Guarded ranges sorted for bisection."""

    def __init__(self, ranges: list[GuardedRange]) -> None:
        self.ranges = sorted(ranges, key=lambda r: r.start)
        self._starts = [r.start for r in self.ranges]

    def find(self, address: int) -> GuardedRange | None:
        position = bisect.bisect_right(self._starts, address) - 1
        if position >= 0 and self.ranges[position].holds_pc(address):
            return self.ranges[position]
        return None

    def __bool__(self) -> bool:
        return bool(self.ranges)


def stack_ranges(threads: list[ThreadState], mappings: list[Mapping]) -> list[tuple[int, int]]:
    """``(rsp, size)`` of each thread's used stack: up to the end of its mapping."""
    starts = sorted(mappings, key=lambda m: m.start)
    keys = [m.start for m in starts]
    result = []
    for thread in threads:
        rsp = thread.registers["rsp"] & ~7
        position = bisect.bisect_right(keys, rsp) - 1
        if position >= 0 and starts[position].contains(rsp):
            result.append((rsp, starts[position].end - rsp))
        else:
            result.append((rsp, 0))
    return result


def scan_candidates(stack: bytes, base: int, index: RangeIndex) -> list[tuple[int, GuardedRange]]:
    """(address of the word, range) of each stack word strictly inside a guarded range."""
    found = []
    if not index or not stack:
        return found
    low = index.ranges[0].start
    high = max(r.start + r.size for r in index.ranges)
    count = len(stack) // 8
    for position, word in enumerate(struct.unpack_from(f"<{count}Q", stack)):
        if low < word < high:
            guarded = index.find(word)
            if guarded is not None and guarded.holds_return_address(word):
                found.append((base + position * 8, guarded))
    return found


RuleFinder = Callable[[int], tuple[FrameRule | None, bool]]   # pc -> (rule, known object)


@dataclass(frozen=True)
class Frame:
    """One frame of a walk: its pc, whether it is the innermost one, and its CFA."""

    pc: int
    top: bool
    cfa: int | None          # None: the walk could not get past this frame


def walk_frames(thread: ThreadState, stack: bytes, base: int, rule_at: RuleFinder,
                read_word: Callable[[int], int | None] | None = None) -> tuple[list[Frame], bool]:
    """The thread's frames, innermost first, unwound with CFI; and whether the walk
    reached the outermost frame (return address 0 or no caller) rather than stopping
    early. ``stack`` holds the memory from ``base`` up; ``read_word`` reads beyond it."""
    registers = {number: thread.registers[name] for number, name in DWARF_REGISTERS.items()}
    pc = thread.registers["rip"]
    top = True
    frames: list[Frame] = []

    def word_at(address: int) -> int | None:
        offset = address - base
        if 0 <= offset and offset + 8 <= len(stack):
            return struct.unpack_from("<Q", stack, offset)[0]
        return read_word(address) if read_word is not None else None

    for _ in range(MAX_FRAMES):
        rule, _known = rule_at(pc if top else pc - 1)
        if rule is not None and rule.outermost:
            frames.append(Frame(pc, top, None))
            return frames, True          # _start, a thread's clone: nothing called this
        if rule is None or rule.cfa_register is None or rule.cfa_register not in registers:
            frames.append(Frame(pc, top, None))
            return frames, False
        cfa = registers[rule.cfa_register] + rule.cfa_offset
        saved = dict(rule.saved)
        return_address = word_at(cfa + saved[DWARF_RA]) if DWARF_RA in saved else None
        if return_address is None or (frames and frames[-1].cfa is not None and cfa <= frames[-1].cfa):
            frames.append(Frame(pc, top, None))
            return frames, False
        frames.append(Frame(pc, top, cfa))
        for number, offset in saved.items():
            if number in registers:
                value = word_at(cfa + offset)
                if value is not None:
                    registers[number] = value
        registers[DWARF_RSP] = cfa
        if return_address == 0:
            return frames, True
        pc = return_address
        top = False
    return frames, False


def unwind_is_busy(thread: ThreadState, stack: bytes, base: int, index: RangeIndex,
                   candidates: list[tuple[int, GuardedRange]], rule_at: RuleFinder) -> BusyThread | None:
    """Walk the thread's frames with CFI; the busy frame found, or None if none is.

    When the walk stops early, candidate words above the last frame it got past are
    assumed to be live return addresses.
    """
    frames, _complete = walk_frames(thread, stack, base, rule_at)
    walked_to = base
    for frame in frames:
        guarded = index.find(frame.pc if frame.top else frame.pc - 1)
        if guarded is not None:
            return BusyThread(thread.tid, guarded.name, frame.pc, "executing" if frame.top else "returns into")
        if frame.cfa is not None:
            walked_to = frame.cfa
    if _complete:
        return None
    for word_address, guarded in candidates:
        if word_address >= walked_to:
            return BusyThread(thread.tid, guarded.name, word_address, "may return into")
    return None


def make_rule_finder(objects: list[MappedObject], files: dict[int, object]) -> RuleFinder:
    """``pc -> rule`` over the mapped objects (their files parsed and cached by build-id)."""
    ordered = sorted(objects, key=lambda o: o.start)
    starts = [o.start for o in ordered]

    def rule_at(pc: int) -> tuple[FrameRule | None, bool]:
        position = bisect.bisect_right(starts, pc) - 1
        if position < 0:
            return None, False
        mapped = ordered[position]
        if not any(m.contains(pc) and m.executable for m in mapped.mappings):
            return None, False
        parsed = files.get(id(mapped))
        if parsed is None:
            return None, False
        return parsed.frame_rule(pc - mapped.load_bias), True

    return rule_at


def blocked_threads(pid: int) -> list[ThreadState]:
    """Threads blocked in a system call, with the stack and instruction pointers the
    kernel shows in ``/proc/PID/task/TID/syscall`` (no stop needed); others are left out."""
    found = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as stream:
                fields = stream.read().split()
        except OSError:
            continue
        if len(fields) < 3 or fields[0] == "running":
            continue
        registers = dict.fromkeys(DWARF_REGISTERS.values(), 0)
        registers["rsp"], registers["rip"] = int(fields[-2], 16), int(fields[-1], 16)
        found.append(ThreadState(int(tid), registers))
    return found


def warm_unwind_caches(pid: int, mappings: list[Mapping], ranges: list[GuardedRange], rule_at: RuleFinder) -> None:
    """Before stopping: walk the stacks of blocked threads that hold a candidate word, so
    the CFI rules the check will need are decoded already (errors do not matter here)."""
    index = RangeIndex(ranges)
    threads = blocked_threads(pid)
    if not index or not threads:
        return
    spans = stack_ranges(threads, mappings)
    for thread, (base, _), stack in zip(threads, spans, read_ranges_lenient(pid, spans), strict=True):
        if stack and scan_candidates(stack, base, index):
            try:
                walk_frames(thread, stack, base, rule_at)
            except Exception:  # a racing, running thread: only a cache warm-up
                continue


def find_busy_threads(pid: int, threads: list[ThreadState], mappings: list[Mapping],
                      ranges: list[GuardedRange], rule_at: RuleFinder) -> list[BusyThread]:
    """The threads that are inside a guarded range (empty: safe to go on)."""
    index = RangeIndex(ranges)
    if not index:
        return []
    busy: list[BusyThread] = []
    undecided = []
    for thread in threads:
        guarded = index.find(thread.registers["rip"])
        if guarded is not None:
            busy.append(BusyThread(thread.tid, guarded.name, thread.registers["rip"], "executing"))
        else:
            undecided.append(thread)
    if not undecided:
        return busy
    spans = stack_ranges(undecided, mappings)
    stacks = read_ranges_lenient(pid, spans)
    for thread, (base, _), stack in zip(undecided, spans, stacks, strict=True):
        stack = stack or b""
        candidates = scan_candidates(stack, base, index)
        if not candidates:
            continue
        found = unwind_is_busy(thread, stack, base, index, candidates, rule_at)
        if found is not None:
            busy.append(found)
    return busy
