"""Pure parts of the suspended-stack search: finding saved ucontext_t structures in memory,
telling stack-like mappings, and recognising a hand-made stack switch instruction."""

from __future__ import annotations

import struct

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from plugins.module_utils.careengine.apply import coroutines, stacks
from plugins.module_utils.careengine.process import Mapping

CODE = Mapping(0x555500001000, 0x555500002000, "r-xp", 0x1000, "08:01", 12, "/usr/bin/prog")
HEAP = Mapping(0x555500010000, 0x555500030000, "rw-p", 0, "00:00", 0, "[heap]")
GUARD = Mapping(0x7F0000000000, 0x7F0000001000, "---p", 0, "00:00", 0, "")
COSTACK = Mapping(0x7F0000001000, 0x7F0000011000, "rw-p", 0, "00:00", 0, "")
LONELY = Mapping(0x7F0000020000, 0x7F0000030000, "rw-p", 0, "00:00", 0, "")
STACK = Mapping(0x7FFD00000000, 0x7FFD00021000, "rw-p", 0, "00:00", 0, "[stack]")
DATA = Mapping(0x555500003000, 0x555500004000, "rw-p", 0x3000, "08:01", 12, "/usr/bin/prog")
MAPPINGS = [CODE, DATA, HEAP, GUARD, COSTACK, LONELY, STACK]


def ucontext(address: int, rip: int, rsp: int, fpregs: int | None = None) -> bytes:
    """A ucontext_t as glibc's getcontext/swapcontext leave it (registers in gregs)."""
    data = bytearray(stacks.UCONTEXT_SIZE)
    registers = {"r12": 12, "r13": 13, "r14": 14, "r15": 15, "rbp": 0x7F0000010F00, "rbx": 3, "rsp": rsp,
                 "rip": rip}
    for name, index in stacks.GREGS.items():
        struct.pack_into("<Q", data, stacks.UCONTEXT_GREGS + 8 * index, registers[name])
    struct.pack_into("<Q", data, stacks.UCONTEXT_FPREGS,
                     address + stacks.UCONTEXT_FPREGS_MEM if fpregs is None else fpregs)
    return bytes(data)


def test_contexts_are_found_by_their_self_pointer():
    base = HEAP.start
    region = bytearray(0x4000)
    first = base + 0x120
    region[0x120:0x120 + stacks.UCONTEXT_SIZE] = ucontext(first, CODE.start + 0x40, COSTACK.start + 0xFF00)
    decoy = base + 0x1800          # points at itself, but its saved rip is not code
    region[0x1800:0x1800 + stacks.UCONTEXT_SIZE] = ucontext(decoy, 0x1234, COSTACK.start + 0xFF00)
    wrong = base + 0x2800          # code and stack fine, but fpregs points elsewhere: not a saved context
    region[0x2800:0x2800 + stacks.UCONTEXT_SIZE] = ucontext(wrong, CODE.start, COSTACK.start, fpregs=wrong)
    found = stacks.find_contexts([(base, bytes(region))], [CODE], stacks.writable_mappings(MAPPINGS))
    assert [context.address for context in found] == [first]
    assert found[0].registers["rip"] == CODE.start + 0x40
    assert found[0].registers["rsp"] == COSTACK.start + 0xFF00
    assert found[0].registers["rbx"] == 3


def test_context_across_a_16_mib_window_is_found():
    base = 0x555500FFF000            # the structure straddles 0x555501000000
    region = bytearray(0x2000)
    address = base + 0xF00
    region[0xF00:0xF00 + stacks.UCONTEXT_SIZE] = ucontext(address, CODE.start, HEAP.start + 0x100)
    found = stacks.find_contexts([(base, bytes(region))], [CODE], [HEAP, Mapping(base, base + 0x2000, "rw-p", 0,
                                                                                  "00:00", 0, "")])
    assert [context.address for context in found] == [address]


@pytest.mark.parametrize(("mapping", "expected"), [
    (STACK, True), (COSTACK, True), (LONELY, False), (HEAP, False), (DATA, False),
])
def test_stack_like_mappings(mapping, expected):
    assert stacks.is_stack_like(mapping, MAPPINGS) is expected


def test_special_mappings_are_not_searched():
    vvar = Mapping(0x7FFF00000000, 0x7FFF00004000, "rw-p", 0, "00:00", 0, "[vvar]")
    assert vvar not in stacks.writable_mappings([*MAPPINGS, vvar])
    assert CODE not in stacks.writable_mappings(MAPPINGS)


@pytest.mark.parametrize(("code", "switches"), [
    (b"\x48\x8b\x26", True),             # mov (%rsi), %rsp
    (b"\x48\x8b\x67\x08", True),         # mov 8(%rdi), %rsp
    (b"\x49\x8b\xa0\x00\x01\x00\x00", True),   # mov 0x100(%r8), %rsp
    (b"\x48\x8b\x65\xf8", False),        # mov -8(%rbp), %rsp: a frame's own slot
    (b"\x48\x8b\x64\x24\x08", False),    # mov 8(%rsp), %rsp
    (b"\x48\x89\xec", False),            # mov %rbp, %rsp
    (b"\x48\x8b\x07", False),            # mov (%rdi), %rax
])
def test_stack_switch_instruction(code, switches):
    disassembler = Cs(CS_ARCH_X86, CS_MODE_64)
    disassembler.detail = True
    insn = next(disassembler.disasm(code, 0x1000))
    assert coroutines._loads_rsp_through_pointer(insn) is switches
    assert bool(coroutines._MOV_TO_RSP.match(code)) is (switches or code.startswith((b"\x48\x8b\x65",
                                                                                      b"\x48\x8b\x64")))


def test_stack_switching_reasons():
    assert not coroutines.StackSwitching(())
    both = coroutines.StackSwitching(("prog uses swapcontext", "prog loads %rsp from memory"))
    assert both and both.describe() == "prog uses swapcontext; prog loads %rsp from memory"
    assert coroutines.COROUTINE_LIBRARIES.match("libboost_context.so.1.74.0")
    assert coroutines.COROUTINE_LIBRARIES.match("libco.so")
    assert not coroutines.COROUTINE_LIBRARIES.match("libcom_err.so.2")


def test_memory_is_read_in_overlapping_pieces(monkeypatch):
    import ctypes
    import os

    monkeypatch.setattr(stacks, "PIECE_SIZE", 4096)
    content = bytes(range(256)) * 40                      # 10240 bytes of this process's own memory
    buffer = ctypes.create_string_buffer(content, len(content))
    start = ctypes.addressof(buffer)
    pieces = list(stacks.read_in_pieces(os.getpid(), [(start, len(content))]))
    assert [base - start for base, _ in pieces] == [0, 4096, 8192]
    assert all(len(data) == min(4096 + stacks.UCONTEXT_SIZE, len(content) - (base - start)) for base, data in pieces)
    assert all(data == content[base - start:base - start + len(data)] for base, data in pieces)
