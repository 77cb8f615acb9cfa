#!/usr/bin/env python3
"""Wall time of one ``libcare-ctl patch -p PID --json DIR`` invocation, start to exit.

The patient is bench/programs/threads4 (one-function patch, 4 threads). ``ROUNDS``
invocations (each followed by an untimed ``libcare-ctl unpatch``); the median.
Baseline, same run, same patient: ``libcare-ctl info -p PID`` (the same tool's
interpreter start-up and imports plus reading the process, without changing it), so
the ratio shows what patching adds to the fixed cost of starting the tool.

Prints apply_wall_ms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from benchlib import CTL, Patients, build_program, emit, log, median, require_root, wait_started, workdir

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 9


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    return (time.perf_counter() - started) * 1000, result


def main() -> None:
    require_root()
    with workdir() as where, Patients() as patients:
        built = build_program("threads4", where)
        pid = patients.start([str(built.binary)]).pid
        wait_started([pid])
        patch_ms, info_ms = [], []
        for _ in range(ROUNDS):
            spent, result = timed([str(CTL), "info", "-p", str(pid), "-s", ""])
            if result.returncode != 0:
                raise SystemExit(f"bench: libcare-ctl info failed: {result.stderr}")
            info_ms.append(spent)
            spent, result = timed([str(CTL), "patch", "-p", str(pid), "--json", str(built.patchroot)])
            summary = json.loads(result.stdout or "{}").get("summary", {}) if result.returncode == 0 else {}
            if summary.get("applied") != 1:
                raise SystemExit(f"bench: libcare-ctl patch failed: {result.stdout}{result.stderr}")
            patch_ms.append(spent)
            result = subprocess.run([str(CTL), "unpatch", "-p", str(pid)], capture_output=True, text=True,
                                    check=False, timeout=60)
            if result.returncode != 0:
                raise SystemExit(f"bench: libcare-ctl unpatch failed: {result.stderr}")
        log(f"libcare-ctl patch ms {[round(v, 1) for v in sorted(patch_ms)]}; "
            f"libcare-ctl info ms {[round(v, 1) for v in sorted(info_ms)]}")
        emit("apply_wall_ms", median(patch_ms), "ms", median(info_ms), digits=1)


if __name__ == "__main__":
    main()
