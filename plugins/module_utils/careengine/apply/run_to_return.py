"""Run a busy thread until it returns out of the guarded functions, then patch in that stop.

A thread that keeps calling a replaced function is inside it at nearly every look; polling
rarely catches it outside. Instead its outermost return address into the guarded code
(:func:`.safety.find_exit_point`) is redirected, on its stack, to a small trampoline in a
page the engine maps in the patient (read + execute, never written into the program's
code)::

    push %rax ; mov $39, %eax ; syscall ; pop %rax ; jmp *slot(%rip) ; slot: .quad <return address>

Only that thread runs, under ``PTRACE_SYSCALL``, until it enters the trampoline's
``getpid``: it has left every guarded frame. Its registers are then set as if it had
returned straight to its caller (``rax`` from the stack, ``rsp + 8``, ``rip`` = the
original return address, the ``getpid`` skipped), so nothing refers to the trampoline any
more and the patch is written in that same stop.

Crash safety: no ``int3`` exists anywhere. If the engine dies at any moment the thread
returns through the trampoline to where it would have returned anyway (``rax`` kept;
``rcx``/``r11``, which ``syscall`` clobbers, are dead at a return point, and so is the
caller's red zone the ``push`` uses). On a timeout the original return address is put
back (when the slot still holds the trampoline's). The page is unmapped at the end when
no thread can still reach it; a page left behind is harmless.
"""

from __future__ import annotations

import struct
import time

from ..errors import CareError
from ..process import Registers, RemoteSyscallFailed, StoppedProcess
from .safety import ExitPoint

SYS_MMAP, SYS_MUNMAP, SYS_GETPID = 9, 11, 39
PAGE_SIZE = 4096
PROT_READ_EXEC = 0x5
MAP_PRIVATE_ANONYMOUS = 0x22
# push %rax; mov $39,%eax; syscall; pop %rax; jmp *0(%rip)  -- the 8-byte slot follows.
TRAMPOLINE_CODE = bytes.fromhex("50" "b827000000" "0f05" "58" "ff2500000000")
SYSCALL_END = 8                      # offset just after the syscall instruction
ENTRY_SIZE = 32
_U64 = (1 << 64) - 1


def trampoline_entry(return_address: int) -> bytes:
    """One trampoline entry that goes on to ``return_address``."""
    entry = TRAMPOLINE_CODE + struct.pack("<Q", return_address)
    return entry + b"\xcc" * (ENTRY_SIZE - len(entry))


class ReturnRunner:
    """Trampolines of one stop of the patient, and the return addresses redirected to them."""

    def __init__(self, stopped: StoppedProcess) -> None:
        self.stopped = stopped
        self.page: int | None = None
        self.used = 0
        self.pending: dict[int, tuple[int, int]] = {}     # slot -> (trampoline entry, original)
        self.waited_ns = 0
        self.arrivals = 0
        self.unusable = False

    def _entry(self, return_address: int) -> int | None:
        if self.unusable or (self.used + 1) * ENTRY_SIZE > PAGE_SIZE:
            return None
        if self.page is None:
            try:
                self.page = self.stopped.remote_syscall(SYS_MMAP, 0, PAGE_SIZE, PROT_READ_EXEC,
                                                        MAP_PRIVATE_ANONYMOUS, _U64, 0)
            except RemoteSyscallFailed:
                self.unusable = True         # no page (memory limits): the caller polls instead
                return None
        address = self.page + self.used * ENTRY_SIZE
        self.used += 1
        self.stopped.write(address, trampoline_entry(return_address))
        return address

    def run_out(self, point: ExitPoint, deadline: float) -> str:
        """Run thread ``point.tid`` alone until it returns from ``point``; its outcome
        (see :meth:`StoppedProcess.run_thread_to_syscall`); on "arrived" it sits at its
        caller's return address as if it had returned there."""
        if self.stopped.read(point.slot, 8) != struct.pack("<Q", point.return_address):
            return "moved"
        entry = self._entry(point.return_address)
        if entry is None:
            return "full"
        self.stopped.write(point.slot, struct.pack("<Q", entry))
        self.pending[point.slot] = (entry, point.return_address)
        started = time.perf_counter_ns()

        def return_to_caller(regs: Registers) -> None:
            # As if it had returned straight there: the pushed rax back, its stack popped.
            regs.rax = struct.unpack("<Q", self.stopped.read(regs.rsp, 8))[0]
            regs.rsp = (regs.rsp + 8) & _U64
            regs.rip = point.return_address

        try:
            outcome = self.stopped.run_thread_to_syscall(point.tid, entry + SYSCALL_END, SYS_GETPID, deadline,
                                                         return_to_caller)
            if outcome == "timeout" and self._inside_page(point.tid):
                # Caught between its return and the syscall: a few instructions to go.
                outcome = self.stopped.run_thread_to_syscall(point.tid, entry + SYSCALL_END, SYS_GETPID,
                                                             time.monotonic() + 1.0, return_to_caller)
        finally:
            self.waited_ns += time.perf_counter_ns() - started
        if outcome == "arrived":
            del self.pending[point.slot]
            self.arrivals += 1
        elif outcome == "gone":
            del self.pending[point.slot]      # its stack is no longer its own: left as is
        else:
            self._restore(point.slot)
        return outcome

    def _inside_page(self, tid: int) -> bool:
        if self.page is None or tid not in self.stopped.tids:
            return False
        return self.page <= self.stopped.get_regs(tid).rip < self.page + PAGE_SIZE

    def _restore(self, slot: int) -> bool:
        entry, original = self.pending[slot]
        if self.stopped.read(slot, 8) == struct.pack("<Q", entry):
            self.stopped.write(slot, struct.pack("<Q", original))
        del self.pending[slot]
        return True

    def close(self) -> None:
        """Put back every return address still redirected; unmap the page when no
        thread can reach it any more."""
        clean = True
        for slot in list(self.pending):
            try:
                self._restore(slot)
            except CareError:
                clean = False
        if self.page is None:
            return
        try:
            if clean and not any(self._inside_page(tid) for tid in self.stopped.tids):
                self.stopped.remote_syscall(SYS_MUNMAP, self.page, PAGE_SIZE)
                self.page = None
        except CareError:
            pass                             # an unused page is left behind: harmless
