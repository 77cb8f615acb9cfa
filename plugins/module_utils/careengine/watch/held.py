"""Patch a process whose caught thread the service already holds under ptrace, and run the
engine with the service's stoppers.

The engine stops a patient with :class:`StoppedProcess`, which seizes every thread; a
thread we already trace cannot be seized a second time. :class:`HeldProcess` is a
``StoppedProcess`` that starts with that thread already counted as stopped (it sits in a
ptrace stop of ours) and, when the engine lets the process go, hands the thread back to
us instead of detaching it: we detach it after the patch, from the same stop.

:func:`patch_held` runs the engine's own :func:`engine.patch_process` (planning, level
rules, safety check, rollback) with ``HeldProcess`` in place of ``StoppedProcess`` for
that one call, through the engine's :func:`engine.stopping_with`.
:func:`service_stoppers` gives the engine :class:`HeldProcess` for the held process (every
stop runs the tracer real-time while the patient is held: :mod:`..process.realtime`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..apply import engine
from ..process import StoppedProcess
from ..results import ProcessResult
from ..storage import PatchSource


class HeldProcess(StoppedProcess):
    """A ``StoppedProcess`` whose thread ``held_tid`` is already in a ptrace stop of ours."""

    def __init__(self, pid: int, held_tid: int, *, timeout: float = 5.0) -> None:
        super().__init__(pid, timeout=timeout)
        self.held_tid = held_tid
        self.signal_for_held = 0          # to give back when we detach it
        self._adopt()

    def _adopt(self) -> None:
        self._seized.add(self.held_tid)
        self._stop_signal[self.held_tid] = 0
        self._group_stopped[self.held_tid] = False

    def stop(self) -> None:
        """Stop the other threads (if any); the held one is stopped already."""
        if not self._seized:
            self._adopt()
        super().stop()

    def _detach(self, tid: int) -> None:
        if tid == self.held_tid:
            self.signal_for_held = self._signal_to_inject(tid)
            return                        # stays ours, in its stop
        super()._detach(tid)


@contextlib.contextmanager
def service_stoppers(held: dict[int, int] | None = None) -> Iterator[list[HeldProcess]]:
    """Within the block the engine stops process ``pid`` of ``held`` (pid -> held thread) with
    :class:`HeldProcess`, others as usual; the held ones made are listed in the yielded list."""
    made: list[HeldProcess] = []
    held = held or {}

    def stopper(target_pid: int, *, timeout: float = 5.0) -> StoppedProcess:
        if target_pid not in held:
            return StoppedProcess(target_pid, timeout=timeout)
        process = HeldProcess(target_pid, held[target_pid], timeout=timeout)
        made.append(process)
        return process

    with engine.stopping_with(stopper):
        yield made


def patch_held(pid: int, held_tid: int, source: PatchSource, *, timeout: float = 1.0) -> tuple[ProcessResult, int]:
    """Apply ``source``'s patches to process ``pid`` whose thread ``held_tid`` we hold.

    Returns the result and the signal to give back to the held thread when detaching it.
    The thread stays in its ptrace stop, ours.
    """
    with service_stoppers({pid: held_tid}) as made:
        try:
            result = engine.patch_process(pid, source, timeout=timeout)
        except Exception as exc:      # never raise out of the service loop for one process
            result = ProcessResult(pid=pid, comm=engine.read_comm(pid), error=f"{type(exc).__name__}: {exc}")
    signo = made[-1].signal_for_held if made else 0
    return result, signo
