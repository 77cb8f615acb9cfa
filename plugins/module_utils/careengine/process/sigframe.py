"""The x86-64 ``rt_sigreturn`` frame that makes a borrowed thread heal itself (pure bytes).

Before the tracer borrows a thread for a remote syscall or call, it writes below the
thread's red zone the frame the kernel itself would write to deliver a signal: the
thread's own registers, signal mask and FPU/AVX state (``struct rt_sigframe``). The
borrowed stack pointer points at its first word, ``pretcode``, which holds the address
of libc's ``__restore_rt`` (``mov $15,%rax; syscall``). The remote syscall runs at a
``syscall; ret`` pair; a remote call returns into :data:`CALL_RETURN_STUB`. So if the
tracer dies at any instant, the kernel detaches the thread, it finishes our syscall or
call, returns into ``rt_sigreturn`` and gets back exactly the state it had.

Layout (kernel ``arch/x86/include/asm/sigframe.h``, uapi ``sigcontext.h``):
``pretcode`` (8) | ``ucontext`` (304: flags, link, ``stack_t``, ``sigcontext`` (256), mask)
| ``siginfo`` (128) | ... | fpstate, 64-byte aligned: the XSAVE area as
``PTRACE_GETREGSET NT_X86_XSTATE`` gives it (its ``sw_reserved`` bytes carry
``FP_XSTATE_MAGIC1`` and the sizes), followed by ``FP_XSTATE_MAGIC2``.

``rt_sigreturn`` turns off system-call restarting, so a thread borrowed while it was
blocked in a system call gets that call's restarted form in the frame (the syscall
instruction again, with its number); a call restarted through ``restart_syscall``
(``nanosleep`` and the like: the kernel clears its restart block in ``rt_sigreturn``)
would return ``EINTR`` anyway, so the frame says ``EINTR`` directly, as a handled signal
would make it. That is only what the thread sees if the tracer died.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

RED_ZONE = 128
PRETCODE_SIZE = 8
UCONTEXT_SIZE = 304
SIGINFO_SIZE = 128
FRAME_SIZE = PRETCODE_SIZE + UCONTEXT_SIZE + SIGINFO_SIZE
FPSTATE_ALIGN = 64
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
SW_RESERVED_OFFSET = 464            # struct _fpx_sw_bytes inside the 512-byte FXSAVE area
LEGACY_AREA_SIZE = 512
XSAVE_HEADER_SIZE = 64
UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4
# An invalid ss_flags: rt_sigreturn's restore_altstack() fails with EINVAL, which the
# kernel ignores, so the thread's alternate signal stack (unknown to us) stays as it is.
KEEP_ALTSTACK_FLAGS = 3
SYS_RT_SIGRETURN = 15
SYS_RESTART_SYSCALL = 219
EINTR = 4
# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND: "run the call again" when no handler runs.
RESTART_AGAIN = frozenset({-512, -513, -514})
RESTART_BLOCK = -516                # -ERESTART_RESTARTBLOCK: again through restart_syscall
SYSCALL_INSN_SIZE = 2

# Where a remote call returns: keep the result where rt_sigreturn ignores it, then
# rt_sigreturn.  mov %rax,%rdi; mov $15,%eax; syscall
CALL_RETURN_STUB = b"\x48\x89\xc7" + b"\xb8\x0f\x00\x00\x00" + b"\x0f\x05"
CALL_RESULT_REGISTER = "rdi"

# struct sigcontext, in order: 18 64-bit registers, cs/gs/fs/ss, then err, trapno,
# oldmask, cr2, fpstate and 8 reserved words.
_SIGCONTEXT_REGISTERS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx",
                         "rdx", "rax", "rcx", "rsp", "rip", "eflags")
_SIGCONTEXT = struct.Struct("<18Q4H5Q8Q")
_U64 = (1 << 64) - 1


class FrameError(ValueError):
    """The thread's FPU state cannot be put in a signal frame (internal; the tracer reports it)."""


def signed(value: int) -> int:
    """A 64-bit register value as a signed integer."""
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


def in_restartable_syscall(registers: Mapping[str, int]) -> bool:
    """Whether the thread was stopped inside a system call the kernel will restart."""
    return signed(registers["orig_rax"]) >= 0 and (
        signed(registers["rax"]) in RESTART_AGAIN or signed(registers["rax"]) == RESTART_BLOCK)


def resumed_registers(registers: Mapping[str, int]) -> dict[str, int]:
    """The registers to put in the frame: the thread's own, its system call restarted as
    the kernel would restart it with no signal handler (see the module docstring)."""
    resumed = dict(registers)
    if signed(registers["orig_rax"]) < 0:
        return resumed
    result = signed(registers["rax"])
    if result in RESTART_AGAIN:
        resumed["rax"] = registers["orig_rax"]
        resumed["rip"] = (registers["rip"] - SYSCALL_INSN_SIZE) & _U64
    elif result == RESTART_BLOCK:
        resumed["rax"] = -EINTR & _U64
    return resumed


def fpstate_bytes(xstate: bytes) -> bytes:
    """The fpstate of a signal frame from a ``NT_X86_XSTATE`` register set: the XSAVE
    area (standard format) with the software-reserved bytes sigreturn checks
    (``struct _fpx_sw_bytes``: magic, sizes, features) and ``FP_XSTATE_MAGIC2`` after it.

    ptrace leaves XCR0 (the enabled features) in the first software-reserved word; the
    whole register set is one thread's user-visible XSAVE area, so its length is the
    ``xstate_size`` sigreturn wants.
    """
    if len(xstate) < LEGACY_AREA_SIZE + XSAVE_HEADER_SIZE:
        raise FrameError(f"the XSAVE area is {len(xstate)} bytes, too short")
    magic1, extended_size, features, xstate_size = struct.unpack_from("<IIQI", xstate, SW_RESERVED_OFFSET)
    if magic1 == FP_XSTATE_MAGIC1:
        if not LEGACY_AREA_SIZE + XSAVE_HEADER_SIZE <= xstate_size <= len(xstate) or extended_size < xstate_size + 4:
            raise FrameError("the XSAVE area's software-reserved sizes are inconsistent")
    else:
        features = struct.unpack_from("<Q", xstate, SW_RESERVED_OFFSET)[0]
        if not features & 0x3:
            raise FrameError(f"the XSAVE area names no x87/SSE state (XCR0 {features:#x})")
        xstate_size = len(xstate)
    software = struct.pack("<IIQI", FP_XSTATE_MAGIC1, xstate_size + 4, features, xstate_size)
    area = bytearray(xstate[:xstate_size])
    area[SW_RESERVED_OFFSET:LEGACY_AREA_SIZE] = software + bytes(LEGACY_AREA_SIZE - SW_RESERVED_OFFSET - len(software))
    return bytes(area) + struct.pack("<I", FP_XSTATE_MAGIC2)


def frame_address(stack_pointer: int, fpstate_size: int) -> tuple[int, int]:
    """(frame, fpstate) addresses below ``stack_pointer``'s red zone, aligned as the
    kernel aligns a signal frame: fpstate on 64 bytes, frame + 8 on 16 bytes."""
    fpstate = (stack_pointer - RED_ZONE - fpstate_size) & ~(FPSTATE_ALIGN - 1)
    frame = ((fpstate - FRAME_SIZE) & ~0xF) - 8
    return frame, fpstate


def build_frame(registers: Mapping[str, int], sigmask: int, xstate: bytes, pretcode: int) -> tuple[int, bytes]:
    """(address, bytes) of the rt_sigframe that resumes a thread with ``registers``,
    ``sigmask`` and ``xstate``; its first word is ``pretcode``."""
    fpstate = fpstate_bytes(xstate)
    frame, fpstate_address = frame_address(registers["rsp"], len(fpstate))
    resumed = resumed_registers(registers)
    sigcontext = _SIGCONTEXT.pack(
        *(resumed[name] & _U64 for name in _SIGCONTEXT_REGISTERS),
        registers["cs"] & 0xFFFF, 0, 0, registers["ss"] & 0xFFFF,
        0, 0, sigmask & _U64, 0, fpstate_address,
        *([0] * 8))
    ucontext = (struct.pack("<QQ", UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS, 0)
                + struct.pack("<QiiQ", 0, KEEP_ALTSTACK_FLAGS, 0, 0)
                + sigcontext
                + struct.pack("<Q", sigmask & _U64))
    assert len(ucontext) == UCONTEXT_SIZE
    head = struct.pack("<Q", pretcode & _U64) + ucontext + bytes(SIGINFO_SIZE)
    padding = bytes(fpstate_address - frame - len(head))
    return frame, head + padding + fpstate
