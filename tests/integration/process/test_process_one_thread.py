"""StoppedThread on real processes: one thread held for remote work, the others running on."""

from __future__ import annotations

import os

import pytest
from waiting import eventually

from plugins.module_utils.careengine.errors import ProcessError
from plugins.module_utils.careengine.process import read_memory
from plugins.module_utils.careengine.process.tracer import StoppedThread

WORD = 8
PAGE = 4096
PROT_READ_WRITE = 3
MAP_PRIVATE_ANONYMOUS = 0x22


def task_ids(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/task")}


def counters(running, count: int) -> list[int]:
    raw = read_memory(running.pid, running.address("counters"), count * WORD)
    return [int.from_bytes(raw[i:i + WORD], "little") for i in range(0, len(raw), WORD)]


def tracer_of(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as stream:
        return int(next(line.split()[1] for line in stream if line.startswith("TracerPid:")))


@pytest.mark.parametrize("mode", ["busy", "sleep"])
def test_one_thread_is_held_while_the_others_run(threads_program, mode):
    count = 4
    running = threads_program(count, mode)
    with StoppedThread(running.pid) as worker:
        [held] = worker.tids
        assert running.state(held) == "t"
        assert [tid for tid in task_ids(running.pid) if tracer_of(running.pid, tid)] == [held]
        before = counters(running, count)
        # Every other thread counts on while one is held.
        assert eventually(lambda: sum(now > then for now, then in zip(counters(running, count), before,
                                                                       strict=True)) >= count - 1)
        address = worker.mmap(0, 2 * PAGE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS)
        worker.write(address, b"one thread")
        assert worker.read(address, 10) == b"one thread"
        worker.munmap(address, 2 * PAGE)
        assert worker.paused_ns > 0
    assert all(tracer_of(running.pid, tid) == 0 for tid in task_ids(running.pid))
    after = counters(running, count)
    assert eventually(lambda: all(now > then for now, then in zip(counters(running, count), after, strict=True)))


def test_a_thread_blocked_in_a_system_call_is_not_taken_while_one_runs(threads_program):
    running = threads_program(3, "busy", reader=True)      # two workers spin, the reader waits in read(0)
    reader = int(running.values["reader"])
    taken = set()
    for _ in range(10):
        with StoppedThread(running.pid) as worker:
            taken.update(worker.tids)
    assert reader not in taken and taken


def test_an_exited_main_thread_is_not_taken(threads_program):
    running = threads_program(3, "orphan")
    assert eventually(lambda: running.state() == "Z")
    with StoppedThread(running.pid) as worker:
        [held] = worker.tids
        assert held != running.pid
        address = worker.mmap(0, PAGE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS)
        worker.munmap(address, PAGE)


def test_run_for_is_refused(threads_program):
    running = threads_program(2)
    with StoppedThread(running.pid) as worker, pytest.raises(ProcessError, match="only one thread is held"):
        worker.run_for(0.01)
