#!/usr/bin/env python3
"""How long a patient is stopped: patch and unpatch of a one-function patch, 4 threads,
on an idle machine and with two CPU hogs.

The patient is bench/programs/threads4 (four threads calling answer(), the function
the patch replaces; the main thread prints it). ``ROUNDS`` patch/unpatch cycles through
the apply API (what ``libcare-ctl`` calls), each reporting ``paused_us``. Baseline,
measured on the same process in the same run: a bare stop and resume of every thread
(``StoppedProcess`` entered and left), the floor of any change.

Then the same with two ``sh -c 'while :; do :; done'`` hogs on the (2-core) machine,
``LOADED_ROUNDS`` cycles, baselined by the bare stop under the same load; and once more
with the tracer's real-time scheduling off (:mod:`process.realtime`), to show what it buys.

Prints pause_patch_median_us, pause_patch_max_us, pause_unpatch_median_us (idle), and
pause_loaded_patch_p50_us / _p99_us, pause_loaded_unpatch_p99_us,
pause_loaded_norealtime_patch_p50_us / _p99_us (with the hogs).

The pause is every thread stopped; the patch is prepared before it (mapping created,
written, sealed) and replaced levels unmapped after it with one thread held, the others
running: pause_prepare_thread_us (idle median) and pause_loaded_prepare_thread_p99_us are
that one thread's time per patch (``thread_us``), against a bare one-thread stop and
resume (``StoppedThread``) in the same rounds.
"""

from __future__ import annotations

import signal
import sys
import time

from benchlib import (
    Patients,
    build_program,
    emit,
    log,
    median,
    percentile,
    read_lines_until,
    require_root,
    wait_started,
    workdir,
)

from plugins.module_utils.careengine.apply import operations
from plugins.module_utils.careengine.process import StoppedProcess, realtime
from plugins.module_utils.careengine.process.tracer import StoppedThread

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
LOADED_ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 100
HOG = ["sh", "-c", "while :; do :; done"]


def bare_stop_us(pid: int) -> int:
    with StoppedProcess(pid) as stopped:
        pass
    return stopped.paused_ns // 1000


def bare_thread_stop_us(pid: int) -> int:
    with StoppedThread(pid) as held:
        pass
    return held.paused_ns // 1000


def checked(results, action: str):
    [result] = results
    if not result.ok or [o.action for o in result.objects] != [action]:
        raise SystemExit(f"bench: {action} failed: {result.to_json()}")
    return result


def one(results, action: str) -> int:
    return checked(results, action).paused_us


def cycles(patient, patchroot: str, rounds: int, threads: list[tuple[int, int]] | None = None
           ) -> tuple[list[int], list[int], list[int]]:
    """``rounds`` of (bare stop, patch, unpatch): their pauses in us; with ``threads``, the
    patch's one-thread time and a bare one-thread stop's, in us, are appended to it."""
    patched, unpatched, bare = [], [], []
    for _ in range(rounds):
        bare.append(bare_stop_us(patient.pid))
        result = checked(operations.patch_processes(patchroot, [patient.pid]), "applied")
        patched.append(result.paused_us)
        if threads is not None:
            threads.append((result.thread_us, bare_thread_stop_us(patient.pid)))
        time.sleep(0.01)
        unpatched.append(one(operations.unpatch_processes([patient.pid]), "removed"))
        time.sleep(0.01)
    return patched, unpatched, bare


def check_behaviour(patient, patchroot: str) -> None:
    """The patch works: the program answers 43 patched, 42 again unpatched."""
    one(operations.patch_processes(patchroot, [patient.pid]), "applied")
    read_lines_until(patient, lambda line: line.startswith("threads4 answer=43"), 10)
    one(operations.unpatch_processes([patient.pid]), "removed")
    read_lines_until(patient, lambda line: line.startswith("threads4 answer=42"), 10)


def main() -> None:
    require_root()
    with workdir() as where, Patients() as patients:
        built = build_program("threads4", where)
        patchroot = str(built.patchroot)
        patient = patients.start([str(built.binary)], output=True)
        wait_started([patient.pid])
        read_lines_until(patient, lambda line: line.startswith("threads4 answer=42"), 10)
        check_behaviour(patient, patchroot)
        threads: list[tuple[int, int]] = []
        patched, unpatched, bare = cycles(patient, patchroot, ROUNDS, threads)
        log(f"threads4 pid {patient.pid}, {ROUNDS} rounds; patch us {sorted(patched)}; "
            f"unpatch us {sorted(unpatched)}; bare stop/resume us {sorted(bare)}")
        hogs = [patients.start(HOG) for _ in range(2)]
        loaded_threads: list[tuple[int, int]] = []
        loaded = cycles(patient, patchroot, LOADED_ROUNDS, loaded_threads)
        realtime.enabled = False
        unboosted = cycles(patient, patchroot, LOADED_ROUNDS)
        realtime.enabled = True
        for hog in hogs:
            hog.send_signal(signal.SIGKILL)
        log(f"with 2 hogs, {LOADED_ROUNDS} rounds: patch us {sorted(loaded[0])}; unpatch us {sorted(loaded[1])}; "
            f"bare us {sorted(loaded[2])}; without real-time: patch us {sorted(unboosted[0])}, "
            f"bare us {sorted(unboosted[2])}")
        emit("pause_patch_median_us", median(patched), "us", median(bare), digits=1)
        emit("pause_patch_max_us", max(patched), "us", max(bare), digits=1)
        emit("pause_unpatch_median_us", median(unpatched), "us", median(bare), digits=1)
        emit("pause_loaded_patch_p50_us", median(loaded[0]), "us", median(loaded[2]), digits=1)
        emit("pause_loaded_patch_p99_us", percentile(loaded[0], 0.99), "us", percentile(loaded[2], 0.99), digits=1)
        emit("pause_loaded_unpatch_p99_us", percentile(loaded[1], 0.99), "us", percentile(loaded[2], 0.99), digits=1)
        emit("pause_loaded_norealtime_patch_p50_us", median(unboosted[0]), "us", median(unboosted[2]), digits=1)
        emit("pause_loaded_norealtime_patch_p99_us", percentile(unboosted[0], 0.99), "us",
             percentile(unboosted[2], 0.99), digits=1)
        emit("pause_prepare_thread_us", median([t for t, _ in threads]), "us",
             median([b for _, b in threads]), digits=1)
        emit("pause_loaded_prepare_thread_p99_us", percentile([t for t, _ in loaded_threads], 0.99), "us",
             percentile([b for _, b in loaded_threads], 0.99), digits=1)
        log(f"loaded patch p99 / idle patch median: {percentile(loaded[0], 0.99) / median(patched):.1f}")


if __name__ == "__main__":
    main()
