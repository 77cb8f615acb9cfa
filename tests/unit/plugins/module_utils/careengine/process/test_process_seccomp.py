"""The classic-BPF interpreter over seccomp_data, on hand-assembled filters (the encodings
of <linux/filter.h> and <linux/seccomp.h>, as libseccomp and hand-written filters emit them)."""

from __future__ import annotations

import struct

import pytest

from plugins.module_utils.careengine.process import seccomp
from plugins.module_utils.careengine.process.seccomp import (
    AUDIT_ARCH_X86_64,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    RET_KILL_THREAD,
    RET_LOG,
    RET_TRAP,
    FilterError,
    Instruction,
    PlannedSyscall,
)

# Opcodes.
LD_W_ABS = 0x20
LD_IMM = 0x00
LDX_IMM = 0x01
LD_MEM = 0x60
ST = 0x02
JEQ_K = 0x15
JGE_K = 0x35
JSET_K = 0x45
JA = 0x05
JEQ_X = 0x1D
AND_K = 0x54
ADD_X = 0x0C
DIV_X = 0x3C
RET_K = 0x06
RET_A = 0x16
TAX = 0x07
TXA = 0x87
# seccomp_data offsets.
NR, ARCH, ARG2_LOW, ARG2_HIGH = 0, 4, 16 + 2 * 8, 16 + 2 * 8 + 4
MMAP, MPROTECT, MUNMAP, GETPID = 9, 10, 11, 39
PROT_EXEC = 4


def insn(code, k=0, jt=0, jf=0) -> Instruction:
    return Instruction(code, jt, jf, k)


def arch_check(mismatch=RET_KILL_PROCESS) -> list[Instruction]:
    return [insn(LD_W_ABS, ARCH), insn(JEQ_K, AUDIT_ARCH_X86_64, 1, 0), insn(RET_K, mismatch)]


def exec_mapping_filter(action: int) -> list[Instruction]:
    """``action`` for mmap/mprotect whose prot has PROT_EXEC, else allow."""
    return arch_check() + [
        insn(LD_W_ABS, NR),
        insn(JEQ_K, MMAP, 1, 0),
        insn(JEQ_K, MPROTECT, 0, 3),
        insn(LD_W_ABS, ARG2_LOW),
        insn(JSET_K, PROT_EXEC, 0, 1),
        insn(RET_K, action),
        insn(RET_K, RET_ALLOW),
    ]


def allow_list(numbers: list[int], otherwise: int = RET_KILL_PROCESS) -> list[Instruction]:
    program = arch_check() + [insn(LD_W_ABS, NR)]
    for position, number in enumerate(numbers):
        program.append(insn(JEQ_K, number, len(numbers) - position, 0))
    return program + [insn(RET_K, otherwise), insn(RET_K, RET_ALLOW)]


def run(program, nr, *args, ip=0x7F0000001234, arch=AUDIT_ARCH_X86_64) -> int:
    return seccomp.run_filter(program, seccomp.seccomp_data(nr, args, ip, arch))


MMAP_EXEC = (0, 4096, 5, 0x22, -1, 0)
MMAP_DATA = (0, 4096, 3, 0x22, -1, 0)


@pytest.mark.parametrize(("action", "call", "expected"), [
    (RET_KILL_PROCESS, (MMAP, *MMAP_EXEC), RET_KILL_PROCESS),
    (RET_KILL_PROCESS, (MMAP, *MMAP_DATA), RET_ALLOW),
    (RET_ERRNO | 1, (MPROTECT, 0x1000, 4096, 5), RET_ERRNO | 1),
    (RET_ERRNO | 1, (MPROTECT, 0x1000, 4096, 3), RET_ALLOW),
    (RET_TRAP, (MUNMAP, 0x1000, 4096), RET_ALLOW),
    (RET_TRAP, (GETPID,), RET_ALLOW),
])
def test_exec_mapping_filter(action, call, expected):
    assert run(exec_mapping_filter(action), *call) == expected


def test_wrong_arch_is_killed():
    assert run(exec_mapping_filter(RET_ERRNO), GETPID, arch=0x40000003) == RET_KILL_PROCESS


def test_allow_list():
    program = allow_list([MMAP, MPROTECT, MUNMAP, GETPID, 0, 1, 60, 231])
    assert run(program, MMAP, *MMAP_EXEC) == RET_ALLOW
    assert run(program, GETPID) == RET_ALLOW
    assert run(program, 257) == RET_KILL_PROCESS      # openat: not listed


def test_64_bit_argument_compares_both_halves():
    # libseccomp compares a 64-bit argument as high word then low word.
    program = [
        insn(LD_W_ABS, ARG2_HIGH), insn(JEQ_K, 0, 0, 3),
        insn(LD_W_ABS, ARG2_LOW), insn(JEQ_K, 3, 0, 1),
        insn(RET_K, RET_ALLOW), insn(RET_K, RET_ERRNO | 13),
    ]
    assert run(program, MMAP, 0, 0, 3) == RET_ALLOW
    assert run(program, MMAP, 0, 0, (1 << 32) | 3) == RET_ERRNO | 13
    assert run(program, MMAP, 0, 0, 7) == RET_ERRNO | 13


def test_scratch_memory_index_register_and_return_a():
    program = [
        insn(LD_W_ABS, NR), insn(ST, 3),               # mem[3] = nr
        insn(LDX_IMM, 30), insn(LD_MEM, 3),            # x = 30, a = nr
        insn(ADD_X), insn(TAX),                        # a = x = nr + 30
        insn(LD_IMM, 39 + 30), insn(JEQ_X, 0, 0, 2),   # a == x ?
        insn(LD_IMM, RET_LOG), insn(RET_A),
        insn(TXA), insn(AND_K, 0), insn(RET_A),        # 0: kill thread
    ]
    assert run(program, GETPID) == RET_LOG
    assert run(program, MMAP) == RET_KILL_THREAD


def test_unconditional_jump_and_jge():
    program = [
        insn(LD_W_ABS, NR), insn(JA, 1), insn(RET_K, RET_KILL_PROCESS),
        insn(JGE_K, 300, 0, 1), insn(RET_K, RET_ERRNO | 38), insn(RET_K, RET_ALLOW),
    ]
    assert run(program, MMAP) == RET_ALLOW
    assert run(program, 435) == RET_ERRNO | 38


def test_division_by_zero_kills():
    assert run([insn(LDX_IMM, 0), insn(LD_IMM, 4), insn(DIV_X), insn(RET_K, RET_ALLOW)], GETPID) == RET_KILL_THREAD


def test_running_off_the_end_is_an_error():
    with pytest.raises(FilterError):
        run([insn(LD_W_ABS, NR)], GETPID)


def test_load_outside_seccomp_data_is_an_error():
    with pytest.raises(FilterError):
        run([insn(LD_W_ABS, 64), insn(RET_A)], GETPID)


def test_decode_filter_round_trip():
    program = exec_mapping_filter(RET_KILL_PROCESS)
    raw = b"".join(struct.pack("<HBBI", i.code, i.jt, i.jf, i.k) for i in program)
    assert seccomp.decode_filter(raw) == program
    with pytest.raises(FilterError):
        seccomp.decode_filter(raw[:-1])


def test_most_restrictive_action_wins():
    assert seccomp.most_restrictive([RET_ALLOW, RET_ERRNO | 1, RET_LOG]) == RET_ERRNO | 1
    assert seccomp.most_restrictive([RET_KILL_THREAD, RET_KILL_PROCESS]) == RET_KILL_PROCESS
    assert seccomp.most_restrictive([RET_ALLOW, RET_TRAP, RET_ERRNO]) == RET_TRAP
    assert seccomp.most_restrictive([]) == RET_ALLOW


@pytest.mark.parametrize(("value", "outcome", "words"), [
    (RET_ALLOW, "allow", "allow"),
    (RET_LOG, "allow", "log and allow"),
    (RET_ERRNO | 1, "deny", "deny (EPERM)"),
    (RET_KILL_PROCESS, "kill", "kill the process on"),
    (RET_TRAP | 5, "kill", "send SIGSYS on"),
    (0x12340000, "kill", "kill the thread on"),      # unknown action: the kernel kills
])
def test_describe(value, outcome, words):
    assert seccomp.describe(value) == (outcome, words)


def test_verdict_over_several_filters():
    filters = [allow_list([MMAP, MPROTECT, MUNMAP, GETPID]), exec_mapping_filter(RET_ERRNO | 1)]
    call = PlannedSyscall("mmap(PROT_READ|PROT_EXEC)", MMAP, MMAP_EXEC)
    assert seccomp.verdict(filters, call, 0x1000) == RET_ERRNO | 1
    assert seccomp.verdict(filters[:1], call, 0x1000) == RET_ALLOW
