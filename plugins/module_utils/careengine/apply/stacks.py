"""Suspended stacks: the stacks of a process that no thread runs on right now.

Only for a process that can switch stacks (:mod:`.coroutines`). The threads' own stacks
are checked by :func:`.safety.find_busy_threads`; here every other writable byte of the
process is accounted for:

1. Fast and sound: every writable mapping (heap, anonymous, data) except the stack
   mappings threads run on is searched for words strictly inside a guarded range (the
   same bulk search as the thread check). No such word anywhere: no suspended stack can
   return into guarded code, whatever the scheme. Done.
2. Otherwise, suspended ``ucontext_t`` structures are looked for (glibc's
   ``getcontext``/``swapcontext`` point ``uc_mcontext.fpregs`` at the structure's own
   ``__fpregs_mem``: a word equal to its own address + 200; the saved ``%rip`` must be in
   executable memory and the saved ``%rsp`` in writable memory). Each one's stack is
   walked with the CFI unwinder from its saved registers: a frame in guarded code makes
   the process busy.
3. Every candidate word must then be explained: inside a context structure, within the
   span a complete walk covered (not a frame, so stale), or below the lowest stack
   pointer of a stack-like mapping (``[stack]``, or an anonymous mapping with a guard
   page under it), which is dead. A word left unexplained may be a return address on a
   stack we could not find: the process is refused with that reason.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from ..process import Mapping, read_ranges_lenient
from .coroutines import StackSwitching
from .safety import (
    GREGS,
    GuardedRange,
    OtherStacks,
    RangeIndex,
    RuleFinder,
    ThreadState,
    _words_with_prefix,
    scan_candidates,
    walk_stack,
)

# struct ucontext_t (glibc, x86-64): uc_mcontext.gregs at 40, .fpregs at 224, __fpregs_mem at 424.
UCONTEXT_GREGS = 40
UCONTEXT_FPREGS = 224
UCONTEXT_FPREGS_MEM = 424
UCONTEXT_SIZE = 968
MAX_SCAN_BYTES = 1 << 30
PIECE_SIZE = 32 << 20
_SPECIAL = ("[vvar]", "[vvar_vclock]", "[vsyscall]", "[vdso]")


@dataclass(frozen=True)
class StackDoubt:
    """Why a suspended stack may be inside guarded code: ``proven`` when a walk found the
    frame, else a word no found stack accounts for (``--force-unsafe`` may override)."""

    reason: str
    proven: bool


@dataclass(frozen=True)
class SuspendedContext:
    """A saved register set (``ucontext_t``) found in the patient's memory."""

    address: int
    registers: dict[str, int]      # rip, rsp, rbp, rbx, r12..r15


def writable_mappings(mappings: list[Mapping]) -> list[Mapping]:
    """Mappings that can hold a stack or a saved context."""
    return [m for m in mappings if m.readable and m.writable and m.path not in _SPECIAL]


def is_stack_like(mapping: Mapping, mappings: list[Mapping]) -> bool:
    """``[stack]``, or an anonymous mapping right above a no-access guard page (how
    pthreads and coroutine libraries allocate stacks)."""
    if mapping.path == "[stack]":
        return True
    if mapping.is_file or mapping.path:
        return False
    return any(m.end == mapping.start and m.perms.startswith("---") for m in mappings)


class _Containing:
    def __init__(self, mappings: list[Mapping]) -> None:
        self.mappings = sorted(mappings, key=lambda m: m.start)
        self.starts = [m.start for m in self.mappings]

    def __call__(self, address: int) -> Mapping | None:
        position = bisect.bisect_right(self.starts, address) - 1
        if position >= 0 and self.mappings[position].contains(address):
            return self.mappings[position]
        return None


def find_contexts(regions: list[tuple[int, bytes]], executable: list[Mapping],
                  writable: list[Mapping]) -> list[SuspendedContext]:
    """The ``ucontext_t`` structures saved by getcontext/swapcontext in ``regions``."""
    in_code = _Containing(executable)
    in_data = _Containing(writable)
    found: dict[int, SuspendedContext] = {}
    delta = UCONTEXT_FPREGS_MEM - UCONTEXT_FPREGS
    for base, data in regions:
        usable = len(data) - len(data) % 8
        # A word equal to its own address + delta shares bytes 3..5 with the addresses of
        # its 16 MiB window (and the next one, at a window's end): find those first.
        windows = {(base + offset) >> 24 for offset in (0, usable)} | {((base + usable) >> 24) + 1}
        window_keys = {struct.pack("<Q", window << 24)[3:6] for window in windows}
        for key in window_keys:
            for offset in _words_with_prefix(data, usable, key, 3):
                word_address = base + offset
                if struct.unpack_from("<Q", data, offset)[0] != word_address + delta:
                    continue
                start = word_address - UCONTEXT_FPREGS
                gregs = start - base + UCONTEXT_GREGS
                if gregs < 0 or gregs + 8 * 17 > len(data):
                    continue
                registers = {name: struct.unpack_from("<Q", data, gregs + 8 * index)[0]
                             for name, index in GREGS.items()}
                if in_code(registers["rip"]) is None or in_data(registers["rsp"]) is None:
                    continue
                found[start] = SuspendedContext(start, registers)
    return sorted(found.values(), key=lambda c: c.address)


def read_in_pieces(pid: int, spans: list[tuple[int, int]]):
    """``(base, bytes)`` of ``spans`` read at most :data:`PIECE_SIZE` at a time (memory stays
    bounded); consecutive pieces of a span overlap by a ``ucontext_t`` so none is cut."""
    pieces = []
    for start, size in spans:
        for offset in range(0, size, PIECE_SIZE):
            pieces.append((start + offset, min(PIECE_SIZE + UCONTEXT_SIZE, size - offset)))
    batch: list[tuple[int, int]] = []
    for piece in [*pieces, None]:
        if piece is not None and (not batch or sum(size for _, size in batch) + piece[1] <= PIECE_SIZE * 2):
            batch.append(piece)
            continue
        for (base, _), data in zip(batch, read_ranges_lenient(pid, batch), strict=True):
            if data:
                yield base, data
        batch = [piece] if piece is not None else []


def find_busy_suspended(pid: int, threads: list[ThreadState], mappings: list[Mapping], ranges: list[GuardedRange],
                        rule_at: RuleFinder, switching: StackSwitching,
                        trampolines: frozenset[int] = frozenset()) -> StackDoubt | None:
    """Why a suspended stack may be inside ``ranges`` (None: none can be)."""
    index = RangeIndex(ranges)
    if not index or not switching:
        return None
    writable = writable_mappings(mappings)
    containing = _Containing(writable)
    running = _running_stacks(threads, containing)
    own_stacks = {m for m in running if is_stack_like(m, mappings)}
    scanned = [m for m in writable if m not in own_stacks]
    if sum(m.size for m in scanned) > MAX_SCAN_BYTES:
        return StackDoubt(f"it can switch stacks ({switching.describe()}) and has more than "
                          f"{MAX_SCAN_BYTES >> 20} MiB of writable memory to search for suspended stacks", False)
    spans = [(m.start, m.size) for m in scanned]
    candidates = sorted({found for base, data in read_in_pieces(pid, spans)
                         for found in scan_candidates(data, base, index)})
    if not candidates:
        return None
    spans += [(rsp, m.end - rsp) for m, rsp in running.items() if m in own_stacks]
    executable = [m for m in mappings if m.executable]
    contexts = sorted({context.address: context for base, data in read_in_pieces(pid, spans)
                       for context in find_contexts([(base, data)], executable, writable)}.values(),
                      key=lambda c: c.address)
    search = _SuspendedSearch(pid, mappings, index, rule_at, trampolines)
    for context in contexts:
        holder = containing(context.registers["rsp"])
        if holder is None or holder in own_stacks:
            continue                             # a stale context of a stack a thread runs on now
        doubt = search.check_context(context, holder)
        if doubt is not None:
            return doubt
    return search.unexplained(candidates, containing, switching)


def _running_stacks(threads: list[ThreadState], containing: _Containing) -> dict[Mapping, int]:
    """Each mapping a thread's stack pointer is in -> the lowest such stack pointer."""
    running: dict[Mapping, int] = {}
    for thread in threads:
        holder = containing(thread.registers["rsp"])
        if holder is not None:
            running[holder] = min(running.get(holder, holder.end), thread.registers["rsp"])
    return running


class _SuspendedSearch:
    """The suspended contexts checked so far and the memory they account for."""

    def __init__(self, pid: int, mappings: list[Mapping], index: RangeIndex, rule_at: RuleFinder,
                 trampolines: frozenset[int]) -> None:
        self.pid = pid
        self.mappings = mappings
        self.index = index
        self.rule_at = rule_at
        self.trampolines = trampolines
        self.reader = OtherStacks(pid, mappings)
        self.explained: list[tuple[int, int]] = []   # [start, end) spans of memory accounted for
        self.lowest: dict[Mapping, int] = {}

    def check_context(self, context: SuspendedContext, holder: Mapping) -> StackDoubt | None:
        """Whether the suspended ``context`` (on ``holder``) resumes or returns into a guarded range."""
        rsp = context.registers["rsp"]
        self.explained.append((context.address, context.address + UCONTEXT_SIZE))
        self.lowest[holder] = min(self.lowest.get(holder, holder.end), rsp)
        rip = context.registers["rip"]
        guarded = self.index.find(rip) or self.index.find(rip - 1)
        if guarded is not None:
            return StackDoubt(f"a suspended context (ucontext at {context.address:#x}) resumes inside {guarded.name}",
                              True)
        stack = read_ranges_lenient(self.pid, [(rsp, holder.end - rsp)])[0]
        walk = walk_stack(ThreadState(0, context.registers), stack or b"", rsp, self.rule_at,
                          self.reader.word, self.trampolines)
        for frame in walk.frames[1:]:
            guarded = self.index.find(frame.pc if frame.top else frame.pc - 1)
            if guarded is not None:
                return StackDoubt(f"a suspended stack (ucontext at {context.address:#x}) returns into "
                                  f"{guarded.name} (at {frame.pc:#x})", True)
        reached = max((f.cfa for f in walk.frames if f.cfa is not None), default=rsp)
        end = holder.end if walk.complete and is_stack_like(holder, self.mappings) else reached + 8
        self.explained.append((rsp, end))
        return None

    def unexplained(self, candidates: list[tuple[int, GuardedRange]], containing: _Containing,
                    switching: StackSwitching) -> StackDoubt | None:
        """A candidate return address that no found stack accounts for, as a doubt (None: none)."""
        explained = list(self.explained)
        for holder, rsp in self.lowest.items():
            if is_stack_like(holder, self.mappings):
                explained.append((holder.start, rsp))
        for word_address, guarded in candidates:
            if not any(start <= word_address < end for start, end in explained):
                holder = containing(word_address)
                where = (holder.path or "anonymous memory") if holder is not None else "memory"
                return StackDoubt(f"it can switch stacks ({switching.describe()}) and {word_address:#x} ({where}) "
                                  f"holds what may be a return address into {guarded.name} on a stack that could "
                                  "not be found", False)
        return None
