"""The system calls apply and unpatch will make in the patient, checked against its seccomp
policy before the first one is made (a filter that kills on ``mmap(PROT_EXEC)`` must
not cost the patient its life: we refuse instead)."""

from __future__ import annotations

from ..process import StoppedProcess
from ..process.seccomp import PlannedSyscall, check_syscalls_allowed

SYS_MMAP, SYS_MPROTECT, SYS_MUNMAP, SYS_RT_SIGRETURN, SYS_GETPID = 9, 10, 11, 15, 39
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
PAGE = 4096
_NO_FD = (1 << 64) - 1


def patch_mapping_calls(address: int, size: int, code_size: int) -> list[PlannedSyscall]:
    """Map a patch read + write, seal its code read + execute, unmap it (rollback, unpatch)."""
    return [
        PlannedSyscall("mmap(PROT_READ|PROT_WRITE)", SYS_MMAP,
                       (address, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                        _NO_FD, 0)),
        PlannedSyscall("mprotect(PROT_READ|PROT_EXEC)", SYS_MPROTECT, (address, code_size, PROT_READ | PROT_EXEC)),
        PlannedSyscall("munmap", SYS_MUNMAP, (address, size)),
    ]


def support_calls() -> list[PlannedSyscall]:
    """The trampoline page of run-until-return (:mod:`.run_to_return`) and its marker
    syscall; ``rt_sigreturn``, which gives a borrowed thread its registers back."""
    return [
        PlannedSyscall("rt_sigreturn", SYS_RT_SIGRETURN, ()),
        PlannedSyscall("mmap(PROT_READ|PROT_EXEC)", SYS_MMAP,
                       (0, PAGE, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, _NO_FD, 0)),
        PlannedSyscall("getpid", SYS_GETPID, ()),
        PlannedSyscall("munmap", SYS_MUNMAP, (0, PAGE)),
    ]


def check_seccomp(stopped: StoppedProcess, calls: list[PlannedSyscall], *, now: bool = True) -> None:
    """SyscallForbidden if the seccomp filter of a thread of the stopped patient would kill it
    or deny one of ``calls``, checked before the thread makes any of them: at once for the
    thread remote work takes, later for any other thread before it is made to (filters are
    per thread; the others are never subject to theirs). ``now`` False: no thread at once,
    each when it is about to make one. See :meth:`StoppedProcess.vet_borrowed_threads`."""
    address = stopped.syscall_address + 2
    stopped.vet_borrowed_threads(lambda tid: check_syscalls_allowed(stopped.pid, [tid], calls, address), now=now)
