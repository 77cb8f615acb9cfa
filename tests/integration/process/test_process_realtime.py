"""The tracer runs SCHED_FIFO while it holds a patient stopped, and only then."""

from __future__ import annotations

import os

import pytest

from plugins.module_utils.careengine.process import StoppedProcess, realtime

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real-time scheduling needs CAP_SYS_NICE")


def policy() -> int:
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK


def test_real_time_while_stopped_and_back_after(threads_program):
    running = threads_program(3)
    before = os.sched_getscheduler(0)
    assert before == os.SCHED_OTHER
    with StoppedProcess(running.pid) as patient:
        assert policy() == os.SCHED_FIFO
        assert os.sched_getparam(0).sched_priority == realtime.REALTIME_PRIORITY
        patient.run_for(0.001)
        assert policy() == os.SCHED_FIFO
        child = os.fork()
        if child == 0:       # a child forked meanwhile is not real-time
            os._exit(0 if os.sched_getscheduler(0) == os.SCHED_OTHER else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    assert os.sched_getscheduler(0) == before


def test_back_after_a_failed_stop():
    with pytest.raises(Exception):      # noqa: B017 - no such process: any refusal will do
        StoppedProcess(2 ** 22 + 1).stop()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_disabled_leaves_scheduling_alone(threads_program, monkeypatch):
    running = threads_program(2)
    monkeypatch.setattr(realtime, "enabled", False)
    with StoppedProcess(running.pid):
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
