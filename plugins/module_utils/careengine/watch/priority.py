"""Real-time scheduling for the tracer while a patient is stopped, and only then.

On a loaded host the patient's pause stretches when the tracer is descheduled between two
of its steps. ``SCHED_FIFO`` (lowest real-time priority) for the time the patient is held
keeps the tracer running; it is dropped as soon as the patient runs again. The kernel's
real-time throttling bounds what a runaway tracer could take. Without the privilege
(``CAP_SYS_NICE``, or a unit with ``RestrictRealtime=yes``) nothing changes.
"""

from __future__ import annotations

import os

from ..process import StoppedProcess

REALTIME_PRIORITY = 1
enabled = True


class Boost:
    """Raise this thread to ``SCHED_FIFO`` until :meth:`end`."""

    def __init__(self) -> None:
        self._previous: tuple[int, os.sched_param] | None = None
        if not enabled:
            return
        try:
            previous = (os.sched_getscheduler(0), os.sched_getparam(0))
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
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


class BoostedProcess(StoppedProcess):
    """A ``StoppedProcess`` whose tracer runs real-time while the process is stopped."""

    _boost: Boost | None = None

    def stop(self) -> None:
        self._boost = Boost()
        try:
            super().stop()
        except BaseException:
            self._unboost()
            raise

    def resume(self) -> None:
        try:
            super().resume()
        finally:
            self._unboost()

    def _unboost(self) -> None:
        if self._boost is not None:
            self._boost.end()
            self._boost = None
