"""fleet.run_parallel with plain per-process functions (no ptrace): order, one call per
pid, worker crashes, exceptions, caches inherited from the parent."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from plugins.module_utils.careengine.apply import fleet
from plugins.module_utils.careengine.results import ObjectAction, ObjectResult, ProcessResult

FAKE_PIDS = [4_000_000 + n for n in range(40)]      # above pid_max: never a live process


def handled_by(pid: int) -> ProcessResult:
    """A result saying which process ran the function (its pid, in comm)."""
    return ProcessResult(pid, str(os.getpid()), (ObjectResult(path="/bin/x", build_id="ab", action=ObjectAction.APPLIED, applied_level=1),))


def test_every_pid_once_in_order_by_forked_workers(tmp_path):
    journal = tmp_path / "calls"

    def function(pid: int) -> ProcessResult:
        with open(journal, "a") as stream:      # O_APPEND: one line per call, any process
            stream.write(f"{pid}\n")
        return handled_by(pid)

    stats = fleet.FleetStats()
    results = fleet.run_parallel(function, FAKE_PIDS, 3, stats=stats)

    assert [r.pid for r in results] == FAKE_PIDS
    assert sorted(int(line) for line in journal.read_text().split()) == FAKE_PIDS
    runners = {r.comm for r in results}
    assert str(os.getpid()) not in runners and 1 <= len(runners) <= 3
    assert all(r.ok for r in results)
    assert stats.jobs == 3 and stats.workers_started == 3 and stats.workers_died == 0
    assert len(stats.worker_maxrss_kb) == 3 and stats.total_maxrss_kb > stats.parent_maxrss_kb


def test_a_pid_given_twice_is_handled_once(tmp_path):
    journal = tmp_path / "calls"

    def function(pid: int) -> ProcessResult:
        with open(journal, "a") as stream:
            stream.write(f"{pid}\n")
        return handled_by(pid)

    pids = FAKE_PIDS[:10] + FAKE_PIDS[:10]
    results = fleet.run_parallel(function, pids, 2)
    assert [r.pid for r in results] == pids and results[3] is results[13]
    assert sorted(int(line) for line in journal.read_text().split()) == FAKE_PIDS[:10]


def test_default_jobs_is_cpu_count():
    stats = fleet.FleetStats()
    fleet.run_parallel(handled_by, FAKE_PIDS, stats=stats)
    assert stats.jobs == (os.cpu_count() or 1)


def test_worker_killed_fails_only_its_process_and_is_replaced():
    victim = FAKE_PIDS[7]

    def function(pid: int) -> ProcessResult:
        if pid == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.005)       # work left for a replacement when the victim's worker dies
        return handled_by(pid)

    stats = fleet.FleetStats()
    results = fleet.run_parallel(function, FAKE_PIDS, 2, stats=stats)

    failed = [r for r in results if not r.ok]
    assert [r.pid for r in failed] == [victim]
    assert f"handling process {victim}" in failed[0].error and "SIGKILL" in failed[0].error
    assert failed[0].objects == () and failed[0].paused_us is None
    assert all(r.objects[0].action == "applied" for r in results if r.pid != victim)
    assert stats.workers_died == 1 and stats.workers_started == 3


def test_every_worker_crashing_still_ends_with_a_result_per_pid():
    def function(pid: int) -> ProcessResult:
        os._exit(3)

    results = fleet.run_parallel(function, FAKE_PIDS[:6], 2)
    assert [r.pid for r in results] == FAKE_PIDS[:6]
    assert all(not r.ok and "exited with status 3" in r.error for r in results)


def test_exception_and_unpicklable_result_become_failed_results():
    def function(pid: int):
        if pid == FAKE_PIDS[0]:
            raise RuntimeError("boom")
        if pid == FAKE_PIDS[1]:
            return threading.Lock()
        return handled_by(pid)

    results = fleet.run_parallel(function, FAKE_PIDS[:8], 2)
    assert results[0].error == "internal error: RuntimeError: boom"
    assert results[1].error.startswith("internal error: result not picklable")
    assert all(r.ok for r in results[2:])


def test_serial_when_one_job_or_few_pids():
    stats = fleet.FleetStats()
    results = fleet.run_parallel(handled_by, FAKE_PIDS[:10], 1, stats=stats)
    assert {r.comm for r in results} == {str(os.getpid())} and stats.workers_started == 0
    results = fleet.run_parallel(handled_by, FAKE_PIDS[:2], 4)
    assert {r.comm for r in results} == {str(os.getpid())}
    assert fleet.run_parallel(handled_by, [], 4) == []


def test_warm_up_runs_once_per_executable_in_the_parent_and_workers_inherit_it():
    parsed: dict[str, int] = {}        # stands for the engine's per-build-id caches
    own = os.getpid()

    def function(pid: int) -> ProcessResult:
        key = os.readlink(f"/proc/{own}/exe")
        hit = key in parsed
        parsed.setdefault(key, os.getpid())
        return ProcessResult(pid, f"{os.getpid()} {'hit' if hit else 'parsed'}", ())

    # Our own pid stands for a live process of one executable; the rest do not exist.
    pids = [own, *FAKE_PIDS[:12]]
    stats = fleet.FleetStats()
    results = fleet.run_parallel(function, pids, 2, stats=stats)

    assert stats.warmed == 1
    assert results[0].comm == f"{own} parsed"                       # in the parent, before forking
    assert all(r.comm.endswith(" hit") and not r.comm.startswith(f"{own} ") for r in results[1:])
    assert parsed == {os.readlink(f"/proc/{own}/exe"): own}


def test_interrupt_stops_the_queue_and_reaps_the_workers(tmp_path):
    def function(pid: int) -> ProcessResult:
        time.sleep(0.01)
        if pid == queue[20]:
            os.kill(os.getppid(), signal.SIGINT)     # like ^C at the terminal; workers ignore it
        with open(journal, "a") as stream:
            stream.write(f"{pid}\n")
        return handled_by(pid)

    journal = tmp_path / "calls"
    queue = [5_000_000 + n for n in range(3 * len(FAKE_PIDS))]
    children_before = set(_children())
    with pytest.raises(KeyboardInterrupt):
        fleet.run_parallel(function, queue, 2)
    assert set(_children()) == children_before
    assert queue[20] in {int(line) for line in journal.read_text().split()}     # the one in hand finished
    assert len(journal.read_text().split()) < len(queue)                        # the rest was dropped


def _children() -> list[int]:
    own = os.getpid()
    found = []
    for task in os.listdir(f"/proc/{own}/task"):
        try:
            with open(f"/proc/{own}/task/{task}/children") as stream:
                found += [int(pid) for pid in stream.read().split()]
        except OSError:
            pass
    return found


def test_reopen_privately_gives_forked_readers_their_own_offsets(tmp_path):
    """Two forked processes seek and read one inherited file object (as workers read a
    cached ELF file); each must read what is at the offset it asked for."""
    path = tmp_path / "words"
    words = 1 << 16
    path.write_bytes(b"".join(n.to_bytes(4, "little") for n in range(words)))
    stream = open(path, "rb")    # noqa: SIM115 - inherited by the children, closed below
    stream.read(10)              # a buffer and a position inherited from the parent
    readers = []
    for seed in (1, 2):
        child = os.fork()
        if child == 0:
            status = 1
            try:
                fleet.reopen_privately([stream])
                wrong = 0
                position = seed
                for _ in range(30000):
                    position = (position * 1103515245 + 12345) % words
                    stream.seek(position * 4)
                    wrong += int.from_bytes(stream.read(4), "little") != position
                status = 0 if wrong == 0 else 2
            finally:
                os._exit(status)
        readers.append(child)
    statuses = [os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) for child in readers]
    stream.seek(8)                                       # the parent's file object still works
    assert stream.read(4) == (2).to_bytes(4, "little")
    stream.close()
    assert statuses == [0, 0]
