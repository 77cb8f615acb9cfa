"""The tracer runs SCHED_FIFO while it holds a patient stopped, and only then."""

from __future__ import annotations

import os

import pytest

from plugins.module_utils.careengine.process import StoppedProcess, realtime

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real-time scheduling needs CAP_SYS_NICE")


def test_real_time_while_stopped_and_back_after(threads_program):
    running = threads_program(3)
    before = os.sched_getscheduler(0)
    assert before == os.SCHED_OTHER
    with StoppedProcess(running.pid) as patient:
        assert os.sched_getscheduler(0) == os.SCHED_FIFO
        assert os.sched_getparam(0).sched_priority == realtime.REALTIME_PRIORITY
        patient.run_for(0.001)
        assert os.sched_getscheduler(0) == os.SCHED_FIFO
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
