"""The rt_sigreturn frame a borrowed thread carries (pure bytes, no process)."""

from __future__ import annotations

import struct

import pytest

from plugins.module_utils.careengine.process import sigframe

U64 = (1 << 64) - 1
NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
         "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")


def registers(**changes: int) -> dict[str, int]:
    values = {name: 0x1000 + index for index, name in enumerate(NAMES)}
    values.update(rsp=0x7FFF_0000_1008, cs=0x33, ss=0x2B, eflags=0x246, orig_rax=U64)
    values.update(changes)
    return values


def xstate(size: int = 2432, xcr0: int = 0xE7) -> bytes:
    area = bytearray(size)
    struct.pack_into("<Q", area, sigframe.SW_RESERVED_OFFSET, xcr0)     # what ptrace leaves there
    area[512:520] = struct.pack("<Q", 0x7)                               # xstate_bv
    return bytes(area)


def sigcontext_of(frame: bytes) -> dict[str, int]:
    values = struct.unpack_from("<18Q4H5Q", frame, 8 + 40)
    names = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx", "rdx", "rax", "rcx",
             "rsp", "rip", "eflags", "cs", "gs", "fs", "ss", "err", "trapno", "oldmask", "cr2", "fpstate")
    return dict(zip(names, values, strict=True))


def test_frame_holds_registers_mask_and_pretcode_where_the_kernel_reads_them():
    regs = registers()
    address, frame = sigframe.build_frame(regs, 0x4001, xstate(), pretcode=0x7F00_DEAD_BEEF)
    assert (address + 8) % 16 == 0 and address + sigframe.FRAME_SIZE < regs["rsp"] - sigframe.RED_ZONE
    assert struct.unpack_from("<Q", frame, 0)[0] == 0x7F00_DEAD_BEEF
    flags, link, ss_sp, ss_flags = struct.unpack_from("<QQQi", frame, 8)
    assert flags == 7 and link == 0 and ss_sp == 0 and ss_flags == sigframe.KEEP_ALTSTACK_FLAGS
    context = sigcontext_of(frame)
    for name in ("r8", "r15", "rdi", "rbp", "rax", "rsp", "rip", "eflags"):
        assert context[name] == regs[name], name
    assert (context["cs"], context["ss"]) == (0x33, 0x2B)
    assert struct.unpack_from("<Q", frame, 8 + 296)[0] == 0x4001               # uc_sigmask
    fpstate = context["fpstate"]
    assert fpstate % 64 == 0 and fpstate + 2432 + 4 <= regs["rsp"] - sigframe.RED_ZONE
    offset = fpstate - address
    magic1, extended, features, size = struct.unpack_from("<IIQI", frame, offset + sigframe.SW_RESERVED_OFFSET)
    assert (magic1, extended, features, size) == (sigframe.FP_XSTATE_MAGIC1, 2436, 0xE7, 2432)
    assert struct.unpack_from("<I", frame, offset + 2432)[0] == sigframe.FP_XSTATE_MAGIC2
    assert len(frame) == offset + 2436


@pytest.mark.parametrize(("rax", "rip_back", "resumed_rax"), [
    (-512 & U64, 2, 0),          # -ERESTARTSYS: the read again
    (-513 & U64, 2, 0),          # -ERESTARTNOINTR
    (-514 & U64, 2, 0),          # -ERESTARTNOHAND
    (-516 & U64, 0, -4 & U64),   # -ERESTART_RESTARTBLOCK: EINTR (sigreturn clears the restart block)
    (5, 0, 5),                   # a finished call: as it is
])
def test_a_thread_stopped_in_a_system_call_gets_its_restarted_form(rax, rip_back, resumed_rax):
    regs = registers(orig_rax=0, rax=rax, rip=0x5000)
    context = sigcontext_of(sigframe.build_frame(regs, 0, xstate(), 0)[1])
    assert context["rip"] == 0x5000 - rip_back
    assert context["rax"] == resumed_rax
    assert sigframe.in_restartable_syscall(regs) == (rax != 5)


def test_not_in_a_system_call_nothing_is_restarted():
    regs = registers(orig_rax=U64, rax=-512 & U64, rip=0x5000)
    context = sigcontext_of(sigframe.build_frame(regs, 0, xstate(), 0)[1])
    assert (context["rip"], context["rax"]) == (0x5000, -512 & U64)


@pytest.mark.parametrize("area", [b"\0" * 100, xstate(xcr0=0)])
def test_an_unusable_xsave_area_is_refused(area):
    with pytest.raises(sigframe.FrameError):
        sigframe.build_frame(registers(), 0, area, 0)


def test_call_return_stub_keeps_the_result_in_rdi_and_calls_rt_sigreturn():
    # mov %rax,%rdi; mov $15,%eax; syscall
    assert sigframe.CALL_RETURN_STUB == bytes.fromhex("4889c7" "b80f000000" "0f05")
    assert sigframe.CALL_RESULT_REGISTER == "rdi"
