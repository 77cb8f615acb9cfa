"""Patch or unpatch many processes at once: forked workers, one tracer each.

ptrace belongs to the tracing thread, and the engine is CPU-bound Python, so
parallelism means processes. :func:`run_parallel` does it in four steps:

1. :func:`warm_up`        the parent runs the per-process function itself on one
                          process of each distinct executable: every per-build-id
                          cache (parsed ELF files, symbol tables, CFI search tables,
                          patch images) is filled once, before forking;
2. :func:`_spawn_worker`  ``os.fork`` ``jobs`` workers; they inherit those caches
                          (copy-on-write) and take process indices from one task
                          pipe, so a slow process holds up one worker only. A cached
                          ELF file is read lazily through its open file, whose offset
                          forked processes would share: each worker first gives
                          every cached file a private offset (:func:`reopen_privately`);
3. :func:`_collect`       each worker reports ``start`` (index) then ``done`` (index,
                          pickled result) on its own pipe; the parent reads them all;
4. a worker that dies (crash, signal) costs only the process it was handling: that
   one becomes a ``failed`` result naming the worker's fate, and a replacement
   worker takes the rest of the queue.

The function is the same per-process function the serial path calls (for example
``operations._safely`` bound to ``engine.patch_process``): it takes a pid and returns a
:class:`ProcessResult`; an exception it raises becomes a failed result too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pickle
import resource
import selectors
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..results import ProcessResult
from . import object_files

TASK = struct.Struct("<I")               # one process index on the task pipe
FRAME = struct.Struct("<Q")              # length prefix of one message on a result pipe
TASK_BATCH = 1024                        # indices per write: 4 KiB = PIPE_BUF, atomic
MAX_WARM_EXECUTABLES = 4                 # warm-up runs in the parent, serially: keep it short
MIN_PARALLEL = 4                         # fewer processes than this: no fork, run serially
_START = "start"
_DONE = "done"


@dataclass
class FleetStats:
    """What a :func:`run_parallel` call did, for benchmarks and logs."""

    jobs: int = 0
    warmed: int = 0                       # processes handled by the parent to warm the caches
    workers_started: int = 0              # including replacements of dead workers
    workers_died: int = 0
    parent_maxrss_kb: int = 0             # ru_maxrss of the parent at the end
    worker_maxrss_kb: list[int] = field(default_factory=list)   # per reaped worker

    @property
    def total_maxrss_kb(self) -> int:
        """Parent plus every worker: an upper bound (copy-on-write pages count in each)."""
        return self.parent_maxrss_kb + sum(self.worker_maxrss_kb)


@dataclass
class _Worker:
    pid: int
    result_fd: int
    buffer: bytearray = field(default_factory=bytearray)
    handling: int | None = None           # index started but not reported done


def _read_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as stream:
            return stream.read().strip()
    except OSError:
        return ""


def failed_result(pid: int, reason: str) -> ProcessResult:
    """A result saying process ``pid`` could not be handled, and why."""
    return ProcessResult(pid=pid, comm=_read_comm(pid), error=reason)


def _call(function: Callable[[int], ProcessResult], pid: int) -> ProcessResult:
    try:
        return function(pid)
    except Exception as exc:   # the function should not raise; if it does, only this process fails
        return failed_result(pid, f"internal error: {type(exc).__name__}: {exc}")


def _executable(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def warm_up(function: Callable[[int], ProcessResult], pids: Sequence[int],
            limit: int = MAX_WARM_EXECUTABLES) -> dict[int, ProcessResult]:
    """Step 1: run ``function`` in this process on the first process of each distinct
    executable (at most ``limit``); results by index.

    Doing one process for real parses everything the others of the same program need
    (objects by build-id, CFI tables, the patch image), in the parent, so the forked
    workers inherit it instead of each parsing it again.
    """
    seen: set[str] = set()
    done: dict[int, ProcessResult] = {}
    for index, pid in enumerate(pids):
        if len(done) >= limit:
            break
        executable = _executable(pid)
        if not executable or executable in seen:
            continue
        seen.add(executable)
        done[index] = _call(function, pid)
    return done


def run_parallel(function: Callable[[int], ProcessResult], pids: list[int], jobs: int | None = None, *,
                 stats: FleetStats | None = None) -> list[ProcessResult]:
    """``function(pid)`` for every pid, in ``jobs`` forked workers (default: one per CPU);
    the results in the order of ``pids``.

    Never raises for one process: a worker that crashes or is killed turns the process
    it was handling into a failed result (the others go on); a process that exits
    meanwhile is the function's to report (the engine says so). A pid given twice is
    handled once (two tracers must not race for it); both places get its result.
    ``stats``, if given, is filled with what the run did.
    """
    stats = stats if stats is not None else FleetStats()
    jobs = max(1, jobs or os.cpu_count() or 1)
    stats.jobs = jobs
    unique = list(dict.fromkeys(pids))
    results: dict[int, ProcessResult] = warm_up(function, unique) if len(unique) > 1 else {}
    stats.warmed = len(results)
    pending = [index for index in range(len(unique)) if index not in results]
    if jobs == 1 or len(pending) < MIN_PARALLEL:
        for index in pending:
            results[index] = _call(function, unique[index])
    else:
        results.update(_run_workers(function, unique, pending, min(jobs, len(pending)), stats))
    stats.parent_maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    by_pid = {pid: results.get(index) or failed_result(pid, "not handled: its worker died before taking it")
              for index, pid in enumerate(unique)}
    return [by_pid[pid] for pid in pids]


# ---------------------------------------------------------------------------- workers
def reopen_privately(streams: list) -> None:
    """Give each open file of ``streams`` its own file offset, in this process only.

    After fork, parent and children share every open file description, offsets
    included: two workers seeking and reading one cached ELF file would read each
    other's bytes. Reopening through ``/proc/self/fd`` makes a new description of the
    same file (deleted files too); ``dup2`` puts it under the same descriptor number,
    so every object holding the stream (pyelftools' sections too) keeps working.
    """
    for stream in streams:
        try:
            fd = stream.fileno()
            private = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError):
            continue
        os.dup2(private, fd, inheritable=False)
        os.close(private)
        stream.seek(0, os.SEEK_END)    # drops the read buffer: the next read seeks afresh


def _cached_streams() -> list:
    return [parsed._stream for parsed in object_files._cache.values()]


def _spawn_worker(function: Callable[[int], ProcessResult], pids: Sequence[int], task_fd: int,
                  inherited: list[int]) -> _Worker:
    """Step 2: fork one worker that handles indices read from ``task_fd``."""
    result_read, result_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:   # pragma: no cover - runs in the child, which leaves through os._exit
        status = 0
        try:
            os.close(result_read)
            for fd in inherited:
                with contextlib.suppress(OSError):
                    os.close(fd)
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # finish the process in hand; the parent stops the queue
            reopen_privately(_cached_streams())
            _work(function, pids, task_fd, result_write)
        except BaseException:
            status = 70
        finally:
            os._exit(status)
    os.close(result_write)
    return _Worker(child, result_read)


def _work(function: Callable[[int], ProcessResult], pids: Sequence[int], task_fd: int, result_fd: int) -> None:
    while True:
        record = _read_exactly(task_fd, TASK.size)
        if record is None:
            return
        (index,) = TASK.unpack(record)
        _send(result_fd, (_START, index))
        result = _call(function, pids[index])
        try:
            _send(result_fd, (_DONE, index, result))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _send(result_fd, (_DONE, index, failed_result(pids[index], f"internal error: result not picklable: "
                                                                        f"{exc}")))


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = os.read(fd, size - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return data


def _send(fd: int, message: tuple) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(FRAME.pack(len(payload)) + payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _death_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status:#x}"


class _WorkerPool:
    """The task pipe, the workers reading it and the results they sent (steps 2-4 of ``_run_workers``)."""

    def __init__(self, function: Callable[[int], ProcessResult], pids: Sequence[int], pending: list[int],
                 stats: FleetStats) -> None:
        self.function = function
        self.pids = pids
        self.pending = pending
        self.stats = stats
        self.task_read, self.task_write = os.pipe()
        os.set_blocking(self.task_write, False)
        with contextlib.suppress(OSError):   # room for every index at once when the system allows it
            fcntl.fcntl(self.task_write, fcntl.F_SETPIPE_SZ,
                        min(1 << 20, max(1 << 16, TASK.size * len(pending))))
        self.queue = b"".join(TASK.pack(index) for index in pending)
        self.results: dict[int, ProcessResult] = {}
        self.workers: dict[int, _Worker] = {}          # by result fd
        self.selector = selectors.DefaultSelector()

    def spawn(self) -> None:
        """Start one worker on the task pipe."""
        inherited = [self.task_write, *self.workers]   # a worker must hold no other worker's pipe (EOF = death)
        worker = _spawn_worker(self.function, self.pids, self.task_read, inherited)
        self.workers[worker.result_fd] = worker
        self.selector.register(worker.result_fd, selectors.EVENT_READ)
        self.stats.workers_started += 1

    def feed(self) -> None:
        """Write as much of the queue as the pipe takes; close it once all is written."""
        while self.queue:
            batch = self.queue[:TASK.size * TASK_BATCH]
            try:
                written = os.write(self.task_write, batch)
            except BlockingIOError:
                return
            self.queue = self.queue[written:]
        if self.task_write >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.task_write)
            os.close(self.task_write)              # the workers see EOF once the queue is empty
            self.task_write = -1

    def start(self, jobs: int) -> None:
        """Queue the tasks and start ``jobs`` workers."""
        self.feed()
        if self.queue:
            self.selector.register(self.task_write, selectors.EVENT_WRITE)
        for _ in range(jobs):
            self.spawn()

    def serve(self) -> None:
        """Feed the pipe and collect results until every worker is gone."""
        while self.workers:
            for key, _events in self.selector.select():
                if key.fd == self.task_write:
                    self.feed()
                else:
                    self._collect_from(self.workers[key.fd])

    def _collect_from(self, worker: _Worker) -> None:
        """Read what ``worker`` sent; bury it when it is gone and replace it if work is left."""
        if _collect(worker, self.pids, self.results):
            return
        self.selector.unregister(worker.result_fd)
        del self.workers[worker.result_fd]
        if not _bury(worker, self.pids, self.results, self.stats) and len(self.results) < len(self.pending):
            self.spawn()           # a replacement takes the rest of the queue

    def abort(self) -> None:
        """Interrupted: stop the queue, collect what the workers finished and bury them."""
        _stop_queue(self.task_read, self.task_write)
        self.task_write = -1
        for worker in list(self.workers.values()):
            while _collect(worker, self.pids, self.results):
                pass
            _bury(worker, self.pids, self.results, self.stats)

    def close(self) -> None:
        """Close the selector and the task pipe."""
        self.selector.close()
        os.close(self.task_read)
        if self.task_write >= 0:
            os.close(self.task_write)


def _run_workers(function: Callable[[int], ProcessResult], pids: Sequence[int], pending: list[int], jobs: int,
                 stats: FleetStats) -> dict[int, ProcessResult]:
    """Steps 2-4: feed ``pending`` to ``jobs`` workers, collect, replace dead workers."""
    pool = _WorkerPool(function, pids, pending, stats)
    try:
        pool.start(jobs)
        pool.serve()
    except BaseException:
        pool.abort()
        raise
    finally:
        pool.close()
    return pool.results


def _stop_queue(task_read: int, task_write: int) -> None:
    """Interrupted: empty the task pipe so workers stop after the process in hand."""
    if task_write >= 0:
        os.close(task_write)
    os.set_blocking(task_read, False)
    with contextlib.suppress(OSError):
        while os.read(task_read, 1 << 16):
            pass


def _collect(worker: _Worker, pids: Sequence[int], results: dict[int, ProcessResult]) -> bool:
    """Step 3: read what ``worker`` sent; False at end of file (it exited or died)."""
    try:
        chunk = os.read(worker.result_fd, 1 << 16)
    except OSError as exc:
        if exc.errno == errno.EINTR:
            return True
        chunk = b""
    if not chunk:
        return False
    worker.buffer += chunk
    while len(worker.buffer) >= FRAME.size:
        (length,) = FRAME.unpack_from(worker.buffer)
        if len(worker.buffer) < FRAME.size + length:
            break
        message = pickle.loads(bytes(worker.buffer[FRAME.size:FRAME.size + length]))
        del worker.buffer[:FRAME.size + length]
        if message[0] == _START:
            worker.handling = message[1]
        else:
            results[message[1]] = message[2]
            worker.handling = None
    return True


def _bury(worker: _Worker, pids: Sequence[int], results: dict[int, ProcessResult], stats: FleetStats) -> bool:
    """Step 4: reap ``worker``; if it died handling a process, that process failed.
    True if the worker ended normally."""
    os.close(worker.result_fd)
    _, status, usage = os.wait4(worker.pid, 0)
    stats.worker_maxrss_kb.append(usage.ru_maxrss)
    if status == 0:
        return True
    stats.workers_died += 1
    if worker.handling is None or worker.handling in results:
        return False
    pid = pids[worker.handling]
    results[worker.handling] = failed_result(
        pid, f"the worker handling process {pid} (pid {worker.pid}) {_death_reason(status)} before reporting; "
             f"process {pid} may have been left changed: check it with 'libcare-ctl info -p {pid}'")
    return False


__all__ = ["FleetStats", "failed_result", "reopen_privately", "run_parallel", "warm_up"]
