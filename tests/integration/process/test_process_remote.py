"""Remote system calls and function calls in real, stopped processes."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest
from ptrace.binding import func as ptrace_func
from waiting import eventually

from plugins.module_utils.careengine.errors import ProcessError
from plugins.module_utils.careengine.process import (
    CALL_RETURN_STUB,
    RemoteSyscallFailed,
    StoppedProcess,
    find_syscall_instruction,
    read_maps,
    tracer,
)

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
PAGE = 4096


def mapping_at(pid: int, address: int):
    return next((m for m in read_maps(pid) if m.start == address), None)


def blocked_in_read(pid: int, tid: int) -> bool:
    """Whether thread ``tid`` of ``pid`` sits in read(2)."""
    with open(f"/proc/{pid}/task/{tid}/syscall") as stream:
        return stream.read().split()[0] == "0"


def counter0(running) -> int:
    with open(f"/proc/{running.pid}/mem", "rb") as mem:
        mem.seek(running.address("counters"))
        return int.from_bytes(mem.read(8), "little")


def kernel_registers(tid: int) -> bytes:
    """The registers the kernel holds for stopped thread ``tid`` (not the tracer's copy)."""
    regs = tracer.Registers()
    ptrace_func.ptrace(ptrace_func.PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return bytes(regs)


def kernel_xstate(tid: int) -> bytes:
    """The XSAVE area the kernel holds for stopped thread ``tid``."""
    buffer = ctypes.create_string_buffer(64 * 1024)
    vector = tracer._IoVec(ctypes.addressof(buffer), len(buffer))
    ptrace_func.ptrace(tracer.PTRACE_GETREGSET, tid, tracer.NT_X86_XSTATE, ctypes.addressof(vector))
    return buffer.raw[:vector.iov_len]


def make_trap(patient) -> int:
    """A page in the patient holding the remote-call return stub at its start (as the
    apply step does)."""
    page = patient.mmap(0, PAGE, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS)
    patient.write(page, CALL_RETURN_STUB)
    return page


def test_mmap_mprotect_munmap_are_visible_in_maps(threads_program):
    running = threads_program(2)
    with StoppedProcess(running.pid) as patient:
        address = patient.mmap(0, 2 * PAGE, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS)
        created = mapping_at(running.pid, address)
        assert created is not None and created.perms == "rwxp" and created.size == 2 * PAGE
        patient.mprotect(address, 2 * PAGE, PROT_READ | PROT_EXEC)
        assert mapping_at(running.pid, address).perms == "r-xp"
        patient.munmap(address, 2 * PAGE)
        assert mapping_at(running.pid, address) is None
    before = counter0(running)
    assert eventually(lambda: counter0(running) > before)


def test_remote_syscall_error_names_errno(threads_program):
    running = threads_program(1)
    with StoppedProcess(running.pid) as patient:
        regs = patient.get_regs(running.pid)
        with pytest.raises(ProcessError, match="EINVAL") as failure:
            patient.munmap(0x1001, PAGE)  # not page aligned
        assert isinstance(failure.value, RemoteSyscallFailed) and failure.value.errno == errno.EINVAL
        assert patient.get_regs(running.pid) == regs


def test_remote_syscall_writes_nothing_into_code(threads_program):
    running = threads_program(1)
    with StoppedProcess(running.pid) as patient:
        site = find_syscall_instruction(running.pid)
        holder = next(m for m in read_maps(running.pid) if m.contains(site))
        assert holder.executable and holder.is_file
        text_before = patient.read(holder.start, holder.size)
        assert text_before[site - holder.start:site - holder.start + 2] == b"\x0f\x05"
        address = patient.mmap(0, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)
        patient.munmap(address, PAGE)
        assert patient.read(holder.start, holder.size) == text_before


def test_syscall_site_is_found_again_from_the_cache(threads_program, monkeypatch):
    first = threads_program(1)
    second = threads_program(1)
    monkeypatch.setattr(tracer, "_syscall_site_cache", {})
    site = find_syscall_instruction(first.pid)
    holder = next(m for m in read_maps(first.pid) if m.contains(site))
    assert any(key.startswith("build-id:") for key in tracer._syscall_site_cache)

    def no_scan(pid, mapping, pattern):
        raise AssertionError("scanned although the site is cached")

    monkeypatch.setattr(tracer, "_scan_for", no_scan)
    again = find_syscall_instruction(second.pid)
    again_holder = next(m for m in read_maps(second.pid) if m.contains(again))
    assert again_holder.clean_path == holder.clean_path
    assert again - again_holder.start + again_holder.offset == site - holder.start + holder.offset


def test_remote_syscall_in_thread_blocked_in_read(threads_program):
    running = threads_program(2, reader=True)
    reader = int(running.values["reader"])
    assert eventually(lambda: blocked_in_read(running.pid, reader))
    for _ in range(3):
        with StoppedProcess(running.pid) as patient:
            regs = patient.get_regs(reader)
            address = patient.remote_syscall(9, 0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                                             (1 << 64) - 1, 0, tid=reader)
            assert mapping_at(running.pid, address) is not None
            patient.remote_syscall(11, address, PAGE, tid=reader)
            assert patient.get_regs(reader) == regs
    # The interrupted read restarts and gets the data.
    running.process.stdin.write(b"hello")
    running.process.stdin.flush()
    assert running.wait_for("read") == "read hello"
    running.process.stdin.write(b"again")
    running.process.stdin.flush()
    assert running.wait_for("read") == "read again"


def test_remote_syscall_in_sleeping_main_thread(threads_program):
    running = threads_program(1)
    for _ in range(20):
        with StoppedProcess(running.pid) as patient:
            address = patient.mmap(0, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)
            patient.munmap(address, PAGE)
    before = counter0(running)
    assert eventually(lambda: counter0(running) > before)


def test_remote_call_returns_value_and_restores_registers(threads_program):
    running = threads_program(2, reader=True)
    reader = int(running.values["reader"])
    assert eventually(lambda: blocked_in_read(running.pid, reader))
    with StoppedProcess(running.pid) as patient:
        trap = make_trap(patient)
        for tid in patient.tids:
            regs = kernel_registers(tid)
            assert patient.remote_call(running.address("resolver"), (3, 4), trap, tid=tid) == 3046
            assert patient.remote_call(running.address("align"), (), trap, tid=tid) == 0
            assert kernel_registers(tid) == regs
            assert bytes(patient.get_regs(tid)) == regs
        patient.munmap(trap, PAGE)
    running.process.stdin.write(b"after call")
    running.process.stdin.flush()
    assert running.wait_for("read") == "read after call"
    assert str(reader) in os.listdir(f"/proc/{running.pid}/task")


def test_remote_call_gives_back_the_fpu_state(threads_program):
    """A function of the patient may change vector registers and MXCSR: the borrowed
    thread gets its XSAVE area back exactly, as it gets its registers."""
    running = threads_program(2)
    with StoppedProcess(running.pid) as patient:
        trap = make_trap(patient)
        for tid in patient.tids:
            before = kernel_xstate(tid)
            assert patient.remote_call(running.address("clobber"), (), trap, tid=tid) == 5
            assert kernel_xstate(tid) == before
        patient.munmap(trap, PAGE)
    before = counter0(running)
    assert eventually(lambda: counter0(running) > before)


def test_write_into_readonly_text(threads_program):
    running = threads_program(1)
    seven = running.address("seven")
    holder = next(m for m in read_maps(running.pid) if m.contains(seven))
    assert not holder.writable
    new_code = b"\xb8\x2a\x00\x00\x00\xc3"  # mov $42, %eax; ret
    with StoppedProcess(running.pid) as patient:
        trap = make_trap(patient)
        original = patient.read(seven, len(new_code))
        assert patient.remote_call(seven, (), trap) == 7
        patient.write(seven, new_code)
        assert patient.read(seven, len(new_code)) == new_code
        assert patient.remote_call(seven, (), trap) == 42
        patient.write(seven, original)
        assert patient.remote_call(seven, (), trap) == 7
        patient.munmap(trap, PAGE)


def test_remote_call_that_never_returns_times_out(threads_program):
    running = threads_program(1)
    with StoppedProcess(running.pid, timeout=0.3) as patient:
        trap = make_trap(patient)
        regs = patient.get_regs(running.pid)
        with pytest.raises(ProcessError, match="did not return"):
            patient.remote_call(running.address("spin"), (), trap)
        assert patient.get_regs(running.pid) == regs
        with pytest.raises(ProcessError, match="SIGSEGV"):
            patient.remote_call(0x10, (), trap)
        assert patient.get_regs(running.pid) == regs
        assert patient.remote_call(running.address("resolver"), (1, 2), trap) == 1044
    before = counter0(running)
    assert eventually(lambda: counter0(running) > before)


def test_blocking_remote_syscall_times_out_and_thread_recovers(threads_program):
    running = threads_program(2, reader=True)
    with StoppedProcess(running.pid, timeout=0.3) as patient:
        trap = make_trap(patient)
        regs = patient.get_regs(running.pid)
        with pytest.raises(ProcessError, match="did not return"):
            patient.remote_syscall(34, tid=running.pid)  # pause(): blocks until a signal
        assert patient.get_regs(running.pid) == regs
        assert patient.remote_call(running.address("resolver"), (0, 0), trap) == 42
        patient.munmap(trap, PAGE)
    running.process.stdin.write(b"fine")
    running.process.stdin.flush()
    assert running.wait_for("read") == "read fine"
    before = counter0(running)
    assert eventually(lambda: counter0(running) > before)


@pytest.mark.parametrize("offset,size", [(0, 1), (3, 6), (5, 3), (1, 20), (0, 16)])
def test_word_wise_ptrace_write_fallback(threads_program, offset, size):
    running = threads_program(1)
    seven = running.address("seven")
    with StoppedProcess(running.pid) as patient:
        original = patient.read(seven - 16, 64)
        data = bytes(range(0xA0, 0xA0 + size))
        patient._poke_write(seven + offset, data)
        expected = bytearray(original)
        expected[16 + offset:16 + offset + size] = data
        assert patient.read(seven - 16, 64) == bytes(expected)
        patient._poke_write(seven - 16, original)
        assert patient.read(seven - 16, 64) == original
