"""The tracer killed at each instant of a remote syscall and a remote call, in each kind of
thread: one busy with AVX registers, one blocked in read(), one in nanosleep(), the main
thread (in usleep). The thread must resume exactly: the read() gets its data, the AVX
registers and the signal mask are intact, nothing is pending, nothing traces it.
A thread taken while in nanosleep() may see that sleep end early (EINTR, as a handled
signal would make it: rt_sigreturn clears the restart block); the patient counts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from crash_helpers import BEHAVIOUR
from test_crash_safety import KILLED, check_healthy, signal_masks

from plugins.module_utils.careengine.process import StoppedProcess

ROOT = Path(__file__).resolve().parents[3]
# Runs in a child python: stop the patient, borrow thread TID for mmap, a remote call of
# behaviour(1) returning through the stub, and munmap.
SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from plugins.module_utils.careengine.process import CALL_RETURN_STUB, StoppedProcess
pid, tid, behaviour = {pid}, {tid}, {behaviour}
with StoppedProcess(pid) as patient:
    page = patient.remote_syscall(9, 0, 4096, 7, 0x22, (1 << 64) - 1, 0, tid=tid)
    patient.write(page, CALL_RETURN_STUB)
    assert patient.remote_call(behaviour, (1,), page, tid=tid) == 2
    patient.remote_syscall(11, page, 4096, tid=tid)
print("done")
"""
INSTANTS = ("borrow", "syscall-entry", "syscall-exit", "give-back", "call-return", "give-back:2")
ROLES = ("avx", "reader", "sleeper", "main")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("instant", INSTANTS)
def test_tracer_killed_while_borrowing(role, instant, crash_build, start_patient):
    patient = start_patient()
    tid = patient.pid if role == "main" else patient.tids[role]
    mask = signal_masks(patient.pid)
    base = min(int(line.split("-")[0], 16) for line in open(f"/proc/{patient.pid}/maps")
               if line.rstrip().endswith(str(crash_build.binary)))
    script = SCRIPT.format(root=str(ROOT), pid=patient.pid, tid=tid,
                           behaviour=base + crash_build.function_vaddr["behaviour"])
    env = {**os.environ, "LIBCARE_FAULT_INJECT": f"at:{instant}"}
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert killed.returncode in KILLED, killed.stdout + killed.stderr
    assert check_healthy(patient, (0,), mask) == BEHAVIOUR[0]
    patient.echo("after the tracer died")


@pytest.mark.parametrize("role", ROLES)
def test_same_script_completes_without_a_fault(role, crash_build, start_patient):
    """The live path: the thread gets its registers back at the syscall-exit stop (not a
    signal stop): a read() or nanosleep() it was in is restarted, never cut short."""
    patient = start_patient()
    tid = patient.pid if role == "main" else patient.tids[role]
    base = min(int(line.split("-")[0], 16) for line in open(f"/proc/{patient.pid}/maps")
               if line.rstrip().endswith(str(crash_build.binary)))
    script = SCRIPT.format(root=str(ROOT), pid=patient.pid, tid=tid,
                           behaviour=base + crash_build.function_vaddr["behaviour"])
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0 and done.stdout.strip() == "done", done.stdout + done.stderr
    mask = signal_masks(patient.pid)
    assert check_healthy(patient, (0,), mask) == BEHAVIOUR[0]
    last = next(line for line in reversed(patient.lines) if line.startswith("round="))
    assert last.endswith(" naperr=0"), last


@pytest.mark.parametrize("role", ["reader", "sleeper"])
def test_run_for_after_borrowing_a_thread_in_a_system_call(role, start_patient):
    """Resumed with PTRACE_CONT from the syscall-exit stop where it got its registers back
    (run_for), a thread borrowed in read() or nanosleep() still restarts that call."""
    patient = start_patient()
    mask = signal_masks(patient.pid)
    with StoppedProcess(patient.pid) as stopped:
        for _ in range(2):
            assert stopped.remote_syscall(39, tid=patient.tids[role]) == patient.pid      # getpid
            stopped.run_for(0.05)
    assert check_healthy(patient, (0,), mask) == BEHAVIOUR[0]
    patient.echo("after run_for")
    last = next(line for line in reversed(patient.lines) if line.startswith("round="))
    assert last.endswith(" naperr=0") and not any(line.startswith("readerror") for line in patient.lines), last
