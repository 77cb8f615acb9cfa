#!/usr/bin/env python3
"""What a call through a patched function costs: ns per call before and after patching.

The patient is bench/programs/callbench: it times 5 million direct calls of the
noinline function work() per round and prints ns/call. ``CYCLES`` times: read
``ROUNDS`` rounds unpatched (the baseline, same process, same run), patch work() (its
first five bytes become a ``jmp`` to the new code), check that the new code answers,
read ``ROUNDS`` rounds patched, unpatch. Alternating keeps slow drifts of the machine
(other load, clock frequency) from landing on one side. The figure of each state is
its fastest round (the least disturbed); every round is logged.

Prints call_ns_unpatched and call_ns_patched (ratio: patched / unpatched).
"""

from __future__ import annotations

import re
import sys

from benchlib import Patients, build_program, emit, log, read_lines_until, require_root, wait_started, workdir

from plugins.module_utils.careengine.apply import operations

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
CYCLES = int(sys.argv[2]) if len(sys.argv) > 2 else 3
CALLS_PER_ROUND = 5_000_000
SETTLE = 2          # rounds skipped after a change (the round in flight mixes both states)
LINE = re.compile(r"callbench value=(\d+) ns_per_call=([0-9.]+)")


def rounds_with(patient, value: int, count: int) -> list[float]:
    """ns/call of ``count`` rounds in which work(0) answered ``value``, after settling."""
    read_lines_until(patient, lambda line: line.startswith(f"callbench value={value} "), 30)
    timings = []
    skipped = 0
    while len(timings) < count:
        match = LINE.match(read_lines_until(patient, lambda line: line.startswith("callbench"), 30))
        if int(match.group(1)) != value:
            raise SystemExit(f"bench: callbench answered {match.group(1)}, expected {value}")
        if skipped < SETTLE:
            skipped += 1
            continue
        timings.append(float(match.group(2)))
    return timings


def expect(results, action: str) -> None:
    [result] = results
    if not result.ok or [o.action for o in result.objects] != [action]:
        raise SystemExit(f"bench: {action} failed: {result.to_json()}")


def main() -> None:
    require_root()
    with workdir() as where, Patients() as patients:
        built = build_program("callbench", where)
        patient = patients.start([str(built.binary), "-1", str(CALLS_PER_ROUND)], output=True)
        wait_started([patient.pid])
        before: list[float] = []
        after: list[float] = []
        for _ in range(CYCLES):
            before += rounds_with(patient, 1, ROUNDS)
            expect(operations.patch_processes(str(built.patchroot), [patient.pid]), "applied")
            after += rounds_with(patient, 2, ROUNDS)
            expect(operations.unpatch_processes([patient.pid]), "removed")
        log(f"callbench ns/call unpatched {sorted(before)}; patched {sorted(after)}")
        emit("call_ns_unpatched", min(before), "ns", None, digits=4)
        emit("call_ns_patched", min(after), "ns", min(before), digits=4)


if __name__ == "__main__":
    main()
