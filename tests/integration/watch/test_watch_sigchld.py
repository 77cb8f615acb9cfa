"""SIGCHLD reaches the service's main thread only: a stop waits for it there with
``sigtimedwait``, and one taken by another thread (the fanotify reader) held each patient
~10 ms longer (the tracer's poll cap): 17 of 60 pauses at ~11 ms in bench/watch.py's idle
rounds against a 1 ms median."""

from __future__ import annotations

import os
import signal

from watch_helpers import proc_status


def _blocked(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/status") as stream:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in stream if ":\t" in line)
    return int(fields["SigBlk"], 16)


def test_only_the_main_thread_of_the_service_takes_sigchld(service):
    pid = service.process.pid
    assert proc_status(pid)["Name"].startswith("python")
    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
    assert others, "the service runs its fanotify reader in a thread"
    bit = 1 << (signal.SIGCHLD - 1)
    assert not _blocked(pid, pid) & bit                # its loop wakes up on SIGCHLD
    assert all(_blocked(pid, tid) & bit for tid in others)
