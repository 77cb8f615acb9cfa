"""Real-time scheduling for the tracer while a patient is stopped, and only then.

On a loaded host the patient's pause stretches when the tracer is descheduled between two
of its steps. ``SCHED_FIFO`` (lowest real-time priority) for the time the patient is held
keeps the tracer running; it is dropped as soon as the patient runs again. The tracer
blocks while it waits for the patient's threads, so they get the CPU they need; the
kernel's real-time throttling bounds what a runaway tracer could take. Without the
privilege (``CAP_SYS_NICE``, or a unit with ``RestrictRealtime=yes``) nothing changes.
:class:`.tracer.StoppedProcess` holds a :class:`Boost` for each stop.
"""

from __future__ import annotations

import os

REALTIME_PRIORITY = 1
enabled = True        # False: never raise the scheduling (``libcare-ctl watch --no-realtime``)


class Boost:
    """Raise this thread to ``SCHED_FIFO`` until :meth:`end`."""

    def __init__(self) -> None:
        self._previous: tuple[int, os.sched_param] | None = None
        if not enabled:
            return
        try:
            previous = (os.sched_getscheduler(0), os.sched_getparam(0))
            if previous[0] & ~os.SCHED_RESET_ON_FORK in (os.SCHED_FIFO, os.SCHED_RR):
                return                      # real-time already: leave it as its owner set it
            # Reset on fork: a child the tracer forks meanwhile (the seccomp probe) is not real-time.
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(REALTIME_PRIORITY))
        except OSError:
            return
        self._previous = previous

    def end(self) -> None:
        """Back to the scheduling we had."""
        if self._previous is not None:
            policy, param = self._previous
            self._previous = None
            try:
                os.sched_setscheduler(0, policy, param)
            except OSError:
                pass
