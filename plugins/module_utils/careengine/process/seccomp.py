"""What a seccomp filter would do with the engine's own remote system calls.

A patient under ``SECCOMP_MODE_FILTER`` may be killed (SIGSYS) or refused when the
engine makes it call ``mmap``/``mprotect``/``munmap``. Before the first remote syscall,
the filters of every stopped thread are read (``PTRACE_SECCOMP_GET_FILTER``, index 0, 1,
... until ENOENT; needs CAP_SYS_ADMIN) and run, here, over the exact ``struct
seccomp_data`` each planned call will present to the kernel. The most restrictive result
across a thread's filters is what the kernel does (it takes the lowest action, compared
as a signed 32-bit value). ``SECCOMP_MODE_STRICT`` allows only read/write/exit/sigreturn:
refused outright.

The interpreter (:func:`run_filter`) is pure: classic BPF as seccomp accepts it (loads
of the 64-byte ``seccomp_data``, ALU, jumps, scratch memory, returns).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import threading
from dataclasses import dataclass

from ptrace import PtraceError
from ptrace.binding import func as ptrace_func

from ..errors import CareError, PermissionDenied, ProcessError, SyscallForbidden
from .maps import proc_status

PTRACE_SECCOMP_GET_FILTER = 0x420C
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_MODE_DISABLED, SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 0, 1, 2
INSTRUCTION_SIZE = 8                # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
SECCOMP_DATA_SIZE = 64
BPF_MAXINSNS = 4096
_MEMWORDS = 16
_U32 = 0xFFFFFFFF

# Return values (action in the upper 16 bits, data in the lower 16).
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
ACTION_MASK = 0xFFFF0000
DATA_MASK = 0x0000FFFF

# action -> (outcome, what it means for the patient); outcome "allow" lets the call run.
ACTIONS = {
    RET_KILL_PROCESS: ("kill", "kill the process on"),
    RET_KILL_THREAD: ("kill", "kill the thread on"),
    RET_TRAP: ("kill", "send SIGSYS on"),
    RET_ERRNO: ("deny", "deny"),
    RET_USER_NOTIF: ("deny", "hand to a user-space supervisor"),
    RET_TRACE: ("deny", "deny (ENOSYS: no tracer asked for it)"),
    RET_LOG: ("allow", "log and allow"),
    RET_ALLOW: ("allow", "allow"),
}


class FilterError(CareError):
    """A filter program this interpreter cannot run (the kernel would not have accepted it)."""


@dataclass(frozen=True)
class Instruction:
    """One ``struct sock_filter``."""

    code: int
    jt: int
    jf: int
    k: int


@dataclass(frozen=True)
class PlannedSyscall:
    """A system call the engine will make in the patient, as the filter sees it."""

    label: str                 # for messages: "mmap(PROT_READ|PROT_EXEC)"
    nr: int
    args: tuple[int, ...]


def decode_filter(raw: bytes) -> list[Instruction]:
    """The instructions of a filter as the kernel returns it (8 bytes each)."""
    if len(raw) % INSTRUCTION_SIZE:
        raise FilterError(f"a seccomp filter of {len(raw)} bytes is not whole instructions")
    return [Instruction(*fields) for fields in struct.iter_unpack("<HBBI", raw)]


def seccomp_data(nr: int, args: tuple[int, ...], instruction_pointer: int, arch: int = AUDIT_ARCH_X86_64) -> bytes:
    """The ``struct seccomp_data`` the kernel builds for this call."""
    padded = tuple(arg & (1 << 64) - 1 for arg in args) + (0,) * (6 - len(args))
    return struct.pack("<iIQ6Q", nr, arch, instruction_pointer, *padded)


def _alu(op: int, a: int, operand: int) -> int:
    if op in (0x30, 0x90) and operand == 0:
        return -1                          # division by zero: the filter returns 0 (kill)
    results = {
        0x00: lambda: a + operand, 0x10: lambda: a - operand, 0x20: lambda: a * operand,
        0x30: lambda: a // operand, 0x40: lambda: a | operand, 0x50: lambda: a & operand,
        0x60: lambda: a << (operand & 31) if operand < 32 else 0,
        0x70: lambda: a >> operand if operand < 32 else 0,
        0x80: lambda: -a, 0x90: lambda: a % operand, 0xA0: lambda: a ^ operand,
    }
    if op not in results:
        raise FilterError(f"unknown BPF ALU operation {op:#x}")
    return results[op]() & _U32


_JUMPS = {
    0x10: lambda a, b: a == b,
    0x20: lambda a, b: a > b,
    0x30: lambda a, b: a >= b,
    0x40: lambda a, b: bool(a & b),
}


class _Machine:
    """The state of a running filter: accumulator, index register, scratch memory, next instruction."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.a = 0
        self.x = 0
        self.memory = [0] * _MEMWORDS
        self.pc = 0


def _load_value(machine: _Machine, insn: Instruction, kind: int) -> int:
    """The value an LD/LDX instruction loads (only the modes a seccomp filter may use)."""
    mode = insn.code & 0xE0
    if mode == 0x00:
        return insn.k
    if mode == 0x20 and kind == 0x00 and (insn.code & 0x18) == 0x00:
        if insn.k % 4 or insn.k + 4 > len(machine.data):
            raise FilterError(f"the filter loads seccomp_data at offset {insn.k}")
        return struct.unpack_from("<I", machine.data, insn.k)[0]
    if mode == 0x60:
        return machine.memory[insn.k % _MEMWORDS]
    if mode == 0x80:
        return len(machine.data)
    raise FilterError(f"BPF load {insn.code:#x} is not valid in a seccomp filter")


def _step_ld(machine: _Machine, insn: Instruction) -> int | None:
    machine.a = _load_value(machine, insn, 0x00)
    return None


def _step_ldx(machine: _Machine, insn: Instruction) -> int | None:
    machine.x = _load_value(machine, insn, 0x01)
    return None


def _step_st(machine: _Machine, insn: Instruction) -> int | None:
    machine.memory[insn.k % _MEMWORDS] = machine.a
    return None


def _step_stx(machine: _Machine, insn: Instruction) -> int | None:
    machine.memory[insn.k % _MEMWORDS] = machine.x
    return None


def _step_alu(machine: _Machine, insn: Instruction) -> int | None:
    machine.a = _alu(insn.code & 0xF0, machine.a, machine.x if insn.code & 0x08 else insn.k)
    return RET_KILL_THREAD if machine.a < 0 else None


def _step_jmp(machine: _Machine, insn: Instruction) -> int | None:
    op = insn.code & 0xF0
    if op == 0x00:
        machine.pc += insn.k
        return None
    if op not in _JUMPS:
        raise FilterError(f"unknown BPF jump {insn.code:#x}")
    taken = _JUMPS[op](machine.a, machine.x if insn.code & 0x08 else insn.k)
    machine.pc += insn.jt if taken else insn.jf
    return None


def _step_ret(machine: _Machine, insn: Instruction) -> int | None:
    return (machine.a if (insn.code & 0x18) == 0x10 else insn.k) & _U32


def _step_misc(machine: _Machine, insn: Instruction) -> int | None:
    if insn.code & 0xF8 == 0x00:        # TAX
        machine.x = machine.a
    else:                               # TXA
        machine.a = machine.x
    return None


# BPF instruction class (code & 7) -> its step; a step returns the filter's result when it ends the run.
_STEPS = {
    0x00: _step_ld,
    0x01: _step_ldx,
    0x02: _step_st,
    0x03: _step_stx,
    0x04: _step_alu,
    0x05: _step_jmp,
    0x06: _step_ret,
    0x07: _step_misc,
}


def run_filter(program: list[Instruction], data: bytes) -> int:
    """The 32-bit value the filter returns for ``data`` (a ``seccomp_data``)."""
    machine = _Machine(data)
    for _ in range(BPF_MAXINSNS + 1):
        if not 0 <= machine.pc < len(program):
            raise FilterError(f"the filter runs off its end at instruction {machine.pc}")
        insn = program[machine.pc]
        machine.pc += 1
        result = _STEPS[insn.code & 0x07](machine, insn)
        if result is not None:
            return result
    raise FilterError("the filter does not return")


def _signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


def most_restrictive(values: list[int]) -> int:
    """The result the kernel acts on among several filters' results."""
    return min(values, key=lambda value: _signed(value & ACTION_MASK), default=RET_ALLOW)


def describe(value: int) -> tuple[str, str]:
    """(outcome "allow" | "deny" | "kill", words for a message) of a filter's result."""
    action = value & ACTION_MASK
    if action not in ACTIONS:
        action = RET_KILL_PROCESS if _signed(action) < 0 else RET_KILL_THREAD   # the kernel's fallback
    outcome, words = ACTIONS[action]
    if action == RET_ERRNO:
        code = value & DATA_MASK
        words = f"deny ({errno.errorcode.get(code, str(code))})"
    return outcome, words


# ------------------------------------------------------------------------- the live patient
def _status_number(pid: int, tid: int | None, field: str) -> int | None:
    """The number in ``field`` of the status of ``pid`` (thread ``tid``); None when it has none."""
    value = proc_status(pid, tid).get(field, "")
    return int(value) if value.isdigit() else None


def seccomp_mode(pid: int, tid: int) -> int:
    """``Seccomp:`` of the thread's status (0 when the kernel does not say)."""
    mode = _status_number(pid, tid, "Seccomp")
    return SECCOMP_MODE_DISABLED if mode is None else mode


def read_filters(tid: int) -> list[list[Instruction]]:
    """Every filter of the ptrace-stopped thread ``tid``, newest first."""
    filters = []
    for index in range(1024):
        try:
            count = ptrace_func.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
        except PtraceError as exc:
            if exc.errno == errno.ENOENT:
                return filters
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDenied(f"cannot read the seccomp filter of thread {tid}: needs CAP_SYS_ADMIN "
                                       "to check that it allows the engine's system calls") from None
            raise ProcessError(f"cannot read seccomp filter {index} of thread {tid}: {exc}") from None
        buffer = ctypes.create_string_buffer(int(count) * INSTRUCTION_SIZE)
        try:
            ptrace_func.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buffer))
        except PtraceError as exc:
            raise ProcessError(f"cannot read seccomp filter {index} of thread {tid}: {exc}") from None
        filters.append(decode_filter(buffer.raw))
    raise ProcessError(f"thread {tid} has more seccomp filters than the kernel allows")


def verdict(filters: list[list[Instruction]], call: PlannedSyscall, instruction_pointer: int) -> int:
    """What the thread's filters together return for ``call``."""
    data = seccomp_data(call.nr, call.args, instruction_pointer)
    return most_restrictive([run_filter(program, data) for program in filters])


def check_syscalls_allowed(pid: int, tids: list[int], calls: list[PlannedSyscall], instruction_pointer: int) -> None:
    """SyscallForbidden if a filter of any stopped thread would not let ``calls`` run
    (made at ``instruction_pointer``, the address after the ``syscall`` instruction)."""
    for tid in tids:
        mode = seccomp_mode(pid, tid)
        if mode == SECCOMP_MODE_DISABLED:
            continue
        if mode == SECCOMP_MODE_STRICT:
            raise SyscallForbidden(f"process {pid} runs under strict seccomp (thread {tid}): only read, write, "
                                   "exit and sigreturn are allowed, the engine cannot map a patch")
        if seccomp_mode(os.getpid(), threading.get_native_id()) != SECCOMP_MODE_DISABLED:
            # The kernel shows no filter to a tracer that is itself under seccomp (a container).
            check_inherited_filters(pid, tid, calls)
            continue
        filters = read_filters(tid)
        for call in calls:
            outcome, words = describe(verdict(filters, call, instruction_pointer))
            if outcome != "allow":
                raise SyscallForbidden(f"the seccomp filter of process {pid} (thread {tid}) would {words} "
                                       f"{call.label}, which the engine needs; not patched")



# ------------------------------------------------- a tracer that is itself under seccomp
# PTRACE_SECCOMP_GET_FILTER fails with EACCES for a tracer under seccomp, whatever its
# capabilities: inside a container (podman's or docker's default profile) no filter can be
# read. Filters are inherited and can only be added, so a patient with exactly as many
# filters as the engine, in the engine's PID namespace, runs the filters the container gave
# both; a child of the engine then makes the same calls under them. rt_sigreturn cannot be
# tried that way (it would restore a garbage frame); it is only made if the engine dies.

def filter_count(pid: int, tid: int | None = None) -> int | None:
    """``Seccomp_filters:`` of a thread's status (None when the kernel does not say)."""
    return _status_number(pid, tid, "Seccomp_filters")


def _same_pid_namespace(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def _denied_errno(value: int) -> bool:
    return value in (errno.EPERM, errno.EACCES, errno.ENOSYS)


def try_calls_in_child(calls: list[PlannedSyscall]) -> str | None:
    """Make ``calls`` (but rt_sigreturn) in a forked child of the engine, under the
    engine's own filters; None if all ran, else what happened to the first that did not."""
    tried = [call for call in calls if call.nr != 15]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child only
        code = 0
        try:
            for index, call in enumerate(tried):
                ctypes.set_errno(0)
                result = libc.syscall(ctypes.c_long(call.nr), *(ctypes.c_ulong(arg & (1 << 64) - 1)
                                                                  for arg in call.args))
                if result == -1 and _denied_errno(ctypes.get_errno()):
                    code = 10 + index
                    break
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        try:
            name = signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            name = f"signal {os.WTERMSIG(status)}"
        return f"kill a process with {name} on one of {', '.join(call.label for call in tried)}"
    code = os.WEXITSTATUS(status)
    if code >= 10 and code - 10 < len(tried):
        return f"deny {tried[code - 10].label}"
    if code:
        return f"stop a test process (exit status {code})"
    return None


def check_inherited_filters(pid: int, tid: int, calls: list[PlannedSyscall]) -> None:
    """SyscallForbidden unless thread ``tid`` (whose filters the engine, under seccomp
    itself, cannot read) runs exactly the engine's inherited filters and those let ``calls`` run."""
    theirs, ours = filter_count(pid, tid), filter_count(os.getpid())
    if theirs is None or ours is None or theirs != ours or not _same_pid_namespace(pid):
        raise SyscallForbidden(
            f"cannot read the seccomp filter of process {pid} (thread {tid}: {theirs} filter(s)): the engine "
            f"runs under seccomp itself ({ours} filter(s)) and the kernel hides filters from such a tracer; "
            "run the engine without a seccomp filter of its own (outside a container's profile or a "
            "systemd unit's SystemCallFilter) to patch this process")
    outcome = try_calls_in_child(calls)
    if outcome is not None:
        raise SyscallForbidden(f"the seccomp filter that process {pid} shares with the engine would {outcome}, "
                               "which the engine needs; not patched")
