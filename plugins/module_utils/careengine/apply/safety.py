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

Patch code: the code of an applied patch is in an anonymous mapping no object file
describes; its own unwind records (``.kpatch.eh_frame``, read back from the mapping by
:mod:`.patch_frames`) take the walk through its frames to their callers. A patch
without them stops the walk there, and the busy thread's description says so.

Signal handlers: a thread whose stack holds the address of a sigreturn trampoline
(``__restore_rt``) is running a handler, possibly on an alternate signal stack, with the
interrupted frames elsewhere. Such a thread always takes the precise path; the walk
crosses the signal frame through the saved ``ucontext`` and goes on reading whatever
stack the interrupted code used. If that walk stops early, the thread counts as busy.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..process import MappedObject, Mapping, read_ranges_lenient
from .object_files import FrameRule
from .patch_frames import PatchCode

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
    note: str = ""                 # why the walk stopped short, when it did

    def describe(self) -> str:
        where = f"at {self.address:#x}; {self.note}" if self.note else f"at {self.address:#x}"
        return f"thread {self.tid} {self.how} {self.function} ({where})"


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
    return scan_stack(stack, base, index, frozenset())[0]


def scan_stack(stack: bytes, base: int, index: RangeIndex,
               trampolines: frozenset[int]) -> tuple[list[tuple[int, GuardedRange]], bool]:
    """Candidate words (as :func:`scan_candidates`) and whether a sigreturn trampoline
    address is on the stack (a signal handler frame).

    Fast without decoding every word in Python: all addresses of one guarded range share
    their upper bytes, and ``bytes.find`` (C speed) locates the aligned words holding
    them; only those are decoded and checked.
    """
    found: dict[int, GuardedRange] = {}
    if not stack:
        return [], False
    usable = len(stack) - len(stack) % 8
    for guarded in index.ranges:
        for offset in _words_with_prefix(stack, usable, *range_key(guarded)):
            word = struct.unpack_from("<Q", stack, offset)[0]
            if guarded.holds_return_address(word):
                found[base + offset] = guarded
    in_handler = any(_holds_word(stack, usable, address) for address in trampolines)
    return sorted(found.items()), in_handler


KEY_BYTES = 3    # the lowest bytes an address range shares: varied, so bytes.find skips fast


def range_key(guarded: GuardedRange) -> tuple[bytes, int]:
    """(bytes, their offset in a little-endian word) that every address in the range has:
    the lowest few of the bytes its first and last addresses share (the top bytes are
    mostly 0x00 and 0x7f, as on every stack, and would make the search crawl)."""
    first = struct.pack("<Q", guarded.start)
    last = struct.pack("<Q", guarded.start + max(guarded.size, 1) - 1)
    position = 8
    while position > 0 and first[position - 1] == last[position - 1]:
        position -= 1
    key = first[position:].rstrip(b"\0")[:KEY_BYTES]
    return key, position


def _holds_word(stack: bytes, usable: int, value: int) -> bool:
    packed = struct.pack("<Q", value)
    return any(stack[offset:offset + 8] == packed
               for offset in _words_with_prefix(stack, usable, packed[:KEY_BYTES], 0))


def _words_with_prefix(stack: bytes, usable: int, key: bytes, position: int):
    """Offsets of aligned words whose bytes at ``position`` are ``key`` (all words if the
    key is empty)."""
    if not key:
        yield from range(0, usable, 8)
        return
    index = stack.find(key, position, usable)
    while index >= 0:
        if (index - position) % 8 == 0:
            yield index - position
            index = stack.find(key, index + 8, usable)
        else:
            index = stack.find(key, index + 1, usable)


RuleFinder = Callable[[int], tuple[FrameRule | None, bool]]   # pc -> (rule, known object)
# Offsets in the kernel's rt_sigframe, from the stack pointer at __restore_rt (the
# ucontext): uc_flags, uc_link, uc_stack (24 bytes), then uc_mcontext.gregs[].
UCONTEXT_GREGS = 40
GREGS = {"r12": 4, "r13": 5, "r14": 6, "r15": 7, "rbp": 10, "rbx": 11, "rsp": 15, "rip": 16}


@dataclass(frozen=True)
class Frame:
    """One frame of a walk: its pc, whether it is the innermost one, and its CFA."""

    pc: int
    top: bool                # innermost frame or interrupted by a signal: pc is exact
    cfa: int | None          # None: the walk could not get past this frame


@dataclass(frozen=True)
class Walk:
    """The frames of a thread, innermost first."""

    frames: list[Frame]
    complete: bool            # reached the outermost frame (no caller)
    signal_frames: int = 0    # signal frames crossed
    stopped_by: str = ""      # an incomplete walk: why it could not get past its last frame


class _StackWalker:
    """One CFI walk in progress: the registers of the frame in hand, its pc, the frames found so far."""

    def __init__(self, thread: ThreadState, stack: bytes, base: int, rule_at: RuleFinder,
                 read_word: Callable[[int], int | None] | None) -> None:
        self.stack = stack
        self.base = base
        self.rule_at = rule_at
        self.read_word = read_word
        self.registers = {number: thread.registers[name] for number, name in DWARF_REGISTERS.items()}
        self.pc = thread.registers["rip"]
        self.top = True
        self.frames: list[Frame] = []
        self.crossed = 0

    def word_at(self, address: int) -> int | None:
        """The word at ``address``: from the stack copy, else through ``read_word``."""
        offset = address - self.base
        if 0 <= offset and offset + 8 <= len(self.stack):
            return struct.unpack_from("<Q", self.stack, offset)[0]
        return self.read_word(address) if self.read_word is not None else None

    def stop(self, complete: bool, why: str = "") -> Walk:
        """End the walk at the frame in hand (its CFA unknown)."""
        self.frames.append(Frame(self.pc, self.top, None))
        return Walk(self.frames, complete, self.crossed, why)

    def cross_signal_frame(self) -> Walk | None:
        """Returning into __restore_rt: the interrupted context is in the ucontext at the
        stack pointer; go on from its registers. A Walk if it cannot be read."""
        context = self.registers[DWARF_RSP] + UCONTEXT_GREGS
        saved = {name: self.word_at(context + 8 * index) for name, index in GREGS.items()}
        if any(value is None for value in saved.values()):
            return self.stop(False)
        self.frames.append(Frame(self.pc, self.top, self.registers[DWARF_RSP]))
        for number, name in DWARF_REGISTERS.items():
            self.registers[number] = saved[name]
        self.pc = saved["rip"]
        self.top = True
        self.crossed += 1
        return None

    def step_out(self) -> Walk | None:
        """Unwind one ordinary frame with its CFI rule; a Walk when the walk ends here."""
        where = self.pc if self.top else self.pc - 1
        rule, _known = self.rule_at(where)
        if rule is not None and rule.outermost:
            return self.stop(True)     # _start, a thread's clone: nothing called this
        if rule is None:
            return self.stop(False, no_rule_reason(self.rule_at, where))
        if rule.cfa_register is None or rule.cfa_register not in self.registers:
            return self.stop(False, f"the unwind rule at {self.pc:#x} cannot be followed")
        cfa = self.registers[rule.cfa_register] + rule.cfa_offset
        saved_at = dict(rule.saved)
        return_address = self.word_at(cfa + saved_at[DWARF_RA]) if DWARF_RA in saved_at else None
        previous = next((f.cfa for f in reversed(self.frames) if f.cfa is not None), None)
        if return_address is None or (previous is not None and cfa <= previous and not self.crossed):
            return self.stop(False)
        self.frames.append(Frame(self.pc, self.top, cfa))
        self._restore_registers(cfa, saved_at)
        if return_address == 0:
            return Walk(self.frames, True, self.crossed)
        self.pc = return_address
        self.top = False
        return None

    def _restore_registers(self, cfa: int, saved_at: dict[int, int]) -> None:
        """The caller's registers: those the rule saved, and the stack pointer at the CFA."""
        for number, offset in saved_at.items():
            if number in self.registers:
                value = self.word_at(cfa + offset)
                if value is not None:
                    self.registers[number] = value
        self.registers[DWARF_RSP] = cfa


def walk_stack(thread: ThreadState, stack: bytes, base: int, rule_at: RuleFinder,
               read_word: Callable[[int], int | None] | None = None,
               trampolines: frozenset[int] = frozenset()) -> Walk:
    """Unwind the thread with CFI, crossing signal frames. ``stack`` holds the memory
    from ``base`` up; ``read_word`` reads anything else (another stack)."""
    walker = _StackWalker(thread, stack, base, rule_at, read_word)
    for _ in range(MAX_FRAMES):
        walk = walker.cross_signal_frame() if walker.pc in trampolines else walker.step_out()
        if walk is not None:
            return walk
    return Walk(walker.frames, False, walker.crossed)


def walk_frames(thread: ThreadState, stack: bytes, base: int, rule_at: RuleFinder,
                read_word: Callable[[int], int | None] | None = None) -> tuple[list[Frame], bool]:
    """The thread's frames, innermost first, and whether the walk was complete."""
    walk = walk_stack(thread, stack, base, rule_at, read_word)
    return walk.frames, walk.complete


def unwind_is_busy(thread: ThreadState, stack: bytes, base: int, index: RangeIndex,
                   candidates: list[tuple[int, GuardedRange]], rule_at: RuleFinder,
                   read_word: Callable[[int], int | None] | None = None,
                   trampolines: frozenset[int] = frozenset(), in_handler: bool = False) -> BusyThread | None:
    """Walk the thread's frames with CFI; the busy frame found, or None if none is.

    When the walk stops early, candidate words above the last frame it got past are
    assumed to be live return addresses; in a signal handler, the whole thread is.
    """
    walk = walk_stack(thread, stack, base, rule_at, read_word, trampolines)
    note = f"the unwind stopped: {walk.stopped_by}" if walk.stopped_by else ""
    walked_to = base
    for frame in walk.frames:
        guarded = index.find(frame.pc if frame.top else frame.pc - 1)
        if guarded is not None:
            return BusyThread(thread.tid, guarded.name, frame.pc, "executing" if frame.top else "returns into",
                              note if frame.cfa is None else "")
        if frame.cfa is not None and not walk.signal_frames:
            walked_to = frame.cfa
    if walk.complete:
        return None
    if in_handler or walk.signal_frames:
        last = walk.frames[-1].pc if walk.frames else thread.registers["rip"]
        names = ", ".join(sorted({r.name for r in index.ranges}))
        return BusyThread(thread.tid, names, last, "is in a signal handler and may return into", note)
    for word_address, guarded in candidates:
        if word_address >= walked_to:
            return BusyThread(thread.tid, guarded.name, word_address, "may return into", note)
    return None


class FrameRules:
    """``pc -> (rule, known code)`` (a :data:`RuleFinder`) over the mapped objects (their
    files parsed and cached by build-id) and the code of applied patches (their own
    unwind records, :mod:`.patch_frames`)."""

    def __init__(self, objects: list[MappedObject], files: dict[int, object],
                 patches: list[PatchCode] | tuple[PatchCode, ...] = ()) -> None:
        self.objects = sorted(objects, key=lambda o: o.start)
        self._starts = [o.start for o in self.objects]
        self.files = files
        self.patches = sorted(patches, key=lambda p: p.start)
        self._patch_starts = [p.start for p in self.patches]

    def patch_at(self, pc: int) -> PatchCode | None:
        """The applied patch whose code holds ``pc``."""
        position = bisect.bisect_right(self._patch_starts, pc) - 1
        if position >= 0 and self.patches[position].holds(pc):
            return self.patches[position]
        return None

    def object_at(self, pc: int) -> MappedObject | None:
        """The mapped object whose executable mappings hold ``pc``."""
        position = bisect.bisect_right(self._starts, pc) - 1
        if position < 0:
            return None
        mapped = self.objects[position]
        return mapped if any(m.contains(pc) and m.executable for m in mapped.mappings) else None

    def __call__(self, pc: int) -> tuple[FrameRule | None, bool]:
        patch = self.patch_at(pc)
        if patch is not None:
            return patch.frame_rule(pc), True
        mapped = self.object_at(pc)
        parsed = self.files.get(mapped.start) if mapped is not None else None
        if parsed is None:
            return None, False
        return parsed.frame_rule(pc - mapped.load_bias), True

    def missing(self, pc: int) -> str:
        """Why there is no rule at ``pc``, for messages."""
        patch = self.patch_at(pc)
        if patch is not None and patch.frames is None:
            return f"{patch.name} has no unwind records, so a thread there is polled, not run out"
        if patch is not None:
            return f"no unwind record of {patch.name} covers {pc:#x}"
        mapped = self.object_at(pc)
        if mapped is not None:
            return f"no unwind record of {mapped.path} covers {pc:#x}"
        return f"{pc:#x} is in no object known to have unwind records"


def no_rule_reason(rule_at: RuleFinder, pc: int) -> str:
    """Why ``rule_at`` has no rule at ``pc`` (named when it is a :class:`FrameRules`)."""
    if isinstance(rule_at, FrameRules):
        return rule_at.missing(pc)
    return f"no unwind record covers {pc:#x}"


def make_rule_finder(objects: list[MappedObject], files: dict[int, object],
                     patches: list[PatchCode] | tuple[PatchCode, ...] = ()) -> FrameRules:
    """``pc -> rule`` over the mapped objects and the code of the applied ``patches``."""
    return FrameRules(objects, files, patches)


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
                      ranges: list[GuardedRange], rule_at: RuleFinder,
                      trampolines: frozenset[int] = frozenset()) -> list[BusyThread]:
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
    reader = OtherStacks(pid, mappings)
    for thread, (base, _), stack in zip(undecided, spans, stacks, strict=True):
        stack = stack or b""
        candidates, in_handler = scan_stack(stack, base, index, trampolines)
        if not candidates and not in_handler:
            continue
        found = unwind_is_busy(thread, stack, base, index, candidates, rule_at, reader.word, trampolines, in_handler)
        if found is not None:
            busy.append(found)
    return busy


class OtherStacks:
    """Reads words of stacks other than the one scanned (after crossing a signal frame):
    the rest of the mapping holding an address is read once, in one call."""

    def __init__(self, pid: int, mappings: list[Mapping]) -> None:
        self.pid = pid
        self.mappings = sorted(mappings, key=lambda m: m.start)
        self._starts = [m.start for m in self.mappings]
        self.segments: list[tuple[int, bytes]] = []

    def word(self, address: int) -> int | None:
        for base, data in self.segments:
            if base <= address and address + 8 <= base + len(data):
                return struct.unpack_from("<Q", data, address - base)[0]
        position = bisect.bisect_right(self._starts, address) - 1
        if position < 0 or not self.mappings[position].contains(address):
            return None
        start = address & ~7
        data = read_ranges_lenient(self.pid, [(start, self.mappings[position].end - start)])[0]
        if not data:
            return None
        self.segments.append((start, data))
        return struct.unpack_from("<Q", data, address - start)[0] if address + 8 <= start + len(data) else None


@dataclass(frozen=True)
class ExitPoint:
    """Where a busy thread leaves every guarded frame: the stack word holding the return
    address of its outermost frame inside a guarded range, and that address."""

    tid: int
    slot: int
    return_address: int
    function: str


def find_exit_point(pid: int, thread: ThreadState, mappings: list[Mapping], ranges: list[GuardedRange],
                    rule_at: RuleFinder, trampolines: frozenset[int] = frozenset()) -> ExitPoint | None:
    """The exit point of ``thread`` (None: no CFI-proven frame to return from, e.g. a walk
    that stopped inside a guarded function or a frame whose return address is not where
    its CFA says). The outermost guarded frame is chosen, so returning from it leaves all
    of them at once."""
    index = RangeIndex(ranges)
    span = stack_ranges([thread], mappings)[0]
    stack = read_ranges_lenient(pid, [span])[0] or b""
    reader = OtherStacks(pid, mappings)
    walk = walk_stack(thread, stack, span[0], rule_at, reader.word, trampolines)
    outermost = None
    for position, frame in enumerate(walk.frames):
        guarded = index.find(frame.pc if frame.top else frame.pc - 1)
        if guarded is not None:
            outermost = (position, guarded)
    if outermost is None:
        return None
    position, guarded = outermost
    frame = walk.frames[position]
    if frame.cfa is None or position + 1 >= len(walk.frames):
        return None
    caller = walk.frames[position + 1]
    slot = frame.cfa - 8
    offset = slot - span[0]
    word = struct.unpack_from("<Q", stack, offset)[0] if 0 <= offset <= len(stack) - 8 else reader.word(slot)
    if caller.top or word != caller.pc:
        return None
    return ExitPoint(thread.tid, slot, caller.pc, guarded.name)
