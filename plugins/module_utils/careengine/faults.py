"""Fault injection for the crash-safety tests: SIGKILL the tool (or the patient) at a named step.

Read only by tests. ``LIBCARE_FAULT_INJECT="<when>:<step>[:<count>][:<victim>]"``:

- ``when``: ``before`` or ``after`` a step of :data:`STEPS`, or ``at`` an instant of
  :data:`INSTANTS` (inside the tracer's remote syscall and call);
- ``count``: the n-th time that point is reached in this process (default 1);
- ``victim``: ``tool`` (default): the engine SIGKILLs itself (in fleet mode, a worker
  kills the parent ``libcare-ctl`` first, then itself), or ``patient``: the patient
  being handled is SIGKILLed and the engine carries on, to show how it reports that.

The engine calls :func:`step` around each named step of patch, unpatch and level
replacement, and :func:`point` at each instant; without the variable both cost one
comparison. This module is the one place that reads the variable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

ENVIRONMENT_VARIABLE = "LIBCARE_FAULT_INJECT"

# The engine's steps, in the order patch runs them: the mapping is prepared with one thread
# held (mmap ... resolve-ifunc), every thread is stopped only for safety-check, jump and
# restore-bytes, and a replaced level is unmapped with one thread held again (unmap-old).
# Unpatch uses stop, safety-check, restore-bytes and resume, then unmap with one thread held.
STEPS = (
    "mmap",            # one thread held: the patch mapping created in the patient
    "write-image",     # the whole mapping written (header, image, jump table, undo bytes)
    "mprotect",        # its code part sealed read + execute
    "resolve-ifunc",   # IFUNC resolvers called in the patient, their targets written
    "stop",            # every thread stopped (PTRACE_SEIZE + PTRACE_INTERRUPT)
    "safety-check",    # no thread in code that is about to change
    "jump",            # one replaced function's jump written (each one)
    "restore-bytes",   # one function's original bytes put back (each one; unpatch, replaced level)
    "resume",          # every thread detached and running
    "unmap-old",       # one thread held: a replaced level's mapping unmapped
    "unmap",           # unpatch, one thread held: the patch mapping unmapped
)
# Instants inside a remote syscall or call (process/tracer.py).
INSTANTS = (
    "borrow",          # the thread holds our registers, has not run yet
    "syscall-entry",   # at the remote syscall's entry stop
    "syscall-exit",    # at its exit stop, registers still borrowed
    "give-back",       # signal mask restored, registers still borrowed
    "call-return",     # a remote call returned into the stub (rt_sigreturn entry stop)
)
WHEN = ("before", "after", "at")
VICTIMS = ("tool", "patient")


@dataclass(frozen=True)
class FaultSpec:
    """Where to inject: ``when`` ``step``, the ``count``-th time, killing ``victim``."""

    when: str
    step: str
    count: int = 1
    victim: str = "tool"


def parse(text: str) -> FaultSpec:
    """A :class:`FaultSpec` from the variable's value; ValueError names what is wrong."""
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 4:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={text!r}: expected <when>:<step>[:<count>][:<victim>]")
    when, step = parts[0], parts[1]
    count = int(parts[2]) if len(parts) > 2 and parts[2] else 1
    victim = parts[3] if len(parts) > 3 else "tool"
    names = INSTANTS if when == "at" else STEPS
    if when not in WHEN or step not in names or count < 1 or victim not in VICTIMS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={text!r}: unknown point (when: {', '.join(WHEN)}; "
                         f"steps: {', '.join(STEPS)}; instants: {', '.join(INSTANTS)}; victims: tool, patient)")
    return FaultSpec(when, step, count, victim)


_raw = os.environ.get(ENVIRONMENT_VARIABLE, "")
_spec: FaultSpec | None = parse(_raw) if _raw else None
_tool_pid = os.getpid()          # libcare-ctl itself; fleet workers are its forks
_reached = 0


@contextlib.contextmanager
def step(name: str, patient_pid: int | None = None) -> Iterator[None]:
    """Mark a named step of the engine: injection points before and after it."""
    _reach("before", name, patient_pid)
    yield
    _reach("after", name, patient_pid)


def point(name: str, patient_pid: int | None = None) -> None:
    """Mark an instant inside the tracer."""
    _reach("at", name, patient_pid)


def _reach(when: str, name: str, patient_pid: int | None) -> None:
    global _reached
    if _spec is None or _spec.when != when or _spec.step != name:
        return
    _reached += 1
    if _reached != _spec.count:
        return
    if _spec.victim == "patient":
        if patient_pid is not None:
            _kill_and_wait(patient_pid)
        return
    if os.getpid() != _tool_pid:
        os.kill(_tool_pid, signal.SIGKILL)       # a fleet worker: the whole tool dies
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_and_wait(pid: int) -> None:
    """SIGKILL ``pid`` and wait (1 s at most) until the kernel has taken it down."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stream:
                stat = stream.read()
        except OSError:
            return
        if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
            return
        time.sleep(0.001)
