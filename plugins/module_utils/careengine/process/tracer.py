"""A live process stopped under ptrace: every thread, registers, remote syscalls and calls.

Threads are attached with ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``: no SIGSTOP is ever
sent, so nothing can leak a stop into the patient. Any ptrace-stop counts as stopped
(interrupt, group-stop, clone event, signal delivery); a signal that arrives while we
hold a thread is given back to it when it is resumed, with its original siginfo when the
thread still sits in that signal's delivery stop.

Remote syscalls write nothing into the patient's code: they borrow an existing
``syscall`` instruction (bytes ``0f 05``) of an executable mapping (libc's first) and
single-step exactly that one instruction. While a thread runs our code (a remote syscall
or call), its asynchronous signals are blocked with ``PTRACE_SETSIGMASK``: they stay
queued in the kernel, siginfo intact, and are delivered normally afterwards. Registers
and signal mask are restored exactly, so a system call the thread was blocked in
restarts as if nothing happened.

Waiting never uses ``waitpid(-1)`` (that could reap the caller's own children): each
thread is waited for by id, with ``SIGCHLD`` blocked and ``sigtimedwait`` as the wake-up.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from collections.abc import Callable

from ptrace import PtraceError
from ptrace.binding import func as ptrace_func
from ptrace.binding.linux_struct import user_regs_struct

from ..errors import PermissionDenied, ProcessError, ProcessGone
from . import memory
from .maps import Mapping, read_maps, read_proc_text
from .objects import group_file_mappings, mapped_objects

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
WALL = 0x40000000  # __WALL: wait for threads (clones) too
_SEIZE_OPTIONS = ptrace_func.PTRACE_O_TRACECLONE
_MAX_CATCH_UP_ROUNDS = 16
_POLL_CAP = 0.01  # longest sleep between checks when SIGCHLD might go to another thread
_GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})
# Signals blocked in a thread while it runs our code: all but SIGTRAP (single-step and
# int3 report through it) and the faults (a blocked fault would reset the patient's handler).
_BLOCK_DURING_REMOTE = (1 << 64) - 1
for _signo in (signal.SIGTRAP, *(_FAULT_SIGNALS)):
    _BLOCK_DURING_REMOTE &= ~(1 << (_signo - 1))
_SYSCALL_INSN = b"\x0f\x05"
_SCAN_CHUNK = 64 * 1024
_ARG_REGISTERS_SYSCALL = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_ARG_REGISTERS_CALL = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_RED_ZONE = 128
_U64 = (1 << 64) - 1

# File offset of a `syscall` instruction, per build-id (or file identity) of the object holding it.
_syscall_site_cache: dict[str, int] = {}

_libc = ctypes.CDLL(None, use_errno=True)


class RemoteSyscallFailed(ProcessError):
    """A system call made in the patient returned an error; ``errno`` holds its number."""

    def __init__(self, message: str, errno_value: int) -> None:
        super().__init__(message)
        self.errno = errno_value


class _StepTimeout(Exception):
    """A single-stepped system call did not return in time (internal)."""


class Registers(user_regs_struct):
    """A thread's ``user_regs_struct``: ``regs.rip``, ``regs.rsp``, ``regs.orig_rax``, ..."""

    def copy(self) -> Registers:
        """An independent copy."""
        duplicate = Registers()
        ctypes.memmove(ctypes.addressof(duplicate), ctypes.addressof(self), ctypes.sizeof(self))
        return duplicate

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> Registers:
        return self.copy()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, user_regs_struct):
            return NotImplemented
        return bytes(self) == bytes(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name):#x}" for name in ("rip", "rsp", "rax", "orig_rax"))
        return f"Registers({shown})"

    __str__ = __repr__


def signed64(value: int) -> int:
    """A 64-bit register value as a signed integer."""
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


def _errno_of(exc: PtraceError) -> int:
    return exc.errno or 0


def _syscall_name(nr: int) -> str:
    return {9: "mmap", 10: "mprotect", 11: "munmap"}.get(nr, f"syscall {nr}")


class StoppedProcess:
    """A process with every thread stopped under ptrace.

    ``with StoppedProcess(pid) as patient:`` stops all threads; leaving the block
    (normally or by an exception) restores anything borrowed and lets the process run
    on, detached.
    """

    def __init__(self, pid: int, *, timeout: float = 5.0) -> None:
        self.pid = pid
        self.timeout = timeout
        self._comm: str | None = None
        # tid -> signals to give back on resume, in arrival order.
        self._pending: dict[int, list[int]] = {}
        # tid -> the signal whose delivery-stop the thread sits in (0: another kind of stop).
        self._stop_signal: dict[int, int] = {}
        # tid -> True while the thread sits in a job-control (group) stop.
        self._group_stopped: dict[int, bool] = {}
        self._stopped = False
        self._seized: set[int] = set()  # threads we are tracing
        self._paused_ns = 0
        self._stop_started: int | None = None
        self._syscall_address: int | None = None

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> StoppedProcess:
        self.stop()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self.resume()
        except Exception:
            if exc is None:
                raise

    # ---------------------------------------------------------------- facts
    @property
    def comm(self) -> str:
        """The process name (``/proc/PID/comm``)."""
        if self._comm is None:
            self._comm = read_proc_text(self.pid, "comm").rstrip("\n")
        return self._comm

    @property
    def tids(self) -> list[int]:
        """The stopped threads, the main thread first."""
        return sorted(self._seized, key=lambda tid: (tid != self.pid, tid))

    @property
    def paused_ns(self) -> int:
        """Nanoseconds the process was held stopped so far (all stop periods)."""
        if self._stop_started is not None:
            return self._paused_ns + time.perf_counter_ns() - self._stop_started
        return self._paused_ns

    # ---------------------------------------------------------------- stopping
    def stop(self) -> None:
        """Stop every thread of the process, including threads created meanwhile."""
        if self._stopped:
            return
        if self.pid == os.getpid():
            raise ProcessError(f"process {self.pid} is this tool itself; it cannot stop itself")
        if self._syscall_address is None:
            # Found before stopping anything: it costs the patient no pause.
            try:
                self._syscall_address = find_syscall_instruction(self.pid)
            except ProcessError:
                pass  # no usable instruction: remote_syscall will say so if it is needed
        self._stop_started = time.perf_counter_ns()
        try:
            self._catch_all_threads()
        except BaseException:
            self._release_all()
            raise
        self._stopped = True

    def _list_tasks(self) -> list[int]:
        try:
            return [int(name) for name in os.listdir(f"/proc/{self.pid}/task")]
        except FileNotFoundError:
            raise ProcessGone(f"process {self.pid} does not exist") from None
        except PermissionError:
            raise PermissionDenied(f"may not inspect process {self.pid}: run as root or with CAP_SYS_PTRACE") from None

    def _catch_all_threads(self) -> None:
        gone: set[int] = set()
        for _ in range(_MAX_CATCH_UP_ROUNDS):
            fresh = [tid for tid in self._list_tasks() if tid not in self._seized and tid not in gone]
            if not fresh:
                if not self._seized:
                    raise ProcessGone(f"process {self.pid} exited")
                return
            waiting = []
            for tid in fresh:
                if self._seize(tid):
                    waiting.append(tid)
                else:
                    gone.add(tid)
            self._wait_stopped(waiting, gone)
        raise ProcessError(
            f"process {self.pid} creates threads faster than we can stop them; try again later"
        )

    def _seize(self, tid: int) -> bool:
        """Trace ``tid`` and ask it to stop; False if it is gone (or an exited leader)."""
        try:
            ptrace_func.ptrace(PTRACE_SEIZE, tid, 0, _SEIZE_OPTIONS)
        except PtraceError as exc:
            code = _errno_of(exc)
            if code == errno.ESRCH:
                return False
            if code == errno.EPERM:
                if self._is_zombie(tid):
                    return False
                raise PermissionDenied(self._permission_message(tid)) from None
            raise ProcessError(f"cannot attach to thread {tid} of process {self.pid}: {exc}") from None
        self._seized.add(tid)
        try:
            ptrace_func.ptrace(PTRACE_INTERRUPT, tid)
        except PtraceError as exc:
            if _errno_of(exc) != errno.ESRCH:
                raise ProcessError(f"cannot interrupt thread {tid} of process {self.pid}: {exc}") from None
        return True

    def _is_zombie(self, tid: int) -> bool:
        try:
            with open(f"/proc/{self.pid}/task/{tid}/stat", "rb") as stream:
                stat = stream.read()
        except OSError:
            return True
        return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")

    def _permission_message(self, tid: int) -> str:
        try:
            status = read_proc_text(self.pid, "status")
        except Exception:
            status = ""
        for line in status.splitlines():
            if line.startswith("TracerPid:") and line.split()[1] != "0":
                return (
                    f"may not trace process {self.pid}: it is already traced by process {line.split()[1]} "
                    f"(a debugger?)"
                )
        return (
            f"may not trace process {self.pid} (thread {tid}): run as root or with CAP_SYS_PTRACE, "
            f"and check kernel.yama.ptrace_scope"
        )

    def _wait_stopped(self, waiting: list[int], gone: set[int]) -> None:
        """Wait until every thread in ``waiting`` (and threads they clone) reports a stop."""
        deadline = time.monotonic() + self.timeout
        pending = list(waiting)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            while pending:
                still = []
                for tid in pending:
                    status = self._waitpid(tid, os.WNOHANG)
                    if status is None:
                        still.append(tid)
                        continue
                    if status < 0:
                        gone.add(tid)
                        continue
                    new_tid = self._note_stop(tid, status)
                    if new_tid:
                        still.append(new_tid)
                pending = still
                if pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ProcessError(
                            f"threads {pending} of process {self.pid} did not stop within {self.timeout} s "
                            f"(uninterruptible sleep?)"
                        )
                    if signal.sigtimedwait({signal.SIGCHLD}, min(remaining, _POLL_CAP)) is None:
                        # Quiet for a while: a main thread that exited while others run is a
                        # zombie the kernel never reports; do not wait for it.
                        for tid in [tid for tid in pending if self._is_zombie(tid)]:
                            pending.remove(tid)
                            gone.add(tid)
                            self._forget_thread(tid)
        finally:
            if signal.SIGCHLD not in old_mask:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def _waitpid(self, tid: int, flags: int = 0) -> int | None:
        """The wait status of ``tid``; None if no change (WNOHANG); -1 if the thread is gone."""
        try:
            waited, status = os.waitpid(tid, flags | WALL)
        except ChildProcessError:
            self._forget_thread(tid)
            return -1
        if waited == 0:
            return None
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self._forget_thread(tid)
            return -1
        return status

    def _forget_thread(self, tid: int) -> None:
        self._seized.discard(tid)
        self._pending.pop(tid, None)
        self._stop_signal.pop(tid, None)
        self._group_stopped.pop(tid, None)

    def _note_stop(self, tid: int, status: int) -> int | None:
        """Record a stop of ``tid``; return a newly cloned thread to wait for, if any."""
        event = status >> 16
        stop_signal = os.WSTOPSIG(status)
        if event == 0:
            # Signal-delivery-stop: hold the signal and give it back on resume.
            self._stop_signal[tid] = stop_signal
            self._pending.setdefault(tid, []).append(stop_signal)
            return None
        self._stop_signal[tid] = 0
        self._group_stopped[tid] = event == PTRACE_EVENT_STOP and stop_signal in _GROUP_STOP_SIGNALS
        if event == ptrace_func.PTRACE_EVENT_CLONE:
            new_tid = ptrace_func.ptrace_geteventmsg(tid)
            if new_tid and new_tid not in self._seized:
                self._seized.add(new_tid)
                return new_tid
        return None

    # ---------------------------------------------------------------- resuming
    def resume(self) -> None:
        """Let every thread run on and detach from all of them; give back held signals."""
        if not self._stopped and not self._seized:
            return
        self._release_all()

    def _release_all(self) -> None:
        first_error: Exception | None = None
        try:
            for tid in list(self._seized):
                try:
                    self._detach(tid)
                except Exception as exc:  # detach every other thread all the same
                    first_error = first_error or exc
            if first_error is not None:
                raise first_error
        finally:
            self._seized.clear()
            self._pending.clear()
            self._stop_signal.clear()
            self._group_stopped.clear()
            self._stopped = False
            self._end_stop_period()
            self._syscall_address = None
            memory.forget_process(self.pid)

    def _end_stop_period(self) -> None:
        if self._stop_started is not None:
            self._paused_ns += time.perf_counter_ns() - self._stop_started
            self._stop_started = None

    def _signal_to_inject(self, tid: int) -> int:
        """The signal to resume ``tid`` with; other held signals are queued again."""
        held = self._pending.pop(tid, [])
        in_delivery = self._stop_signal.get(tid, 0)
        inject = 0
        if in_delivery and in_delivery in held:
            held.remove(in_delivery)
            inject = in_delivery
        for signo in held:
            self._tgkill(tid, signo)
        return inject

    def _tgkill(self, tid: int, signo: int) -> None:
        if _libc.syscall(234, self.pid, tid, signo) != 0:  # tgkill
            code = ctypes.get_errno()
            if code != errno.ESRCH:
                raise ProcessError(f"cannot give signal {signo} back to thread {tid}: {os.strerror(code)}")

    def _detach(self, tid: int) -> None:
        signo = self._signal_to_inject(tid)
        try:
            ptrace_func.ptrace_detach(tid, signo)
            return
        except PtraceError as exc:
            if _errno_of(exc) != errno.ESRCH:
                raise ProcessError(f"cannot detach from thread {tid} of process {self.pid}: {exc}") from None
        # ESRCH: the thread is gone, or it is running (an error interrupted a remote call
        # or it never stopped): stop it so that it can be detached.
        try:
            ptrace_func.ptrace(PTRACE_INTERRUPT, tid)
        except PtraceError:
            return
        try:
            self._wait_thread(tid, time.monotonic() + self.timeout)
        except (TimeoutError, ProcessGone):
            return  # the kernel detaches it when we exit; nothing else is possible
        try:
            ptrace_func.ptrace_detach(tid, 0)
        except PtraceError:
            pass

    def run_for(self, seconds: float) -> None:
        """Let all threads run for ``seconds``, then stop them all again (new threads too).

        Signals arriving meanwhile are delivered at once; a job-control stop (someone
        sent SIGSTOP) is respected: such threads stay stopped.
        """
        if not self._stopped:
            raise ProcessError(f"process {self.pid} is not stopped")
        parked: set[int] = set()  # threads in a group-stop: not resumed, not interrupted
        for tid in list(self._seized):
            if self._stop_signal.get(tid, 0) == 0 and self._group_stopped.get(tid):
                parked.add(tid)
                continue
            self._cont(tid, self._signal_to_inject(tid))
        self._stop_signal.clear()
        self._end_stop_period()
        deadline = time.monotonic() + seconds
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            while True:
                for tid in list(self._seized):
                    if tid in parked:
                        continue
                    status = self._waitpid(tid, os.WNOHANG)
                    if status is None or status < 0:
                        continue
                    if self._service_running_stop(tid, status):
                        parked.add(tid)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                signal.sigtimedwait({signal.SIGCHLD}, min(remaining, _POLL_CAP))
        finally:
            if signal.SIGCHLD not in old_mask:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        self._stop_started = time.perf_counter_ns()
        running = [tid for tid in self._seized if tid not in parked]
        gone: set[int] = set()
        for tid in running:
            try:
                ptrace_func.ptrace(PTRACE_INTERRUPT, tid)
            except PtraceError as exc:
                if _errno_of(exc) != errno.ESRCH:
                    raise ProcessError(f"cannot interrupt thread {tid}: {exc}") from None
        self._wait_stopped(running, gone)
        self._catch_all_threads()

    def _service_running_stop(self, tid: int, status: int) -> bool:
        """A running thread stopped (signal, clone, group-stop): True if it stays stopped."""
        event = status >> 16
        signo = os.WSTOPSIG(status)
        if event == PTRACE_EVENT_STOP and signo in _GROUP_STOP_SIGNALS:
            self._stop_signal[tid] = 0
            self._group_stopped[tid] = True
            return True
        if event == ptrace_func.PTRACE_EVENT_CLONE:
            new_tid = ptrace_func.ptrace_geteventmsg(tid)
            if new_tid and new_tid not in self._seized:
                # Its first stop is serviced (and continued) by the same loop.
                self._seized.add(new_tid)
        self._cont(tid, signo if event == 0 else 0)
        return False

    def _cont(self, tid: int, signo: int = 0) -> None:
        try:
            ptrace_func.ptrace_cont(tid, signo)
        except PtraceError as exc:
            if _errno_of(exc) == errno.ESRCH:
                self._forget_thread(tid)
                return
            raise ProcessError(f"cannot resume thread {tid}: {exc}") from None

    # ---------------------------------------------------------------- registers
    def get_regs(self, tid: int) -> Registers:
        """The general registers of stopped thread ``tid``."""
        regs = Registers()
        try:
            ptrace_func.ptrace(ptrace_func.PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "read the registers of")
        return regs

    def set_regs(self, tid: int, regs: Registers) -> None:
        """Set the general registers of stopped thread ``tid``."""
        try:
            ptrace_func.ptrace(ptrace_func.PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "set the registers of")

    def _raise_thread_error(self, tid: int, exc: PtraceError, action: str) -> None:
        if _errno_of(exc) == errno.ESRCH:
            if self._is_zombie(tid):
                self._forget_thread(tid)
                raise ProcessGone(f"thread {tid} of process {self.pid} exited") from None
            raise ProcessError(f"cannot {action} thread {tid} of process {self.pid}: it is not stopped") from None
        raise ProcessError(f"cannot {action} thread {tid} of process {self.pid}: {exc}") from None

    # ---------------------------------------------------------------- memory
    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes of the patient's memory at ``address``."""
        return memory.read_memory(self.pid, address, size)

    def write(self, address: int, data: bytes) -> None:
        """Write ``data`` at ``address`` (read-only text included).

        Through ``/proc/PID/mem``; where the kernel refuses forced writes there
        (``proc_mem.force_override``), word by word with ``PTRACE_POKEDATA``, which a
        tracer may always use on its stopped tracee.
        """
        try:
            memory.write_memory(self.pid, address, data)
        except ProcessError as exc:
            if isinstance(exc, (ProcessGone, PermissionDenied)) or not self._seized:
                raise
            try:
                self._poke_write(address, data)
            except ProcessError:
                raise exc from None

    def _poke_write(self, address: int, data: bytes) -> None:
        """Write ``data`` with ``PTRACE_PEEKDATA``/``PTRACE_POKEDATA`` (whole aligned words)."""
        if not data:
            return
        tid = self.tids[0]
        start = address & ~7
        end = (address + len(data) + 7) & ~7
        try:
            words = bytearray()
            words += ptrace_func.ptrace_peekdata(tid, start).to_bytes(8, "little")
            if end - start > 8:
                words += bytes(end - start - 16)
                words += ptrace_func.ptrace_peekdata(tid, end - 8).to_bytes(8, "little")
            words[address - start:address - start + len(data)] = data
            for offset in range(0, len(words), 8):
                ptrace_func.ptrace_pokedata(tid, start + offset, int.from_bytes(words[offset:offset + 8], "little"))
        except PtraceError as exc:
            raise ProcessError(f"cannot write {len(data)} bytes at {address:#x} in process {self.pid}: {exc}") from None

    # ---------------------------------------------------------------- remote execution
    def _default_tid(self, tid: int | None) -> int:
        if not self._stopped:
            raise ProcessError(f"process {self.pid} is not stopped")
        if tid is not None:
            if tid not in self._seized:
                raise ProcessError(f"thread {tid} is not a stopped thread of process {self.pid}")
            return tid
        if not self._seized:
            raise ProcessGone(f"process {self.pid} has no threads left")
        # Prefer a thread not sitting in a signal's delivery-stop: running our code there
        # would make us re-send that signal instead of letting the kernel deliver it.
        for candidate in self.tids:
            if not self._pending.get(candidate):
                return candidate
        return self.tids[0]

    def _block_signals(self, tid: int) -> int:
        """Block asynchronous signals in ``tid`` while it runs our code; its old mask.

        Signals sent meanwhile stay queued in the kernel with their siginfo instead of
        being caught (and re-sent) by us.
        """
        mask = ctypes.c_uint64()
        try:
            ptrace_func.ptrace(PTRACE_GETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "read the signal mask of")
        self._set_sigmask(tid, mask.value | _BLOCK_DURING_REMOTE)
        return mask.value

    def _set_sigmask(self, tid: int, value: int) -> None:
        mask = ctypes.c_uint64(value)
        try:
            ptrace_func.ptrace(PTRACE_SETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "set the signal mask of")

    def _hold_signal(self, tid: int, signo: int) -> None:
        self._pending.setdefault(tid, []).append(signo)

    def _wait_thread(self, tid: int, deadline: float | None) -> int:
        """The next stop status of ``tid`` (a ptrace-stop); ProcessGone if it exits."""
        if deadline is None:
            status = self._waitpid(tid)
        else:
            status = None
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            try:
                while status is None:
                    status = self._waitpid(tid, os.WNOHANG)
                    if status is None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise TimeoutError
                        signal.sigtimedwait({signal.SIGCHLD}, min(remaining, _POLL_CAP))
            finally:
                if signal.SIGCHLD not in old_mask:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        if status is None or status < 0:
            raise ProcessGone(f"thread {tid} of process {self.pid} exited during a remote operation")
        return status

    def _syscall_site(self) -> int:
        """Address of a ``syscall`` instruction in the patient (found once per stop)."""
        if self._syscall_address is None:
            self._syscall_address = find_syscall_instruction(self.pid)
        return self._syscall_address

    def remote_syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        """Make thread ``tid`` execute system call ``nr`` with ``args``; its raw ``rax``.

        The thread's registers are restored exactly, so a blocking syscall it was in is
        restarted normally when it runs again.
        """
        if len(args) > len(_ARG_REGISTERS_SYSCALL):
            raise ValueError("a system call takes at most 6 arguments")
        tid = self._default_tid(tid)
        site = self._syscall_site()
        saved = self.get_regs(tid)
        regs = saved.copy()
        regs.rip = site
        regs.rax = nr
        regs.orig_rax = _U64  # -1: not in a syscall, so nothing is "restarted" into ours
        for name, value in zip(_ARG_REGISTERS_SYSCALL, args, strict=False):
            setattr(regs, name, value & _U64)
        saved_mask = self._block_signals(tid)
        timed_out: _StepTimeout | None = None
        try:
            self.set_regs(tid, regs)
            result = self._step_over_syscall(tid, site)
        except _StepTimeout as timeout:
            timed_out = timeout
        finally:
            if tid in self._seized:
                self.set_regs(tid, saved)
                self._set_sigmask(tid, saved_mask)
        if timed_out is not None:
            if tid in self._seized:
                self._drop_step_trap(tid)
            raise ProcessError(str(timed_out))
        value = signed64(result)
        if -4095 < value < 0:
            code = -value
            shown_args = ", ".join(hex(arg) for arg in args)
            raise RemoteSyscallFailed(
                f"remote {_syscall_name(nr)}({shown_args}) in process {self.pid} failed: "
                f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})",
                code,
            )
        return result

    def _await_stop(self, tid: int, deadline: float, on_timeout: Callable[[], Exception]) -> tuple[int, int]:
        """Thread ``tid``'s next stop after it was resumed: (ptrace event, stop signal),
        remembered for its resumption. Past ``deadline`` the thread is interrupted and
        ``on_timeout()`` raised."""
        try:
            status = self._wait_thread(tid, deadline)
        except TimeoutError:
            self._interrupt_and_wait(tid)
            raise on_timeout() from None
        event = status >> 16
        signo = os.WSTOPSIG(status)
        self._stop_signal[tid] = signo if event == 0 else 0
        return event, signo

    def _step_over_syscall(self, tid: int, site: int) -> int:
        deadline = time.monotonic() + self.timeout
        for _ in range(64):
            try:
                ptrace_func.ptrace_singlestep(tid)
            except PtraceError as exc:
                self._raise_thread_error(tid, exc, "single-step")
            # On a timeout, a blocking system call: interrupting it makes it return (the
            # caller restores the registers, then drops the single-step trap it queued).
            event, signo = self._await_stop(tid, deadline, lambda: _StepTimeout(
                f"remote syscall in thread {tid} of process {self.pid} did not return within {self.timeout} s"))
            if event != 0:
                continue  # a stray interrupt or group stop: step again
            if signo != signal.SIGTRAP:
                if signo in _FAULT_SIGNALS:
                    raise ProcessError(f"remote syscall in thread {tid} faulted with signal {signo}")
                self._hold_signal(tid, signo)  # not ours: give it back on resume
                continue
            regs = self.get_regs(tid)
            if regs.rip == site + len(_SYSCALL_INSN):
                return regs.rax
            if regs.rip == site:
                continue
            raise ProcessError(f"remote syscall in thread {tid} stopped at unexpected address {regs.rip:#x}")
        raise ProcessError(f"remote syscall in thread {tid} of process {self.pid} did not complete")

    def _drop_step_trap(self, tid: int) -> None:
        """Consume the SIGTRAP a single-step queued when its system call was interrupted.

        The thread runs from its own, restored registers: the kernel takes the pending
        trap before any user instruction and reports it; we drop it.
        """
        if not self._trap_pending(tid):
            return
        self._cont(tid, 0)
        try:
            status = self._wait_thread(tid, time.monotonic() + self.timeout)
        except TimeoutError:
            self._interrupt_and_wait(tid)
            return
        if status >> 16 == 0:
            signo = os.WSTOPSIG(status)
            self._stop_signal[tid] = signo
            if signo != signal.SIGTRAP:
                self._hold_signal(tid, signo)
        else:
            self._stop_signal[tid] = 0

    def _trap_pending(self, tid: int) -> bool:
        try:
            status = read_proc_text(self.pid, f"task/{tid}/status")
        except (ProcessGone, ProcessError, PermissionDenied):
            return False
        for line in status.splitlines():
            if line.startswith("SigPnd:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTRAP - 1)))
        return False

    def mmap(self, address: int, length: int, prot: int, flags: int) -> int:
        """Remote ``mmap(address, length, prot, flags, -1, 0)``; the mapped address."""
        return self.remote_syscall(9, address, length, prot, flags, _U64, 0)

    def munmap(self, address: int, length: int) -> None:
        """Remote ``munmap(address, length)``."""
        self.remote_syscall(11, address, length)

    def mprotect(self, address: int, length: int, prot: int) -> None:
        """Remote ``mprotect(address, length, prot)``."""
        self.remote_syscall(10, address, length, prot)

    def remote_call(self, function: int, args: tuple[int, ...], trap_address: int, tid: int | None = None) -> int:
        """Call ``function(*args)`` in thread ``tid`` of the patient; its ``rax``.

        The call returns to ``trap_address``, where the caller has placed an ``int3``
        byte. The stack pointer is moved below the red zone and aligned as the ABI wants;
        all registers are restored afterwards. Other threads stay stopped, so a function
        that waits for a lock held by one of them times out with ProcessError.
        """
        if len(args) > len(_ARG_REGISTERS_CALL):
            raise ValueError("remote_call passes at most 6 arguments")
        tid = self._default_tid(tid)
        saved = self.get_regs(tid)
        regs = saved.copy()
        stack = ((saved.rsp - _RED_ZONE) & ~0xF) - 8  # at entry, rsp + 8 is 16-byte aligned
        self.write(stack, (trap_address & _U64).to_bytes(8, "little"))
        regs.rsp = stack
        regs.rip = function
        regs.rax = 0
        regs.orig_rax = _U64
        for name, value in zip(_ARG_REGISTERS_CALL, args, strict=False):
            setattr(regs, name, value & _U64)
        saved_mask = self._block_signals(tid)
        try:
            self.set_regs(tid, regs)
            return self._run_until_trap(tid, trap_address + 1, time.monotonic() + self.timeout)
        finally:
            if tid in self._seized:
                self.set_regs(tid, saved)
                self._set_sigmask(tid, saved_mask)

    def _run_until_trap(self, tid: int, expected_rip: int, deadline: float) -> int:
        signo = 0
        while True:
            self._cont(tid, signo)
            if tid not in self._seized:
                raise ProcessGone(f"thread {tid} of process {self.pid} exited during a remote call")
            signo = 0
            event, stop_signal = self._await_stop(tid, deadline, lambda: ProcessError(
                f"remote call in thread {tid} of process {self.pid} did not return within {self.timeout} s"))
            if event != 0:
                continue
            if stop_signal == signal.SIGTRAP:
                regs = self.get_regs(tid)
                if regs.rip == expected_rip:
                    return regs.rax
                raise ProcessError(f"remote call in thread {tid} hit a breakpoint at {regs.rip:#x}")
            if stop_signal in _FAULT_SIGNALS:
                regs = self.get_regs(tid)
                raise ProcessError(
                    f"remote call in thread {tid} of process {self.pid} crashed with "
                    f"{signal.Signals(stop_signal).name} at {regs.rip:#x}"
                )
            self._hold_signal(tid, stop_signal)

    def _interrupt_and_wait(self, tid: int) -> None:
        try:
            ptrace_func.ptrace(PTRACE_INTERRUPT, tid)
        except PtraceError:
            self._forget_thread(tid)
            return
        status = self._waitpid(tid)
        if status is not None and status >= 0:
            self._stop_signal[tid] = os.WSTOPSIG(status) if status >> 16 == 0 else 0
            if status >> 16 == 0:
                self._hold_signal(tid, os.WSTOPSIG(status))


def _build_id_key(pid: int, group: list[Mapping]) -> str:
    objects = mapped_objects(pid, group)
    if objects and objects[0].build_id:
        return "build-id:" + objects[0].build_id
    first = group[0]
    return f"file:{first.dev}:{first.inode}:{first.clean_path}"


def _candidate_mappings(mappings: list[Mapping]) -> list[list[Mapping]]:
    """File-backed object groups with an executable mapping; libc first."""
    groups = [group for group in group_file_mappings(mappings) if any(m.executable and m.readable for m in group)]

    def rank(group: list[Mapping]) -> int:
        name = os.path.basename(group[0].clean_path)
        if name.startswith(("libc.so", "libc-")):
            return 0
        if name.startswith("ld-linux"):
            return 1
        return 2

    return sorted(groups, key=rank)


def _confirm_site(pid: int, executable: list[Mapping], file_offset: int | None) -> int | None:
    """The address of ``file_offset`` in these mappings if it holds ``syscall`` there."""
    if file_offset is None:
        return None
    for mapping in executable:
        address = mapping.start + file_offset - mapping.offset
        if mapping.start <= address and address + len(_SYSCALL_INSN) <= mapping.end:
            if memory.read_memory(pid, address, len(_SYSCALL_INSN)) == _SYSCALL_INSN:
                return address
    return None


def find_syscall_instruction(pid: int, mappings: list[Mapping] | None = None) -> int:
    """Address of a ``syscall`` instruction in an executable mapping of process ``pid``.

    Its file offset is cached per build-id (and per file identity, the fast path), so a
    process mapping the same libc only needs a 2-byte read to confirm it. Nothing is
    written into the patient.
    """
    if mappings is None:
        mappings = read_maps(pid)
    for group in _candidate_mappings(mappings):
        executable = [m for m in group if m.executable and m.readable]
        file_key = f"inode:{group[0].dev}:{group[0].inode}"
        address = _confirm_site(pid, executable, _syscall_site_cache.get(file_key))
        if address is not None:
            return address
        build_key = _build_id_key(pid, group)
        address = _confirm_site(pid, executable, _syscall_site_cache.get(build_key))
        if address is None:
            for mapping in executable:
                address = _scan_for_syscall(pid, mapping)
                if address is not None:
                    break
        if address is not None:
            holder = next(m for m in executable if m.contains(address))
            file_offset = holder.offset + address - holder.start
            _syscall_site_cache[build_key] = file_offset
            _syscall_site_cache[file_key] = file_offset
            return address
    raise ProcessError(f"no syscall instruction found in the executable mappings of process {pid}")


def _scan_for_syscall(pid: int, mapping: Mapping) -> int | None:
    position = mapping.start
    while position < mapping.end:
        size = min(_SCAN_CHUNK, mapping.end - position)
        try:
            chunk = memory.read_memory(pid, position, size + (1 if position + size < mapping.end else 0))
        except ProcessError:
            return None
        found = chunk.find(_SYSCALL_INSN)
        if found >= 0:
            return position + found
        position += size
    return None
