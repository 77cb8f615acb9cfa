"""The service loop: keep every process on the host at the store's wanted state.

One thread does everything that touches ptrace (ptrace belongs to the thread that
attached): permission events, caught processes, socket requests, store polls and rescans.
A second thread only reads fanotify events: it lets the service's own opens (and its
children's) through at once, so reading a watched library never waits for ourselves, and
queues the others for the main thread.

What each caught process goes through is in :mod:`.catch`; a process the service did not
catch (it started while the service was down, or it could not be caught) is patched as
soon as a rescan sees it, and reported as "patched late".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import selectors
import signal
import sys
import threading
import time

from ptrace import PtraceError

from ..apply import engine, operations
from ..audit import AUDIT_LOG_ENV, AuditLog, Requester, result_records
from ..errors import CareError
from ..process import mapped_objects, proc_status, read_maps
from ..results import ObjectAction, ProcessResult
from ..storage import PatchSource, PatchStore
from . import catch as catching
from .catch import Catch, Target
from .discovery import DEFAULT_SEARCH_PATHS, find_targets
from .fanotify import FAN_OPEN_EXEC_PERM, FAN_OPEN_PERM, Fanotify, PermissionEvent
from .held import patch_held, service_stoppers
from .requests import run_ctl, run_ctl_as
from .server import PRIVILEGED_COMMANDS, ControlSocket, Peer, answer, ensure_free, receive_request
from .status import HOW_EXEC, HOW_LATE, HOW_PUBLISH, HOW_REQUEST, PatchRecord, Status, now_text
from .wanted import clear_unpatched, mark_unpatched, store_signature, wanted_levels, wanted_source

WALL = 0x40000000
SERVICE_ROLES = {
    HOW_EXEC: "service (at exec)",
    HOW_LATE: "service (late: it started while the service was not watching)",
    HOW_PUBLISH: "service (a new level was published)",
}
BUSY_TICK = 0.005            # loop period while processes are caught
STORE_POLL = 1.0


def log(message: str) -> None:
    """One line to the service's log (stderr: the journal under systemd)."""
    print(f"libcare-watch: {message}", file=sys.stderr, flush=True)


def service_requester(role: str) -> Requester:
    """The service as the requester of its own patches, for the audit trail."""
    return Requester(os.getuid(), "service", role)


def sha256_of(path: str) -> str | None:
    """The SHA-256 of the file at ``path`` (None if unreadable)."""
    try:
        with open(path, "rb") as stream:
            return hashlib.sha256(stream.read()).hexdigest()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            stat = stream.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def _uid(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def _mask_for(target: Target) -> int:
    library = ".so" in os.path.basename(target.path)
    executable = target.has_interp or not library
    return (FAN_OPEN_EXEC_PERM if executable else 0) | (FAN_OPEN_PERM if library else 0)


class Service:
    """``libcare-ctl watch``: see the module docstring."""

    def __init__(self, store: str, socket_path: str, *, search_paths: tuple[str, ...] = DEFAULT_SEARCH_PATHS,
                 socket_group: str | None = None, operator_group: str | None = None,
                 rescan_interval: float = 2.0, audit_log: str | None = None) -> None:
        self.store = os.path.abspath(store)
        self.socket_path = socket_path
        self.search_paths = search_paths
        self.socket_group = socket_group
        self.operator_group = operator_group
        self.rescan_interval = rescan_interval
        self.audit_log = audit_log
        self.pid = os.getpid()
        self.status = Status()
        self.catches: dict[int, Catch] = {}          # by caught thread id
        self.caught_at: dict[int, float] = {}        # tid -> perf_counter at its permission event
        self.targets: dict[tuple[int, int], Target] = {}
        self.levels: dict[str, int] = {}
        self.seen: dict[int, int | None] = {}        # pid -> start time, checked at this generation
        self.signature: tuple = ()
        self.stopping = False
        self.events: queue.SimpleQueue[PermissionEvent] = queue.SimpleQueue()
        self.fan: Fanotify | None = None
        self.control: ControlSocket | None = None

    # ---------------------------------------------------------------- start and stop
    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status."""
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_write = wake_write
        for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signo, self._ask_stop)
        signal.signal(signal.SIGCHLD, lambda signo, frame: None)
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        ensure_free(self.socket_path)
        if self.audit_log:
            # Requests run through the socket log where the service logs.
            os.environ[AUDIT_LOG_ENV] = self.audit_log
        self.fan = Fanotify()
        # Started with SIGCHLD blocked (a thread inherits the mask), so that SIGCHLD always
        # goes to this thread: a stop waits for it here with sigtimedwait, and one taken by
        # the reader held every patient ~10 ms longer (the tracer's poll cap).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            threading.Thread(target=self._read_events, name="fanotify", daemon=True).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            self._sync(HOW_LATE)
            # Ready (the socket accepts) only once every watched object is marked.
            self.control = ControlSocket(self.socket_path, self.socket_group, self.operator_group)
            log(f"watching {self.status.objects_watched} object(s) for {len(self.levels)} patch(es) "
                f"in {self.store}; listening on {self.socket_path}")
            self._loop(wake_read)
        finally:
            self._shutdown()
        return 0

    def _ask_stop(self, signo, frame) -> None:
        self.stopping = True

    def _shutdown(self) -> None:
        for tid in list(self.catches):
            self._drop(tid, "the service is stopping")
        if self.fan is not None:
            self.fan.close()              # the kernel allows whatever is pending
        if self.control is not None:
            self.control.close()
        log("stopped; every caught process was let go")

    # ---------------------------------------------------------------- the loop
    def _loop(self, wake_read: int) -> None:
        selector = selectors.DefaultSelector()
        selector.register(wake_read, selectors.EVENT_READ)
        selector.register(self.control.fileno(), selectors.EVENT_READ)
        next_poll = next_rescan = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            timeout = BUSY_TICK if self.catches else max(0.0, min(next_poll, next_rescan) - now)
            for key, _ in selector.select(timeout):
                if key.fd == wake_read:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_read, 4096):
                            pass
                else:
                    self._serve_one()
            now = time.monotonic()
            poll = now >= next_poll
            rescan = now >= next_rescan and not self.catches
            if poll:
                next_poll = now + STORE_POLL
            if rescan:
                next_rescan = now + self.rescan_interval
            for step in (self._take_events, self._reap, self._sync_if_published if poll else None,
                         self._rescan if rescan else None):
                if step is None:
                    continue
                try:
                    step()
                except Exception as exc:     # one bad event must not end the service
                    log(f"internal error in {step.__name__}: {type(exc).__name__}: {exc}")

    def _sync_if_published(self) -> None:
        if store_signature(self.store) != self.signature:
            self._sync(HOW_PUBLISH)

    # ---------------------------------------------------------------- permission events
    def _read_events(self) -> None:
        """The reader thread: our own opens pass at once, the others wait for the main thread."""
        while self.fan is not None and self.fan.fd >= 0:
            try:
                events = self.fan.read_events()
            except OSError:
                return
            for event in events:
                if self._is_ours(event.tid):
                    self.fan.allow(event)
                else:
                    self.events.put(event)
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"e")

    def _is_ours(self, tid: int) -> bool:
        status = proc_status(tid)
        return str(self.pid) in (status.get("Tgid"), status.get("PPid"))

    def _take_events(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            try:
                self._catch(event)
            finally:
                self.fan.allow(event)

    def _catch(self, event: PermissionEvent) -> None:
        try:
            status = os.fstat(event.fd)
        except OSError:
            return
        target = self.targets.get((status.st_dev, status.st_ino))
        if target is None or target.build_id not in self.levels:
            return
        pid = catching.thread_group(event.tid)
        if event.tid in self.catches or any(c.pid == pid for c in self.catches.values()):
            return                        # already caught (its exec, or another object of it)
        try:
            catching.seize(event.tid, event.is_exec)
        except PtraceError as exc:
            log(f"cannot catch pid {pid} ({target.path}): {exc}; it will be patched late")
            return
        self.catches[event.tid] = Catch(event.tid, target, event.is_exec, pid)
        self.caught_at[event.tid] = time.perf_counter()

    # ---------------------------------------------------------------- caught processes
    def _find_catch(self, waited: int) -> Catch | None:
        found = self.catches.get(waited)
        if found is not None:
            return found
        for tid, caught in list(self.catches.items()):
            if caught.pid == waited:      # a non-leader thread exec'd: it now has the leader's id
                del self.catches[tid]
                self.caught_at[waited] = self.caught_at.pop(tid, time.perf_counter())
                caught.tid = waited
                self.catches[waited] = caught
                return caught
        return None

    def _reap(self) -> None:
        while True:
            try:
                waited, status = os.waitpid(-1, os.WNOHANG | WALL)
            except ChildProcessError:
                break
            if waited == 0:
                break
            caught = self._find_catch(waited)
            if caught is not None:
                self._step_catch(caught, status)
        for tid, caught in list(self.catches.items()):
            if caught.expired():
                self._drop(tid, "it did not reach its entry point in time")
                self._patch_running([caught.pid], HOW_LATE)

    def _step_catch(self, caught: Catch, status: int) -> None:
        """One wait status of a caught thread: patch it when ready, let it go (patched late)
        when it cannot be followed, forget it when gone."""
        try:
            outcome = catching.step(caught, status)
        except (PtraceError, CareError, OSError) as exc:
            caught.reason = f"lost it: {exc}"
            outcome = catching.RELEASE
        if outcome == catching.READY:
            self._patch_caught(caught)
        elif outcome == catching.RELEASE:
            self._drop(caught.tid, caught.reason)
            self._patch_running([caught.pid], HOW_LATE)
        elif outcome == catching.GONE:
            self.catches.pop(caught.tid, None)
            self.caught_at.pop(caught.tid, None)

    def _drop(self, tid: int, reason: str) -> None:
        caught = self.catches.pop(tid, None)
        self.caught_at.pop(tid, None)
        if caught is None:
            return
        with contextlib.suppress(PtraceError, OSError):
            catching.release(tid)
        self.status.released += 1
        log(f"let pid {caught.pid} go unpatched for now ({reason})")

    def _patch_caught(self, caught: Catch) -> None:
        started = self.caught_at.pop(caught.tid, None)
        self.catches.pop(caught.tid, None)
        by = SERVICE_ROLES[HOW_EXEC]
        try:
            source = operations.admit_source(wanted_source(self.store), pids=[caught.pid], requested_by=service_requester(by),
                                      audit_log=self.audit_log)
        except CareError as exc:
            source = None
            result, signo = ProcessResult(pid=caught.pid, comm=engine.read_comm(caught.pid), error=str(exc)), 0
        if source is not None:
            result, signo = patch_held(caught.pid, caught.tid, source)
        try:
            catching.release(caught.tid, signo)
        except (PtraceError, OSError) as exc:
            log(f"cannot detach from pid {caught.pid}: {exc}")
        latency = (time.perf_counter() - started) * 1000 if started is not None else None
        if source is not None:
            self._audit(result, source, by)
        self._record(result, HOW_EXEC, by, latency)
        self.seen[caught.pid] = _start_time(caught.pid)

    def _audit(self, result: ProcessResult, source: PatchSource, by: str) -> None:
        """The audit trail's records of a patch made at exec (the API writes the others)."""
        def digest(build_id: str, level: int | None) -> str | None:
            found = source.find(build_id) if level is not None else None
            return sha256_of(found.path) if found is not None and found.level == level else None

        records = result_records("patch", [result], service_requester(by), source=source.path,
                                 patch_sha256=digest, signer=source.signer)
        try:
            AuditLog(self.audit_log).append_all(records)
        except (OSError, CareError) as exc:
            log(f"warning: {exc}; {len(records)} audit record(s) not written")

    # ---------------------------------------------------------------- running processes
    def _sync(self, how: str) -> None:
        """The store changed (or we start): new marks, then patch every matching process."""
        self.signature = store_signature(self.store)
        try:
            self.levels = wanted_levels(self.store)
        except CareError as exc:
            log(f"cannot read the store: {exc}")
            self.levels = {}
        targets = find_targets(set(self.levels), self.search_paths)
        for identity, target in self.targets.items():
            if identity not in targets:
                self.fan.unmark(target.path, _mask_for(target))
        for identity, target in targets.items():
            if identity not in self.targets:
                try:
                    self.fan.mark(target.path, _mask_for(target))
                except CareError as exc:
                    log(str(exc))
        self.targets = targets
        self.status.objects_watched = len(targets)
        candidates = [pid for pid in self._all_pids() if self._maps_wanted(pid, quick=False)]
        first_look = {pid for pid in candidates if pid not in self.seen}
        self.seen = {pid: _start_time(pid) for pid in self._all_pids()}
        self._patch_running([p for p in candidates if p in first_look], HOW_LATE)
        self._patch_running([p for p in candidates if p not in first_look], how)

    def _rescan(self) -> None:
        """Patch processes that appeared since the last look and were not caught."""
        current = {}
        fresh = []
        for pid in self._all_pids():
            started = _start_time(pid)
            current[pid] = started
            if self.seen.get(pid, -1) != started:
                fresh.append(pid)
        for pid in set(self.status.by_pid) - set(current):
            self.status.forget(pid)
        self.seen = current
        if self.levels:
            self._patch_running([pid for pid in fresh if self._maps_wanted(pid)], HOW_LATE)

    def _all_pids(self) -> list[int]:
        caught = {c.pid for c in self.catches.values()}
        return [pid for pid in engine_pids() if pid != self.pid and pid not in caught]

    def _maps_wanted(self, pid: int, quick: bool = True) -> bool:
        """Does ``pid`` map an object whose wanted patch it lacks? ``quick``: only processes
        mapping a watched file by inode are read further (rescans; a sync reads them all)."""
        if not self.levels:
            return False
        if quick and not self._maps_a_target(pid):
            return False
        try:
            objects = mapped_objects(pid, read_maps(pid))
        except CareError:
            return False
        applied = set()
        with contextlib.suppress(CareError):
            applied = {b for b, a in engine.read_applied_patches(pid, read_maps(pid)).items()
                       if a.complete and a.level == self.levels.get(b)}
        return any(m.build_id in self.levels and m.build_id not in applied for m in objects)

    def _maps_a_target(self, pid: int) -> bool:
        """Cheap first look: does ``/proc/PID/maps`` name the inode of a watched object?"""
        inodes = {str(target.inode) for target in self.targets.values()}
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as stream:
                return any(line.split(maxsplit=5)[4:5][0] in inodes for line in stream if line.count(" ") >= 4)
        except (OSError, IndexError):
            return False

    def _patch_running(self, pids: list[int], how: str) -> None:
        """Patch running processes through the apply API (store checks, audit trail)."""
        if not pids:
            return
        by = SERVICE_ROLES[how]
        try:
            with service_stoppers():
                results = operations.patch_processes(wanted_source(self.store), pids, requested_by=service_requester(by),
                                              audit_log=self.audit_log)
        except CareError as exc:
            log(f"not patching {len(pids)} process(es): {exc}")
            self.status.failures += 1
            return
        for result in results:
            self._record(result, how, by)

    def _record(self, result: ProcessResult, how: str, by: str, latency_ms: float | None = None) -> None:
        uid = _uid(result.pid)
        if result.error:
            self.status.note(PatchRecord(result.pid, uid, result.comm, "", None, how, by, now_text(),
                                         ObjectAction.FAILED.value, result.error))
            log(f"pid {result.pid} ({result.comm}): failed: {result.error}")
            return
        for obj in result.objects:
            if obj.action not in (ObjectAction.APPLIED, ObjectAction.FAILED):
                continue
            record = PatchRecord(result.pid, uid, result.comm, obj.build_id, obj.applied_level, how, by,
                                 now_text(), obj.action.value, obj.reason, obj.paused_us,
                                 None if latency_ms is None else round(latency_ms, 3))
            self.status.note(record)
            extra = f", {latency_ms:.1f} ms after exec" if latency_ms is not None else ""
            log(f"pid {result.pid} ({result.comm}): {obj.action.value} level {obj.applied_level} of {obj.build_id} "
                f"({how}{extra}): {obj.reason}")

    # ---------------------------------------------------------------- socket requests
    def _serve_one(self) -> None:
        try:
            connection, peer = self.control.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(5.0)
            try:
                cwd, argv = receive_request(connection)
            except (OSError, ValueError) as exc:
                answer(connection, 2, "", f"libcare-ctl: bad request: {exc}\n")
                return
            connection.settimeout(None)
            exit_status, out, err = self._handle(argv, cwd, peer)
            answer(connection, exit_status, out, err)

    def _handle(self, argv: list[str], cwd: str, peer: Peer) -> tuple[int, str, str]:
        command = next((word for word in argv if not word.startswith("-")), "")
        if command == "watch":
            wants_json = "--json" in argv
            uid = None if peer.uid == 0 else peer.uid
            text = json.dumps(self.status.to_json(uid), indent=2) + "\n" if wants_json else self.status.text(uid)
            return 0, text, ""
        if command in PRIVILEGED_COMMANDS and not self.control.may_change(peer):
            reason = (f"refused: only root{' or group ' + self.operator_group if self.operator_group else ''} "
                      f"may {command.split('-')[0]} through the service")
            log(f"{reason} ({command} asked by {peer.describe()})")
            return 1, "", f"libcare-ctl: {reason}\n"
        if command.startswith("info"):
            return run_ctl(argv, cwd, peer) if peer.uid == 0 else run_ctl_as(peer, argv, cwd)
        if command.startswith("unpatch") or command.startswith("patch"):
            return self._change(command, argv, cwd, peer)
        return run_ctl(argv, cwd, peer)

    def _change(self, command: str, argv: list[str], cwd: str, peer: Peer) -> tuple[int, str, str]:
        """patch/unpatch for an authorised peer; the store's wanted state follows the operator
        (from the results of the changes made: nothing is read again)."""
        def follow(made: str, results: list[ProcessResult]) -> None:
            try:
                if (self._note_removed if made == "unpatch" else self._note_applied)(results, peer):
                    self.signature = store_signature(self.store)   # our own marks are not a publication
                    self.levels = wanted_levels(self.store)
            except Exception as exc:      # the change is made: its answer stands, whatever we fail to note
                log(f"cannot record the wanted state after {made} by {peer.describe()}: {exc}")

        with service_stoppers():
            return run_ctl(argv, cwd, peer, observer=follow)

    def _note_removed(self, results: list[ProcessResult], peer: Peer) -> bool:
        """Levels an operator's unpatch removed: marked unpatched in the store (not re-applied
        until published again) and dropped from the status. True if a mark was written."""
        store = PatchStore(self.store)
        marked = False
        for result in results:
            for obj in result.objects:
                if obj.previous_level is None or obj.applied_level is not None:
                    continue              # nothing was in force, or it still is
                if store.find(obj.build_id) is not None:
                    mark_unpatched(self.store, obj.build_id, obj.previous_level)
                    marked = True
                self.status.by_pid.get(result.pid, {}).pop(obj.build_id, None)
                log(f"pid {result.pid}: level {obj.previous_level} of {obj.build_id} removed on request of "
                    f"{peer.describe()}; not re-applied until published again")
        return marked

    def _note_applied(self, results: list[ProcessResult], peer: Peer) -> bool:
        """Levels an operator's patch applied: the unpatched mark cleared, the status noted.
        True if a mark was removed."""
        cleared = False
        for result in results:
            for obj in result.objects:
                if obj.action != ObjectAction.APPLIED:
                    continue
                cleared = clear_unpatched(self.store, obj.build_id) or cleared
                self.status.note(PatchRecord(result.pid, _uid(result.pid), result.comm, obj.build_id,
                                             obj.applied_level, HOW_REQUEST, f"libcare-ctl ({peer.describe()})",
                                             now_text(), ObjectAction.APPLIED.value))
        return cleared


def engine_pids() -> list[int]:
    """Every process but pid 1, ascending (the apply API's choice of processes)."""
    from ..apply.operations import all_pids
    return all_pids()
