"""One caught process, from the permission event to the moment it may be patched.

Why a syscall stop, and not a breakpoint at the entry point: a breakpoint (``int3``, or a
debug register) left behind by a service that dies kills the new process with SIGTRAP.
Syscall stops leave nothing behind: if the service dies at any instant, the kernel detaches
the process and it runs on, unpatched (the next service start patches it late).

The stop we wait for is the exit of the dynamic loader's ``mprotect(..., PROT_READ)`` of
the caught object's ``PT_GNU_RELRO`` segment: the loader makes RELRO read-only right after
it relocated that object, and it relocates the executable last, after every library it
needs. So at that stop every library is mapped and relocated, and none of the program's own
code (constructors, ``_start``, ``main``) has run. For a library loaded by ``dlopen`` the
same stop comes before ``dlopen`` runs the library's constructors and returns. A statically
linked program has no loader: it is patched at the exec stop itself.

The thread is told apart from the loader's other syscalls by the registers at the syscall
exit (``orig_rax`` mprotect, ``rdx`` PROT_READ, ``rax`` 0) and by the address lying in a
mapping of the caught file. An object without RELRO, a process that never gets there
(an open that was not the loader's), a job-control stop: the process is let go and
patched late.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from dataclasses import dataclass, field

from ptrace import PtraceError
from ptrace.binding import func as ptrace_func

from ..errors import CareError
from ..process import Registers, proc_status, read_maps

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEEXEC = 0x10
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128
SYSCALL_STOP = signal.SIGTRAP | 0x80
SYS_MPROTECT = 10
PROT_READ = 0x1
MAX_SYSCALL_STOPS = 20000        # the loader of a large program makes a few hundred
CATCH_TIMEOUT = 5.0
_GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})

CONTINUE = "continue"            # resumed; wait for its next stop
READY = "ready"                  # held at a stop: patch it now
RELEASE = "release"              # let it go (detach), to be patched late
GONE = "gone"                    # it exited


@dataclass(frozen=True)
class Target:
    """A file the store has a patch for, as the service watches it."""

    path: str
    build_id: str
    inode: int
    has_interp: bool
    has_relro: bool


@dataclass
class Catch:
    """A thread seized at a permission event on ``target``; ``via_exec`` for an exec."""

    tid: int
    target: Target
    via_exec: bool
    pid: int = 0                 # the process (thread group); after an exec the caught thread leads it
    started: float = field(default_factory=time.monotonic)
    in_syscall: bool = False
    syscall_stops: int = 0
    reason: str = ""             # why it was released

    def __post_init__(self) -> None:
        if not self.pid:
            self.pid = thread_group(self.tid)

    def expired(self) -> bool:
        return time.monotonic() - self.started > CATCH_TIMEOUT


def thread_group(tid: int) -> int:
    """The process id of thread ``tid`` (itself if it cannot be read)."""
    tgid = proc_status(tid).get("Tgid", "")
    return int(tgid) if tgid.isdigit() else tid


def seize(tid: int, via_exec: bool) -> None:
    """Trace ``tid`` (blocked in the kernel by the permission event), without stopping it."""
    options = PTRACE_O_TRACESYSGOOD | (PTRACE_O_TRACEEXEC if via_exec else 0)
    ptrace_func.ptrace(PTRACE_SEIZE, tid, 0, options)
    if not via_exec:
        # Stop it as its open returns: from there on, every syscall stops it.
        ptrace_func.ptrace(PTRACE_INTERRUPT, tid)


def resume_syscalls(tid: int, signo: int = 0) -> None:
    """Run ``tid`` to its next syscall entry or exit."""
    ptrace_func.ptrace(ptrace_func.PTRACE_SYSCALL, tid, 0, signo)


def release(tid: int, signo: int = 0) -> None:
    """Detach from ``tid``; it runs on. A thread that is running (not stopped) is
    interrupted first; one that is gone is fine."""
    try:
        ptrace_func.ptrace_detach(tid, signo)
        return
    except PtraceError as exc:
        if getattr(exc, "errno", None) not in (errno.ESRCH, None):
            raise
    try:
        ptrace_func.ptrace(PTRACE_INTERRUPT, tid)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            waited, status = os.waitpid(tid, os.WNOHANG | 0x40000000)
            if waited:
                if os.WIFSTOPPED(status):
                    ptrace_func.ptrace_detach(tid, 0)
                return
            time.sleep(0.001)
    except (PtraceError, ChildProcessError):
        return


def registers(tid: int) -> Registers:
    """The general registers of stopped thread ``tid``."""
    regs = Registers()
    ptrace_func.ptrace(ptrace_func.PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def step(catch: Catch, status: int) -> str:
    """Handle one wait ``status`` of the caught thread; what to do next (see the constants).

    Resumes the thread itself when the answer is :data:`CONTINUE`.
    """
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        return GONE
    if not os.WIFSTOPPED(status):
        return CONTINUE
    signo = os.WSTOPSIG(status)
    event = status >> 16
    if catch.expired() or catch.syscall_stops > MAX_SYSCALL_STOPS:
        catch.reason = "the loader did not reach the object's RELRO in time"
        return RELEASE
    if event == PTRACE_EVENT_EXEC:
        return _at_exec(catch)
    if event == PTRACE_EVENT_STOP:
        return _at_interrupt(catch, signo)
    if event:
        resume_syscalls(catch.tid)
        return CONTINUE
    if signo != SYSCALL_STOP:
        resume_syscalls(catch.tid, signo)         # a signal: deliver it as it came
        return CONTINUE
    return _at_syscall_stop(catch)


def _at_exec(catch: Catch) -> str:
    """The exec event (from inside execve): a static target is ready; else follow its syscalls."""
    if not catch.target.has_interp:
        return READY                          # static: nothing runs before its entry point
    if not catch.target.has_relro:
        catch.reason = "no PT_GNU_RELRO segment to know when relocation ends"
        return RELEASE
    catch.in_syscall = True                   # the exec event comes from inside execve
    resume_syscalls(catch.tid)
    return CONTINUE


def _at_interrupt(catch: Catch, signo: int) -> str:
    """A PTRACE_EVENT_STOP: a job-control stop releases the thread; our interrupt (as its
    open returns) starts following its syscalls."""
    if signo in _GROUP_STOP_SIGNALS:
        catch.reason = "job-control stop"
        return RELEASE
    if not catch.target.has_relro:
        catch.reason = "no PT_GNU_RELRO segment to know when relocation ends"
        return RELEASE
    catch.in_syscall = False
    resume_syscalls(catch.tid)
    return CONTINUE


def _at_syscall_stop(catch: Catch) -> str:
    """A syscall entry or exit: ready once an exit shows the target's RELRO sealed."""
    catch.syscall_stops += 1
    leaving = catch.in_syscall
    catch.in_syscall = not catch.in_syscall
    if leaving and _relro_sealed(catch):
        return READY
    resume_syscalls(catch.tid)
    return CONTINUE


def _relro_sealed(catch: Catch) -> bool:
    """At a syscall exit: was it ``mprotect(addr, len, PROT_READ) = 0`` inside the target?"""
    regs = registers(catch.tid)
    if regs.orig_rax != SYS_MPROTECT or regs.rdx != PROT_READ or regs.rax != 0:
        return False
    try:
        mappings = read_maps(catch.pid)
    except CareError:
        return False
    for mapping in mappings:
        if mapping.contains(regs.rdi):
            return mapping.inode == catch.target.inode or mapping.clean_path == catch.target.path
    return False
