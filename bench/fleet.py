#!/usr/bin/env python3
"""A fleet: ``COUNT`` running processes of one program patched in one call, then unpatched.

The patients are bench/programs/sleeper (single-threaded, calls answer() every 100 ms).
One call of ``fleet.run_parallel`` (default jobs: one per CPU) with the per-process
function ``operations.patch_processes`` uses (``operations._safely`` + ``engine.patch_process``), then
the same for unpatch; every process must report applied, then removed. Baseline, same
run, same processes: the serial loop (jobs=1, the parent alone, as ``operations`` does today).
Three rounds of (patch, unpatch, serial patch, serial unpatch); medians.
Peak memory: ru_maxrss of the parent plus that of every worker (from wait4), summed: an
upper bound, shared copy-on-write pages count once per worker.

Prints fleet_patch_1000_s, fleet_unpatch_1000_s, fleet_peak_rss_mb (names keep 1000
whatever ``COUNT`` is; the log says the count).
"""

from __future__ import annotations

import resource
import sys
import time

from benchlib import Patients, build_program, emit, log, median, require_root, wait_started, workdir

from plugins.module_utils.careengine.apply import engine, fleet, operations
from plugins.module_utils.careengine.results import summarize_results
from plugins.module_utils.careengine.storage import PatchSource

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
JOBS = int(sys.argv[2]) if len(sys.argv) > 2 else None
REPEATS = 3


def patch_one(source: PatchSource):
    """The per-process patch function of ``operations.patch_processes``."""
    return lambda pid: operations._safely(pid, engine.patch_process, source, level=None, timeout=5.0, retries=0,
                                   check=False)


def unpatch_one(pid: int):
    """The per-process unpatch function of ``operations.unpatch_processes``."""
    return operations._safely(pid, engine.unpatch_process, None, timeout=5.0, check=False)


def timed_run(function, pids: list[int], jobs: int | None, expected: str) -> tuple[float, fleet.FleetStats]:
    stats = fleet.FleetStats()
    started = time.perf_counter()
    results = fleet.run_parallel(function, pids, jobs, stats=stats)
    spent = time.perf_counter() - started
    summary = summarize_results(results)
    if summary[expected] != len(pids) or len(results) != len(pids):
        bad = [r.to_json() for r in results if not r.ok][:3]
        raise SystemExit(f"bench: expected {len(pids)} {expected}, got {summary}; e.g. {bad}")
    return spent, stats


def main() -> None:
    require_root()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * COUNT + 256)), hard))
    with workdir() as where, Patients() as patients:
        built = build_program("sleeper", where)
        started = time.perf_counter()
        pids = [patients.start([str(built.binary)]).pid for _ in range(COUNT)]
        wait_started(pids)
        log(f"{COUNT} sleepers started in {time.perf_counter() - started:.2f}s")
        source = PatchSource(str(built.patchroot))

        times: dict[str, list[float]] = {"patch": [], "unpatch": [], "serial patch": [], "serial unpatch": []}
        peak_kb = 0
        for _ in range(REPEATS):      # interleaved, so drifts of the machine's load hit both alike
            for name, function, jobs, expected in (("patch", patch_one(source), JOBS, "applied"),
                                                   ("unpatch", unpatch_one, JOBS, "removed"),
                                                   ("serial patch", patch_one(source), 1, "applied"),
                                                   ("serial unpatch", unpatch_one, 1, "removed")):
                spent, stats = timed_run(function, pids, jobs, expected)
                times[name].append(spent)
                if jobs != 1:
                    peak_kb = max(peak_kb, stats.total_maxrss_kb)
                    log(f"{name}: {spent:.2f}s, {stats}")
        log(f"{COUNT} processes, seconds per call: " + "; ".join(
            f"{name} {[round(t, 3) for t in spent]}" for name, spent in times.items()))
        emit("fleet_patch_1000_s", median(times["patch"]), "s", median(times["serial patch"]))
        emit("fleet_unpatch_1000_s", median(times["unpatch"]), "s", median(times["serial unpatch"]))
        emit("fleet_peak_rss_mb", peak_kb / 1024, "MB", None, digits=1)


if __name__ == "__main__":
    main()
