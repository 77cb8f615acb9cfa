"""A live process stopped under ptrace: every thread, registers, remote syscalls and calls.

Threads are attached with ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``: no SIGSTOP is ever
sent, so nothing can leak a stop into the patient. Any ptrace-stop counts as stopped
(interrupt, group-stop, clone event, signal delivery); a signal that arrives while we
hold a thread is given back to it when it is resumed, with its original siginfo when the
thread still sits in that signal's delivery stop.

Remote syscalls write nothing into the patient's code: they borrow an existing
``syscall; ret`` pair (bytes ``0f 05 c3``) of an executable mapping (libc's first) and
run it under ``PTRACE_SYSCALL`` (``PTRACE_O_TRACESYSGOOD``): the thread stops at the
call's entry and exit, stops that queue no signal; nothing is ever single-stepped and
no ``int3`` is ever run. Before a thread is borrowed, its signal frame (registers,
signal mask, FPU/AVX state) is written below its stack and the borrowed stack pointer
points at it (:mod:`.sigframe`): if the tracer dies at any instant, the kernel detaches
the thread, which finishes our syscall (or call), returns into libc's ``__restore_rt``
and ``rt_sigreturn`` gives it back its exact state. While a thread runs our code its
asynchronous signals are blocked with ``PTRACE_SETSIGMASK``: they stay queued in the
kernel, siginfo intact, and are delivered normally afterwards. Registers and signal mask
are restored exactly, so a system call the thread was blocked in restarts as if nothing
happened. Engine and tracer call :func:`..faults.point` at each step (fault injection
for the crash-safety tests).

Waiting never uses ``waitpid(-1)`` (that could reap the caller's own children): each
thread is waited for by id, with ``SIGCHLD`` blocked and ``sigtimedwait`` as the wake-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ptrace import PtraceError
from ptrace.binding import func as ptrace_func
from ptrace.binding.linux_struct import user_regs_struct

from .. import faults
from ..errors import PermissionDenied, ProcessError, ProcessGone
from . import memory, realtime, sigframe
from .loaded_objects import group_file_mappings, mapped_objects
from .maps import Mapping, read_maps, read_proc_text

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_SYSCALL = 24
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_GET_SYSCALL_INFO = 0x420E
NT_X86_XSTATE = 0x202
PTRACE_O_TRACESYSGOOD = 0x1
WALL = 0x40000000  # __WALL: wait for threads (clones) too
# Never PTRACE_O_EXITKILL: the patient must outlive the tracer.
_SEIZE_OPTIONS = ptrace_func.PTRACE_O_TRACECLONE | PTRACE_O_TRACESYSGOOD
_SYSCALL_STOP = signal.SIGTRAP | 0x80
_SYSCALL_ENTRY = 1  # PTRACE_SYSCALL_INFO_ENTRY
_SYSCALL_EXIT = 2   # PTRACE_SYSCALL_INFO_EXIT
_XSTATE_BUFFER = 64 * 1024
_FRAME_ROOM = 16 * 1024  # a thread is preferred for remote work with this much stack below it
_MAX_CATCH_UP_ROUNDS = 16
_POLL_CAP = 0.01  # longest sleep between checks when SIGCHLD might go to another thread
_GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})
# Signals blocked in a thread while it runs our code: all but SIGTRAP and the faults (a
# blocked fault would reset the patient's handler).
_BLOCK_DURING_REMOTE = (1 << 64) - 1
for _signo in (signal.SIGTRAP, *(_FAULT_SIGNALS)):
    _BLOCK_DURING_REMOTE &= ~(1 << (_signo - 1))
_SYSCALL_INSN = b"\x0f\x05"
_SYSCALL_RET = b"\x0f\x05\xc3"                                   # syscall; ret
_RESTORERS = (b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05",          # mov $15,%rax; syscall (glibc, musl)
              b"\xb8\x0f\x00\x00\x00\x0f\x05")                  # mov $15,%eax; syscall
CALL_RETURN_STUB = sigframe.CALL_RETURN_STUB
_SCAN_CHUNK = 64 * 1024
_ARG_REGISTERS_SYSCALL = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_ARG_REGISTERS_CALL = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_U64 = (1 << 64) - 1

# File offset of a code pattern, per (pattern, build-id or file identity) of the object holding it.
_syscall_site_cache: dict[str, int] = {}

_libc = ctypes.CDLL(None, use_errno=True)


class RemoteSyscallFailed(ProcessError):
    """A system call made in the patient returned an error; ``errno`` holds its number."""

    def __init__(self, message: str, errno_value: int) -> None:
        super().__init__(message)
        self.errno = errno_value


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@dataclass(frozen=True)
class ReturnSites:
    """Code of the patient a borrowed thread runs: a ``syscall; ret`` pair and ``__restore_rt``."""

    syscall_ret: int
    restorer: int


@dataclass(frozen=True)
class _Borrowed:
    """What a borrowed thread gets back."""

    registers: Registers
    sigmask: int
    xstate: bytes
    ran_code: bool = False           # a function ran: xstate is put back (a system call leaves it alone)


class _StoppedValues:
    """What the tracer read from or wrote to each stopped thread (registers, signal mask,
    FPU state), kept until the thread runs again: a thread in a ptrace-stop cannot change
    them itself, so one read per stop serves every later step (see :meth:`forget`)."""

    def __init__(self) -> None:
        self._values: dict[tuple[int, str], object] = {}

    def get(self, tid: int, kind: str, read: Callable[[], object]) -> object:
        """The thread's value of ``kind``, read with ``read()`` the first time."""
        key = (tid, kind)
        if key not in self._values:
            self._values[key] = read()
        return self._values[key]

    def set(self, tid: int, kind: str, value: object) -> None:
        """The value the tracer has just given the thread."""
        self._values[(tid, kind)] = value

    def drop(self, tid: int, kind: str) -> None:
        """The tracer is changing the thread's value of ``kind`` (unknown until :meth:`set`)."""
        self._values.pop((tid, kind), None)

    def forget(self, tid: int | None = None) -> None:
        """The thread (every thread: None) is about to run: its values may change."""
        if tid is None:
            self._values.clear()
            return
        for key in [key for key in self._values if key[0] == tid]:
            del self._values[key]


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
        self._sites: ReturnSites | None = None
        self._maps: list[Mapping] | None = None   # read once per stop, for the stacks
        # Threads given back at a syscall-exit stop inside a restartable system call: they
        # must pass a signal check on their way out for the kernel to restart it.
        self._restart_pending: set[int] = set()
        self._known = _StoppedValues()     # registers, signal masks, FPU states of stopped threads
        self._sigchld_held = False          # SIGCHLD blocked by stop() until resume
        self._sigchld_was_blocked = False   # ... and it was blocked before
        self._vet: Callable[[int], None] | None = None   # see vet_borrowed_threads
        self._vetted: set[int] = set()      # threads vetted since they last ran their own code
        # The thread remote work takes, for the threads and held signals it was chosen among.
        self._worker: tuple[tuple[frozenset[int], frozenset[int]], int] | None = None
        self._boost: realtime.Boost | None = None    # SCHED_FIFO while the process is held
        self._rooms: dict[int, int] = {}    # stack pointer -> _stack_room (for the maps read)
        # (pretcode, registers, mask, XSAVE area) -> the signal frame built for them, this stop
        self._frames: dict[tuple[int, bytes, int, bytes], tuple[int, bytes]] = {}

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
        if self._sites is None:
            # Found before stopping anything: it costs the patient no pause.
            try:
                self._sites = find_return_sites(self.pid)
            except ProcessError:
                pass  # no usable code: remote_syscall will say so if it is needed
        if self._maps is None:
            try:
                self._maps = read_maps(self.pid)   # the stacks, for the signal frames: read unpaused
                memory.open_memory(self.pid)       # and the descriptor writes go through
            except (ProcessError, ProcessGone, PermissionDenied):
                pass  # stopping says what is wrong
        self._boost = realtime.Boost()
        self._hold_sigchld()
        try:
            listed = self._list_tasks()
            self._stop_started = time.perf_counter_ns()    # the pause starts with the first seize
            self._catch_all_threads(listed)
        except BaseException:
            self._release_all()
            raise
        self._stopped = True

    def _hold_sigchld(self) -> None:
        """Block SIGCHLD until the process is let go (every wait of the stop needs it blocked)."""
        if not self._sigchld_held:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            self._sigchld_held = True
            self._sigchld_was_blocked = signal.SIGCHLD in old_mask

    def _release_sigchld(self) -> None:
        if self._sigchld_held:
            self._sigchld_held = False
            if not self._sigchld_was_blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def _list_tasks(self) -> list[int]:
        try:
            return [int(name) for name in os.listdir(f"/proc/{self.pid}/task")]
        except FileNotFoundError:
            raise ProcessGone(f"process {self.pid} does not exist") from None
        except PermissionError:
            raise PermissionDenied(f"may not inspect process {self.pid}: run as root or with CAP_SYS_PTRACE") from None

    def _catch_all_threads(self, listed: list[int] | None = None) -> None:
        """Seize and stop every thread, listing them again until no new one appears
        (``listed``: the first listing, when already made)."""
        gone: set[int] = set()
        for _ in range(_MAX_CATCH_UP_ROUNDS):
            tasks = listed if listed is not None else self._list_tasks()
            listed = None
            fresh = [tid for tid in tasks if tid not in self._seized and tid not in gone]
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
        with self._sigchld_blocked():
            while pending:
                pending = self._collect_stops(pending, gone)
                if pending:
                    self._await_more_stops(pending, gone, deadline)

    @contextlib.contextmanager
    def _sigchld_blocked(self) -> Iterator[None]:
        """SIGCHLD blocked within the block, so that ``sigtimedwait`` sees it (it is already
        for the whole of a stop: no mask change per wait)."""
        if self._sigchld_held:
            yield
            return
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            yield
        finally:
            if signal.SIGCHLD not in old_mask:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def _collect_stops(self, pending: list[int], gone: set[int]) -> list[int]:
        """One pass over ``pending``: record the stops reported; the threads still to wait for
        (new clones included)."""
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
        return still

    def _await_more_stops(self, pending: list[int], gone: set[int], deadline: float) -> None:
        """Wait (up to the deadline) for the next SIGCHLD; when none comes for a while, drop
        from ``pending`` the zombies that will never report."""
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

    def _ran_own_code(self, tid: int) -> None:
        """``tid`` is resumed into its own code: what was vetted or chosen for it may change."""
        self._vetted.discard(tid)
        self._worker = None

    def _forget_thread(self, tid: int) -> None:
        self._known.forget(tid)
        self._worker = None
        self._seized.discard(tid)
        self._restart_pending.discard(tid)
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
            self._sites = None
            self._forget_maps()
            self._frames.clear()
            self._restart_pending.clear()
            self._known.forget()
            self._vet = None
            self._vetted.clear()
            self._worker = None
            memory.forget_process(self.pid)
            self._release_sigchld()
            if self._boost is not None:
                self._boost.end()
                self._boost = None

    def _end_stop_period(self) -> None:
        if self._stop_started is not None:
            self._paused_ns += time.perf_counter_ns() - self._stop_started
            self._stop_started = None

    def _signal_to_inject(self, tid: int) -> int:
        """The signal to resume ``tid`` with; other held signals are queued again."""
        if tid in self._restart_pending:
            # Resumed from a syscall-exit stop, it would return the -ERESTART* code to the
            # program: an interrupt makes it pass get_signal, where the kernel restarts the
            # call (a detach does the same by itself; a dead tracer's too).
            self._restart_pending.discard(tid)
            self._interrupt(tid)
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
        self._known.forget(tid)
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
        self._forget_maps()       # threads may come and go meanwhile
        parked = self._resume_all()
        self._stop_signal.clear()
        self._end_stop_period()
        self._serve_running(time.monotonic() + seconds, parked)
        self._stop_started = time.perf_counter_ns()
        running = [tid for tid in self._seized if tid not in parked]
        self._interrupt_all(running)
        self._wait_stopped(running, set())
        self._catch_all_threads()

    def _resume_all(self) -> set[int]:
        """Continue every thread (with the signal it stopped for); the threads in a
        group-stop, which stay stopped (not resumed, not interrupted)."""
        parked: set[int] = set()
        for tid in list(self._seized):
            if self._stop_signal.get(tid, 0) == 0 and self._group_stopped.get(tid):
                parked.add(tid)
                continue
            self._cont(tid, self._signal_to_inject(tid))
        return parked

    def _serve_running(self, deadline: float, parked: set[int]) -> None:
        """Until ``deadline``, service the stops of running threads (signals, clones); a
        thread that enters a group-stop joins ``parked``."""
        with self._sigchld_blocked():
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

    def _interrupt_all(self, running: list[int]) -> None:
        """PTRACE_INTERRUPT every thread of ``running`` (one already gone is no error)."""
        for tid in running:
            try:
                ptrace_func.ptrace(PTRACE_INTERRUPT, tid)
            except PtraceError as exc:
                if _errno_of(exc) != errno.ESRCH:
                    raise ProcessError(f"cannot interrupt thread {tid}: {exc}") from None

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
        self._known.forget(tid)
        self._ran_own_code(tid)
        try:
            ptrace_func.ptrace_cont(tid, signo)
        except PtraceError as exc:
            if _errno_of(exc) == errno.ESRCH:
                self._forget_thread(tid)
                return
            raise ProcessError(f"cannot resume thread {tid}: {exc}") from None

    # ---------------------------------------------------------------- registers
    def get_regs(self, tid: int) -> Registers:
        """The general registers of stopped thread ``tid`` (a copy of its own: read once while
        the thread stays stopped)."""
        return self._known.get(tid, "regs", lambda: self._read_regs(tid)).copy()

    def _read_regs(self, tid: int) -> Registers:
        regs = Registers()
        try:
            ptrace_func.ptrace(ptrace_func.PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "read the registers of")
        return regs

    def set_regs(self, tid: int, regs: Registers) -> None:
        """Set the general registers of stopped thread ``tid``."""
        self._known.drop(tid, "regs")
        try:
            ptrace_func.ptrace(ptrace_func.PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "set the registers of")
        self._known.set(tid, "regs", regs.copy())

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
        among = (frozenset(self._seized), frozenset(tid for tid, held in self._pending.items() if held))
        if self._worker is None or self._worker[0] != among:
            self._worker = (among, self._choose_worker())
        return self._worker[1]

    def _choose_worker(self) -> int:
        """The thread remote work takes (chosen again when a thread runs its own code or
        the threads or their held signals change)."""
        # Prefer a thread not sitting in a signal's delivery-stop (running our code there
        # would make us re-send that signal instead of letting the kernel deliver it) and
        # not inside a system call (nothing to restart, see sigframe).
        # The thread must have room on its own stack for the signal frame (see _stack_room).
        free = [tid for tid in self.tids if not self._pending.get(tid)] or self.tids
        registers = {tid: self.get_regs(tid) for tid in free}
        roomy = [tid for tid in free if self._stack_room(registers[tid].rsp) >= _FRAME_ROOM] or free
        for candidate in roomy:
            if sigframe.signed(registers[candidate].orig_rax) < 0:
                return candidate
        return roomy[0]

    def _forget_maps(self) -> None:
        self._maps = None
        self._rooms.clear()

    def _stack_room(self, stack_pointer: int) -> int:
        """Bytes below ``stack_pointer`` down to the start of its (writable) mapping.

        The frame goes where the kernel would put a signal frame for a signal arriving
        now, and is as big (every stack a program runs on must have that room, signals
        may come at any time); but it must not leave the mapping, which the kernel would
        grow and we cannot. A thread with a lot of room (a thread or main stack) is
        preferred over one on a small buffer (a coroutine, a sigaltstack)."""
        room = self._rooms.get(stack_pointer)
        if room is None:
            if self._maps is None:
                self._maps = read_maps(self.pid)
            holder = next((m for m in self._maps if m.start < stack_pointer <= m.end), None)
            room = stack_pointer - holder.start if holder is not None and holder.writable else 0
            self._rooms[stack_pointer] = room
        return room

    def _set_sigmask(self, tid: int, value: int) -> None:
        mask = ctypes.c_uint64(value)
        self._known.drop(tid, "sigmask")
        try:
            ptrace_func.ptrace(PTRACE_SETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "set the signal mask of")
        self._known.set(tid, "sigmask", value)

    def _hold_signal(self, tid: int, signo: int) -> None:
        self._pending.setdefault(tid, []).append(signo)

    def _wait_thread(self, tid: int, deadline: float | None) -> int:
        """The next stop status of ``tid`` (a ptrace-stop); ProcessGone if it exits."""
        if deadline is None:
            status = self._waitpid(tid)
        else:
            status = None
            with self._sigchld_blocked():
                while status is None:
                    status = self._waitpid(tid, os.WNOHANG)
                    if status is None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise TimeoutError
                        signal.sigtimedwait({signal.SIGCHLD}, min(remaining, _POLL_CAP))
        if status is None or status < 0:
            raise ProcessGone(f"thread {tid} of process {self.pid} exited during a remote operation")
        return status

    def _return_sites(self) -> ReturnSites:
        """The ``syscall; ret`` pair and ``__restore_rt`` in the patient (found once per stop)."""
        if self._sites is None:
            self._sites = find_return_sites(self.pid)
        return self._sites

    @property
    def syscall_address(self) -> int:
        """Where remote system calls are made: the ``syscall`` of the ``syscall; ret`` pair
        borrowed threads run (what a seccomp filter sees, plus 2, as the instruction pointer)."""
        return self._return_sites().syscall_ret

    def remote_syscall(self, nr: int, *args: int, tid: int | None = None) -> int:
        """Make thread ``tid`` execute system call ``nr`` with ``args``; its raw ``rax``.

        The thread runs libc's own ``syscall; ret`` under ``PTRACE_SYSCALL`` (no
        single-step, no trap): it stops at the call's entry and exit, which queue no
        signal. Its registers are restored exactly, so a blocking syscall it was in is
        restarted normally when it runs again; had the tracer died meanwhile, the signal
        frame written first would have restored them (see :mod:`.sigframe`).
        """
        if len(args) > len(_ARG_REGISTERS_SYSCALL):
            raise ValueError("a system call takes at most 6 arguments")
        tid = self._default_tid(tid)
        sites = self._return_sites()

        def borrowed_for_syscall(regs: Registers) -> None:
            regs.rip = sites.syscall_ret
            regs.rax = nr
            for name, value in zip(_ARG_REGISTERS_SYSCALL, args, strict=False):
                setattr(regs, name, value & _U64)

        borrowed = self._borrow(tid, sites.restorer, borrowed_for_syscall)
        at = 0
        try:
            result = self._run_remote_syscall(tid, nr)
            at = _SYSCALL_EXIT
        finally:
            self._give_back(tid, borrowed, at)
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

    def remote_call(self, function: int, args: tuple[int, ...], return_stub: int, tid: int | None = None) -> int:
        """Call ``function(*args)`` in thread ``tid`` of the patient; its ``rax``.

        The call returns to ``return_stub``, where the caller has placed
        :data:`CALL_RETURN_STUB` (it keeps the result in ``rdi`` and calls
        ``rt_sigreturn``): the result is read at that syscall's entry stop, and the
        thread's registers come back exactly. The stack pointer is moved below the red
        zone and the signal frame, aligned as the ABI wants. Other threads stay stopped,
        so a function that waits for a lock held by one of them times out with ProcessError.
        """
        if len(args) > len(_ARG_REGISTERS_CALL):
            raise ValueError("remote_call passes at most 6 arguments")
        tid = self._default_tid(tid)

        def borrowed_for_call(regs: Registers) -> None:
            regs.rip = function
            for name, value in zip(_ARG_REGISTERS_CALL, args, strict=False):
                setattr(regs, name, value & _U64)

        borrowed = self._borrow(tid, return_stub, borrowed_for_call, runs_code=True)
        at = 0
        try:
            result = self._run_remote_call(tid, return_stub + len(sigframe.CALL_RETURN_STUB))
            at = _SYSCALL_ENTRY      # of the stub's rt_sigreturn
        finally:
            self._give_back(tid, borrowed, at)
        return result

    def mmap(self, address: int, length: int, prot: int, flags: int) -> int:
        """Remote ``mmap(address, length, prot, flags, -1, 0)``; the mapped address."""
        return self.remote_syscall(9, address, length, prot, flags, _U64, 0)

    def munmap(self, address: int, length: int) -> None:
        """Remote ``munmap(address, length)``."""
        self.remote_syscall(11, address, length)

    def mprotect(self, address: int, length: int, prot: int) -> None:
        """Remote ``mprotect(address, length, prot)``."""
        self.remote_syscall(10, address, length, prot)

    # ---------------------------------------------------------------- borrowing a thread
    def vet_borrowed_threads(self, vet: Callable[[int], None], *, now: bool = True) -> None:
        """Until the process is let go, ``vet(tid)`` is called before thread ``tid`` first runs
        the tracer's code (remote syscalls and calls), and again after it has run its own
        code; it raises to refuse, before the thread is touched. The thread remote work
        takes now is vetted at once, unless ``now`` is False (a stop that may make no
        remote call: each thread is vetted when it is about to).

        The engine checks the patient's seccomp filters this way: a filter is per thread and
        only the threads made to run our system calls are subject to theirs."""
        self._vet = vet
        self._vetted.clear()
        if now:
            self.vet_thread(self._default_tid(None))

    def vet_thread(self, tid: int) -> None:
        """Vet ``tid`` (see :meth:`vet_borrowed_threads`) unless it was since it last ran its
        own code; for a thread about to run code of the tracer's choosing some other way."""
        if self._vet is not None and tid not in self._vetted:
            self._vet(tid)
            self._vetted.add(tid)

    def _borrow(self, tid: int, pretcode: int, prepare: Callable[[Registers], None], *,
                runs_code: bool = False) -> _Borrowed:
        """Write the thread's signal frame below its stack, then give it our registers
        (stack pointer on the frame, ``pretcode`` its first word) and block its signals.
        ``runs_code``: it will run a function of the patient, whose FPU state is given back too."""
        self.vet_thread(tid)
        saved = self.get_regs(tid)
        saved_mask = self._get_sigmask(tid)
        xstate = self._get_xstate(tid)
        frame, frame_bytes = self._frame(saved, saved_mask, xstate, pretcode, tid)
        if self._stack_room(saved.rsp) < saved.rsp - frame:
            raise ProcessError(f"thread {tid} of process {self.pid} has no room for a signal frame below its stack "
                               f"pointer {saved.rsp:#x} in its mapping; try again")
        self.write(frame, frame_bytes)
        regs = saved.copy()
        regs.rsp = frame
        regs.rax = 0
        regs.orig_rax = _U64  # -1: not in a syscall, so nothing is "restarted" into ours
        prepare(regs)
        self.set_regs(tid, regs)
        faults.point("borrow", self.pid)
        # Blocked after the registers are ours: the frame restores the mask too.
        self._set_sigmask(tid, saved_mask | _BLOCK_DURING_REMOTE)
        return _Borrowed(saved, saved_mask, xstate, runs_code)

    def _frame(self, saved: Registers, mask: int, xstate: bytes, pretcode: int, tid: int) -> tuple[int, bytes]:
        """(address, bytes) of the signal frame that gives the thread back ``saved``,
        ``mask`` and ``xstate`` (built once per stop for the same values)."""
        key = (pretcode, bytes(saved), mask, xstate)
        built = self._frames.get(key)
        if built is None:
            try:
                built = sigframe.build_frame(_register_values(saved), mask, xstate, pretcode)
            except sigframe.FrameError as exc:
                raise ProcessError(f"cannot borrow thread {tid} of process {self.pid} safely: {exc}") from None
            self._frames[key] = built
        return built

    def _give_back(self, tid: int, borrowed: _Borrowed, at: int = 0) -> None:
        """Restore a borrowed thread's signal mask, then its registers; safe at every instant.

        At a syscall-entry stop the kernel would still run the call in ``orig_rax``:
        the thread first gets its restarted registers with ``orig_rax`` -1 (the call is
        skipped) and is taken to the exit stop. The restart of a system call the thread
        was in happens on the way out of a signal check; a syscall-exit stop is not one,
        so the thread is interrupted (which makes it pass one) before it is resumed, when it
        needs a restart (:meth:`_signal_to_inject`). ``at``: the syscall stop the thread is
        known to sit in (:data:`_SYSCALL_ENTRY`, :data:`_SYSCALL_EXIT`; 0: ask the kernel).
        """
        if tid not in self._seized:
            return
        self._set_sigmask(tid, borrowed.sigmask)
        faults.point("give-back", self.pid)
        saved = borrowed.registers
        values = _register_values(saved)
        operation = at or self._syscall_stop_kind(tid)
        if operation == _SYSCALL_ENTRY:
            skipping = saved.copy()
            for name, value in sigframe.resumed_registers(values).items():
                setattr(skipping, name, value)
            if sigframe.signed(values["orig_rax"]) >= 0 and sigframe.signed(values["rax"]) == sigframe.RESTART_BLOCK:
                skipping.rax = sigframe.SYS_RESTART_SYSCALL  # the restart block is intact here
                skipping.rip = (saved.rip - sigframe.SYSCALL_INSN_SIZE) & _U64
            skipping.orig_rax = _U64
            self.set_regs(tid, skipping)
            if not self._to_syscall_exit(tid):
                return
            operation = _SYSCALL_EXIT
        self.set_regs(tid, saved)
        if borrowed.ran_code:
            self._set_xstate(tid, borrowed.xstate)
        else:
            self._known.set(tid, "xstate", borrowed.xstate)     # system calls leave it as it was
        if operation == _SYSCALL_EXIT and sigframe.in_restartable_syscall(values):
            self._restart_pending.add(tid)    # see _signal_to_inject
        else:
            self._restart_pending.discard(tid)

    def _to_syscall_exit(self, tid: int) -> bool:
        """Resume ``tid`` from a syscall-entry stop to its exit stop; False if it is gone."""
        deadline = time.monotonic() + self.timeout
        while True:
            self._resume_to_syscall(tid)
            try:
                kind, signo = self._await_remote_stop(tid, deadline)
            except (ProcessGone, TimeoutError):
                return False
            if kind == "syscall":
                return True
            if kind == "signal" and signo not in _FAULT_SIGNALS:
                self._hold_signal(tid, signo)

    def _run_remote_syscall(self, tid: int, nr: int) -> int:
        """Run the borrowed thread through our syscall's entry and exit stops; its ``rax``."""
        deadline = time.monotonic() + self.timeout
        entered = False
        for _ in range(64):
            self._resume_to_syscall(tid)
            kind, signo = self._await_remote_stop(tid, deadline, lambda: ProcessError(
                f"remote syscall in thread {tid} of process {self.pid} did not return within {self.timeout} s"))
            if kind == "event":
                continue  # a stray interrupt or group stop: go on
            if kind == "signal":
                if signo in _FAULT_SIGNALS:
                    raise ProcessError(f"remote syscall in thread {tid} faulted with signal {signo}")
                self._hold_signal(tid, signo)  # not ours: give it back on resume
                continue
            regs = self.get_regs(tid)
            if not entered:
                if regs.orig_rax != nr:
                    raise ProcessError(f"remote syscall in thread {tid} of process {self.pid} entered "
                                       f"system call {signed64(regs.orig_rax)} instead of {nr}")
                entered = True
                faults.point("syscall-entry", self.pid)
                continue
            faults.point("syscall-exit", self.pid)
            return regs.rax
        raise ProcessError(f"remote syscall in thread {tid} of process {self.pid} did not complete")

    def _run_remote_call(self, tid: int, return_rip: int) -> int:
        """Run the borrowed thread until the return stub's ``rt_sigreturn`` entry; the result."""
        deadline = time.monotonic() + self.timeout
        while True:
            self._resume_to_syscall(tid)
            kind, signo = self._await_remote_stop(tid, deadline, lambda: ProcessError(
                f"remote call in thread {tid} of process {self.pid} did not return within {self.timeout} s"))
            if kind == "event":
                continue
            if kind == "syscall":
                regs = self.get_regs(tid)
                if (regs.rip == return_rip and regs.orig_rax == sigframe.SYS_RT_SIGRETURN
                        and self._syscall_stop_kind(tid) == _SYSCALL_ENTRY):
                    faults.point("call-return", self.pid)
                    return getattr(regs, sigframe.CALL_RESULT_REGISTER)
                continue  # a system call the function makes itself
            if signo in _FAULT_SIGNALS or signo == signal.SIGTRAP:
                regs = self.get_regs(tid)
                raise ProcessError(
                    f"remote call in thread {tid} of process {self.pid} crashed with "
                    f"{signal.Signals(signo).name} at {regs.rip:#x}"
                )
            self._hold_signal(tid, signo)

    def _resume_to_syscall(self, tid: int) -> None:
        self._known.forget(tid)
        try:
            ptrace_func.ptrace(PTRACE_SYSCALL, tid, 0, 0)
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "resume")

    def _await_remote_stop(self, tid: int, deadline: float,
                           on_timeout: Callable[[], Exception] | None = None) -> tuple[str, int]:
        """The next stop of a thread running our code: ("syscall" | "event" | "signal",
        signal). Past ``deadline`` it is interrupted (its stop recorded) and
        ``on_timeout()`` raised (TimeoutError without it)."""
        try:
            status = self._wait_thread(tid, deadline)
        except TimeoutError:
            self._interrupt(tid)
            try:
                status = self._wait_thread(tid, time.monotonic() + self.timeout)
            except (ProcessGone, TimeoutError):
                status = None
            if status is not None:
                self._record_remote_stop(tid, status)
            raise (on_timeout() if on_timeout else TimeoutError()) from None
        return self._record_remote_stop(tid, status)

    def _record_remote_stop(self, tid: int, status: int) -> tuple[str, int]:
        event = status >> 16
        signo = os.WSTOPSIG(status)
        if event == 0 and signo == _SYSCALL_STOP:
            self._stop_signal[tid] = 0
            return "syscall", 0
        if event != 0:
            self._stop_signal[tid] = 0
            return "event", 0
        self._stop_signal[tid] = signo
        return "signal", signo

    def _interrupt(self, tid: int) -> None:
        try:
            ptrace_func.ptrace(PTRACE_INTERRUPT, tid)
        except PtraceError:
            pass

    def _syscall_stop_kind(self, tid: int) -> int:
        """``PTRACE_GET_SYSCALL_INFO``'s op for stopped ``tid``: entry, exit, or 0 (no syscall stop)."""
        info = (ctypes.c_uint8 * 88)()
        try:
            ptrace_func.ptrace(PTRACE_GET_SYSCALL_INFO, tid, ctypes.sizeof(info), ctypes.addressof(info))
        except PtraceError:
            return 0
        return info[0]

    def _get_sigmask(self, tid: int) -> int:
        return self._known.get(tid, "sigmask", lambda: self._read_sigmask(tid))

    def _read_sigmask(self, tid: int) -> int:
        mask = ctypes.c_uint64()
        try:
            ptrace_func.ptrace(PTRACE_GETSIGMASK, tid, ctypes.sizeof(mask), ctypes.addressof(mask))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "read the signal mask of")
        return mask.value

    def _get_xstate(self, tid: int) -> bytes:
        """The thread's XSAVE area (``PTRACE_GETREGSET NT_X86_XSTATE``, standard format)."""
        return self._known.get(tid, "xstate", lambda: self._read_xstate(tid))

    def _read_xstate(self, tid: int) -> bytes:
        buffer = _xstate_buffer()
        vector = _IoVec(ctypes.addressof(buffer), _XSTATE_BUFFER)
        try:
            ptrace_func.ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(vector))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "read the FPU state of")
        return ctypes.string_at(buffer, vector.iov_len)

    def _set_xstate(self, tid: int, xstate: bytes) -> None:
        """Give the thread back its XSAVE area (after running a function of the patient,
        which may change vector registers and control words the ABI lets it clobber)."""
        buffer = ctypes.create_string_buffer(xstate, len(xstate))
        vector = _IoVec(ctypes.addressof(buffer), len(xstate))
        self._known.drop(tid, "xstate")
        try:
            ptrace_func.ptrace(PTRACE_SETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(vector))
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "restore the FPU state of")
        self._known.set(tid, "xstate", xstate)

    # --- run one thread to an address (issue 9) ---
    _O_TRACESYSGOOD = 0x1    # syscall stops report SIGTRAP | 0x80

    def run_thread_to_syscall(self, tid: int, rip_after: int, nr: int, deadline: float,
                              on_arrival: Callable[[Registers], None]) -> str:
        """Let thread ``tid`` alone run (the others stay stopped) until it enters system
        call ``nr`` from the ``syscall`` instruction that ends at ``rip_after``; there,
        ``on_arrival`` edits its registers, the call is skipped and the thread is taken to
        the (empty) syscall-exit stop, so it resumes from the edited registers.

        Returns ``"arrived"``, ``"timeout"`` (stopped again wherever it was at
        ``deadline``), ``"stopped"`` (it entered a job-control stop: left so) or ``"gone"``
        (it exited). Signals for it are delivered as usual; threads it creates are
        attached and left stopped. It runs under ``PTRACE_SYSCALL``: if the tracer dies
        meanwhile, the kernel detaches it and it simply runs on.
        """
        if tid not in self._seized or self._group_stopped.get(tid):
            return "stopped" if tid in self._seized else "gone"
        try:
            ptrace_func.ptrace_setoptions(tid, _SEIZE_OPTIONS | self._O_TRACESYSGOOD)
        except PtraceError as exc:
            self._raise_thread_error(tid, exc, "set the ptrace options of")
        try:
            outcome = self._run_to_syscall(tid, rip_after, nr, deadline)
            if outcome == "arrived":
                regs = self.get_regs(tid)
                on_arrival(regs)
                regs.orig_rax = _U64             # skip the marker syscall itself
                self.set_regs(tid, regs)
                outcome = self._finish_syscall(tid)
            return outcome
        finally:
            if tid in self._seized:
                try:
                    ptrace_func.ptrace_setoptions(tid, _SEIZE_OPTIONS)
                except PtraceError:
                    pass

    def _resume_to_next_syscall_stop(self, tid: int, signo: int) -> bool:
        self._stop_signal[tid] = 0
        self._known.forget(tid)
        self._ran_own_code(tid)         # (run_thread_to_syscall)
        try:
            ptrace_func.ptrace_syscall(tid, signo)
        except PtraceError as exc:
            if _errno_of(exc) == errno.ESRCH:
                self._forget_thread(tid)
                return False
            raise ProcessError(f"cannot resume thread {tid}: {exc}") from None
        return True

    def _finish_syscall(self, tid: int) -> str:
        """From a syscall-entry stop to that call's exit stop (nothing runs in user space)."""
        if not self._resume_to_next_syscall_stop(tid, 0):
            return "gone"
        try:
            status = self._wait_thread(tid, time.monotonic() + self.timeout)
        except TimeoutError:
            self._interrupt_running(tid)
            return "arrived"
        except ProcessGone:
            return "gone"
        if status >> 16 == 0 and os.WSTOPSIG(status) != signal.SIGTRAP | 0x80:
            self._stop_signal[tid] = os.WSTOPSIG(status)
            self._hold_signal(tid, os.WSTOPSIG(status))
        return "arrived"

    def _interrupt_running(self, tid: int) -> None:
        """Stop ``tid``, which runs under ``PTRACE_SYSCALL``; a syscall stop reached on the
        way counts as stopped (it is no signal to give back)."""
        try:
            ptrace_func.ptrace(PTRACE_INTERRUPT, tid)
        except PtraceError:
            self._forget_thread(tid)
            return
        try:
            status = self._wait_thread(tid, time.monotonic() + self.timeout)
        except (TimeoutError, ProcessGone):
            return
        event = status >> 16
        stop_signal = os.WSTOPSIG(status)
        self._stop_signal[tid] = 0
        if event == 0 and stop_signal != signal.SIGTRAP | 0x80:
            self._stop_signal[tid] = stop_signal
            self._hold_signal(tid, stop_signal)
        elif event == PTRACE_EVENT_STOP and stop_signal in _GROUP_STOP_SIGNALS:
            self._group_stopped[tid] = True

    def _run_to_syscall(self, tid: int, rip_after: int, nr: int, deadline: float) -> str:
        signo = self._signal_to_inject(tid)
        while True:
            if not self._resume_to_next_syscall_stop(tid, signo):
                return "gone"
            try:
                status = self._wait_thread(tid, deadline)
            except TimeoutError:
                self._interrupt_running(tid)
                return "timeout" if tid in self._seized else "gone"
            except ProcessGone:
                return "gone"
            outcome, signo = self._syscall_run_stop(tid, status, rip_after, nr)
            if outcome is not None:
                return outcome

    def _syscall_run_stop(self, tid: int, status: int, rip_after: int, nr: int) -> tuple[str | None, int]:
        """One stop of a thread run to a syscall: ("arrived" or "stopped", 0) when the run
        ends here, else (None, the signal to deliver when it is resumed)."""
        event = status >> 16
        stop_signal = os.WSTOPSIG(status)
        if event == 0 and stop_signal == signal.SIGTRAP | 0x80:      # a syscall stop
            regs = self.get_regs(tid)
            return ("arrived" if regs.rip == rip_after and regs.orig_rax == nr else None), 0
        if event == ptrace_func.PTRACE_EVENT_CLONE:
            new_tid = ptrace_func.ptrace_geteventmsg(tid)
            if new_tid and new_tid not in self._seized:
                self._seized.add(new_tid)
                self._wait_stopped([new_tid], set())
            return None, 0
        if event == PTRACE_EVENT_STOP:
            if stop_signal in _GROUP_STOP_SIGNALS:
                self._group_stopped[tid] = True
                return "stopped", 0
            return None, 0
        if event == 0:
            return None, stop_signal            # the thread's own signal: delivered as usual
        return None, 0

class StoppedThread(StoppedProcess):
    """One thread of the process stopped under ptrace, the others running on: for remote
    work (system calls, calls) that needs no other thread held, such as filling a new,
    unreferenced mapping. Everything :class:`StoppedProcess` guarantees for a thread it
    borrows holds; ``paused_ns`` counts the time that one thread was held.

    The thread taken is one without a seccomp filter if there is one (filters are per
    thread: the tracer's system calls are judged by that thread's only), then one that is
    running or runnable, so that no blocking system call is interrupted, then the main
    thread; never an exited one. Not :meth:`run_for` (it holds no other thread)."""

    def _list_tasks(self) -> list[int]:
        if self._seized:
            return sorted(self._seized)
        tasks = super()._list_tasks()
        ranks = {tid: self._rank(tid) for tid in tasks}
        live = sorted((tid for tid in tasks if ranks[tid] is not None), key=lambda tid: ranks[tid])
        return live[:1] or tasks[:1]

    def _rank(self, tid: int) -> tuple[bool, bool, bool] | None:
        """How little taking thread ``tid`` disturbs (lower is better); None if it has exited."""
        try:
            status = read_proc_text(self.pid, f"task/{tid}/status")
        except (ProcessGone, PermissionDenied, ProcessError):
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        state = fields.get("State", "").strip()[:1]
        if state in ("", "Z", "X"):
            return None
        return fields.get("Seccomp", "0").strip() != "0", state != "R", tid != self.pid

    def run_for(self, seconds: float) -> None:
        raise ProcessError(f"process {self.pid}: only one thread is held, the others run already")


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


def _confirm_site(pid: int, executable: list[Mapping], file_offset: int | None, pattern: bytes) -> int | None:
    """The address of ``file_offset`` in these mappings if it holds ``pattern`` there."""
    if file_offset is None:
        return None
    for mapping in executable:
        address = mapping.start + file_offset - mapping.offset
        if mapping.start <= address and address + len(pattern) <= mapping.end:
            if memory.read_memory(pid, address, len(pattern)) == pattern:
                return address
    return None


def _find_code(pid: int, patterns: tuple[bytes, ...], what: str, mappings: list[Mapping] | None = None) -> int:
    """Address of one of ``patterns`` (any byte offset: the CPU decodes from where it is
    sent) in an executable mapping of process ``pid``, libc first.

    Its file offset is cached per build-id (and per file identity, the fast path), so a
    process mapping the same libc only needs a short read to confirm it. Nothing is
    written into the patient.
    """
    if mappings is None:
        mappings = read_maps(pid)
    for group in _candidate_mappings(mappings):
        executable = [m for m in group if m.executable and m.readable]
        for pattern in patterns:
            file_key = f"inode:{group[0].dev}:{group[0].inode}:{pattern.hex()}"
            address = _confirm_site(pid, executable, _syscall_site_cache.get(file_key), pattern)
            if address is not None:
                return address
            build_key = f"{_build_id_key(pid, group)}:{pattern.hex()}"
            address = _confirm_site(pid, executable, _syscall_site_cache.get(build_key), pattern)
            if address is None:
                for mapping in executable:
                    address = _scan_for(pid, mapping, pattern)
                    if address is not None:
                        break
            if address is not None:
                holder = next(m for m in executable if m.contains(address))
                file_offset = holder.offset + address - holder.start
                _syscall_site_cache[build_key] = file_offset
                _syscall_site_cache[file_key] = file_offset
                return address
    raise ProcessError(f"no {what} found in the executable mappings of process {pid}: "
                       "it cannot be patched safely")


def find_syscall_instruction(pid: int, mappings: list[Mapping] | None = None) -> int:
    """Address of a ``syscall; ret`` pair in an executable mapping of process ``pid``
    (a ``syscall`` instruction that returns to the address on the stack)."""
    return _find_code(pid, (_SYSCALL_RET,), "'syscall; ret' instruction pair", mappings)


def find_return_sites(pid: int, mappings: list[Mapping] | None = None) -> ReturnSites:
    """The ``syscall; ret`` pair and the ``rt_sigreturn`` restorer (``__restore_rt``) of ``pid``."""
    if mappings is None:
        mappings = read_maps(pid)
    return ReturnSites(find_syscall_instruction(pid, mappings),
                       _find_code(pid, _RESTORERS, "rt_sigreturn restorer (mov $15,%rax; syscall)", mappings))


_xstate_buffers: list = []


def _xstate_buffer():
    """One reusable buffer for PTRACE_GETREGSET NT_X86_XSTATE (a tracer runs one thread)."""
    if not _xstate_buffers:
        _xstate_buffers.append(ctypes.create_string_buffer(_XSTATE_BUFFER))
    return _xstate_buffers[0]


def _register_values(regs: Registers) -> dict[str, int]:
    return {name: getattr(regs, name) for name, _ in user_regs_struct._fields_}


def _scan_for(pid: int, mapping: Mapping, pattern: bytes) -> int | None:
    position = mapping.start
    while position < mapping.end:
        size = min(_SCAN_CHUNK, mapping.end - position)
        try:
            chunk = memory.read_memory(pid, position, min(size + len(pattern) - 1, mapping.end - position))
        except ProcessError:
            return None
        found = chunk.find(pattern)
        if found >= 0:
            return position + found
        position += size
    return None
