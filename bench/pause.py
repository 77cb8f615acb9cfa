#!/usr/bin/env python3
"""How long a patient is stopped: patch and unpatch of a one-function patch, 4 threads.

The patient is bench/programs/threads4 (four threads calling answer(), the function
the patch replaces; the main thread prints it). ``ROUNDS`` patch/unpatch cycles through
the apply API (what ``libcare-ctl`` calls), each reporting ``paused_us``. Baseline,
measured on the same process in the same run: a bare stop and resume of every thread
(``StoppedProcess`` entered and left), the floor of any change.

Prints pause_patch_median_us, pause_patch_max_us, pause_unpatch_median_us.
"""

from __future__ import annotations

import sys
import time

from benchlib import Patients, build_program, emit, log, median, read_lines_until, require_root, wait_started, workdir

from plugins.module_utils.careengine.apply import operations
from plugins.module_utils.careengine.process import StoppedProcess

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 30


def bare_stop_us(pid: int) -> int:
    with StoppedProcess(pid) as stopped:
        pass
    return stopped.paused_ns // 1000


def one(results, action: str) -> int:
    [result] = results
    if not result.ok or [o.action for o in result.objects] != [action]:
        raise SystemExit(f"bench: {action} failed: {result.to_json()}")
    return result.paused_us


def main() -> None:
    require_root()
    with workdir() as where, Patients() as patients:
        built = build_program("threads4", where)
        patient = patients.start([str(built.binary)], output=True)
        wait_started([patient.pid])
        read_lines_until(patient, lambda line: line.startswith("threads4 answer=42"), 10)
        patched, unpatched, bare = [], [], []
        for round_number in range(ROUNDS):
            bare.append(bare_stop_us(patient.pid))
            patched.append(one(operations.patch_processes(str(built.patchroot), [patient.pid]), "applied"))
            if round_number == 0:     # the patch works: the program now answers 43
                read_lines_until(patient, lambda line: line.startswith("threads4 answer=43"), 10)
            time.sleep(0.01)
            unpatched.append(one(operations.unpatch_processes([patient.pid]), "removed"))
            if round_number == 0:
                read_lines_until(patient, lambda line: line.startswith("threads4 answer=42"), 10)
            time.sleep(0.01)
        log(f"threads4 pid {patient.pid}, {ROUNDS} rounds; patch us {sorted(patched)}; "
            f"unpatch us {sorted(unpatched)}; bare stop/resume us {sorted(bare)}")
        emit("pause_patch_median_us", median(patched), "us", median(bare), digits=1)
        emit("pause_patch_max_us", max(patched), "us", max(bare), digits=1)
        emit("pause_unpatch_median_us", median(unpatched), "us", median(bare), digits=1)


if __name__ == "__main__":
    main()
