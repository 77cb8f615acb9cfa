#!/usr/bin/env python3
"""The resident service (``libcare-ctl watch``): exec-to-patched latency, one patch through
its socket, and the patient's pause idle and with two CPU hogs.

Patient: bench/programs/threads4 (one-function patch, 4 threads), its patch in a store
the service watches.

- ``watch_exec_to_patched_median_ms`` / ``_max_ms``: ``STARTS`` starts of threads4, each
  caught at its exec; from the fanotify event to the patched process let go (the service's
  own record); every start's first line must be the fixed answer (43). Baseline: none.
- ``watch_patch_wall_ms``: one ``libcare-ctl patch -p PID --json STORE`` through the
  service, start to exit, median of ``ROUNDS`` (each after an untimed unpatch). Baseline:
  the start of the launcher's interpreter alone (``python -I -S -c pass``), timed in the
  same rounds: what no client in Python can go under.
- ``watch_patch_service_ms``: the same request sent from this process (no process start:
  the socket round trip, i.e. the service's work with the patient's pause); baseline: the
  pause (``paused_us``) of those patches.
- ``watch_patch_local_wall_ms``: the same command without the service
  (``LIBCARE_NO_SERVICE=1``: Python and engine start-up, the patch already applied);
  baseline: ``watch_patch_wall_ms``.
- ``watch_pause_idle_p50_us`` / ``_p99_us`` and ``watch_pause_loaded_p50_us`` / ``_p99_us``:
  ``paused_us`` of those patches, idle and with two ``sh -c 'while :; do :; done'`` hogs;
  ``watch_pause_loaded_norealtime_*``: the same load, the service started with
  ``--no-realtime`` (its tracer not raised to SCHED_FIFO while the patient is held). Every
  pause figure has the idle median as baseline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (
    CTL,
    ROOT,
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

from plugins.module_utils.careengine.watch import client  # noqa: E402 - benchlib puts ROOT on sys.path

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
# The interpreter bin/libcare-ctl starts (its .venv's, else python3).
LAUNCHER_PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else "python3"
STARTS = int(sys.argv[2]) if len(sys.argv) > 2 else 30


def start_service(store: Path, where: Path, binary: Path, patients: Patients,
                  *extra: str) -> tuple[subprocess.Popen, dict]:
    sock = where / "ctl.sock"
    env = {**os.environ, "LIBCARE_SOCKET": str(sock), "LIBCARE_AUDIT_LOG": str(where / "audit.jsonl")}
    service = subprocess.Popen([str(CTL), "watch", "--store", str(store), "--socket", str(sock), "--path",
                                str(binary.parent), *extra], stdout=subprocess.DEVNULL,
                               stderr=open(where / "service.log", "w"), env=env)
    patients.processes.append(service)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
            return service, env
        except OSError:
            if service.poll() is not None:
                raise SystemExit(f"bench: the service exited: {(where / 'service.log').read_text()}") from None
            time.sleep(0.02)
        finally:
            probe.close()
    raise SystemExit("bench: the service did not start within 60 s")


def ctl(env: dict, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run([str(CTL), *args], capture_output=True, text=True, check=False, timeout=60, env=env)
    return (time.perf_counter() - started) * 1000, result


def timed_run(argv: list[str], env: dict) -> float:
    """Wall ms of one run of ``argv``, output captured as :func:`ctl` does."""
    started = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=False, timeout=60, env=env)
    return (time.perf_counter() - started) * 1000


def request_cycle(env: dict, pid: int, store: Path) -> tuple[float, int]:
    """One unpatch then one patch sent from this process: (round trip ms, paused us)."""
    _, removed = ctl(env, "unpatch", "-p", str(pid))
    if removed.returncode != 0:
        raise SystemExit(f"bench: unpatch failed: {removed.stderr}")
    started = time.perf_counter()
    answer = client.request(["patch", "-p", str(pid), "--json", str(store)], env["LIBCARE_SOCKET"])
    trip = (time.perf_counter() - started) * 1000
    if answer is None or answer[0] != 0:
        raise SystemExit(f"bench: patch through the socket failed: {answer}")
    [process] = json.loads(answer[1])["processes"]
    return trip, process["paused_us"]


def wall_rounds(env: dict, pid: int, store: Path, rounds: int) -> dict[str, list[float]]:
    """``rounds`` of: the interpreter's bare start, a patch by the command line (after an
    unpatch), a patch sent from here (after an unpatch); interleaved, so that the machine's
    load weighs on each alike."""
    figures: dict[str, list[float]] = {"start": [], "wall": [], "pause": [], "trip": [], "trip_pause": []}
    for _ in range(rounds):
        figures["start"].append(timed_run([LAUNCHER_PYTHON, "-I", "-S", "-c", "pass"], env))
        [wall], [pause] = patch_cycles(env, pid, store, 1)
        figures["wall"].append(wall)
        figures["pause"].append(pause)
        trip, trip_pause = request_cycle(env, pid, store)
        figures["trip"].append(trip)
        figures["trip_pause"].append(trip_pause / 1000)
    return figures


def patch_cycles(env: dict, pid: int, store: Path, rounds: int) -> tuple[list[float], list[int]]:
    """``rounds`` unpatch + timed patch; (wall ms, paused us) of the patches."""
    walls, pauses = [], []
    for _ in range(rounds):
        _, removed = ctl(env, "unpatch", "-p", str(pid))
        if removed.returncode != 0:
            raise SystemExit(f"bench: unpatch failed: {removed.stderr}")
        wall, patched = ctl(env, "patch", "-p", str(pid), "--json", str(store))
        if patched.returncode != 0:
            raise SystemExit(f"bench: patch failed: {patched.stdout}{patched.stderr}")
        [process] = json.loads(patched.stdout)["processes"]
        walls.append(wall)
        pauses.append(process["paused_us"])
    return walls, pauses


def main() -> None:
    require_root()
    with workdir() as where, Patients() as patients:
        built = build_program("threads4", where)
        store = built.patchroot
        service, env = start_service(store, where, built.binary, patients)
        for _ in range(STARTS):
            patient = patients.start([str(built.binary), "1"], output=True)
            first = read_lines_until(patient, lambda line: True, 30)
            if first != "threads4 answer=43":
                raise SystemExit(f"bench: a start printed {first!r}, not the fixed answer")
            patient.wait(timeout=30)
        status = json.loads(ctl(env, "watch", "--status", "--json")[1].stdout)
        latencies = [r["latency_ms"] for r in status["recent"] if r["how"] == "exec" and r["latency_ms"]]
        log(f"{STARTS} starts, exec-to-patched ms {sorted(latencies)}")
        emit("watch_exec_to_patched_median_ms", median(latencies), "ms", digits=2)
        emit("watch_exec_to_patched_max_ms", max(latencies), "ms", digits=2)

        patient = patients.start([str(built.binary)], output=True)
        wait_started([patient.pid])
        first = read_lines_until(patient, lambda line: True, 30)
        if first != "threads4 answer=43":
            raise SystemExit(f"bench: the long-running patient printed {first!r} first: {(where / 'service.log').read_text()[-2000:]}")
        walls = wall_rounds(env, patient.pid, store, ROUNDS)
        idle = walls["pause"]
        local = [ctl({**env, "LIBCARE_NO_SERVICE": "1"}, "patch", "-p", str(patient.pid), "--json", str(store))[0]
                 for _ in range(5)]           # already applied: start-up plus the check
        log(f"load average {os.getloadavg()}; patch through the service ms {sorted(walls['wall'])}; "
            f"interpreter start ms {sorted(walls['start'])}; socket round trip ms {sorted(walls['trip'])}; "
            f"without the service {sorted(local)}")
        emit("watch_patch_wall_ms", median(walls["wall"]), "ms", median(walls["start"]), digits=1)
        emit("watch_patch_service_ms", median(walls["trip"]), "ms", median(walls["trip_pause"]), digits=2)
        emit("watch_patch_local_wall_ms", median(local), "ms", median(walls["wall"]), digits=1)
        hogs = [patients.start(["sh", "-c", "while :; do :; done"]) for _ in range(2)]
        _, loaded = patch_cycles(env, patient.pid, store, ROUNDS)
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
        service, env = start_service(store, where, built.binary, patients, "--no-realtime")
        _, unboosted = patch_cycles(env, patient.pid, store, ROUNDS)
        for hog in hogs:
            hog.send_signal(signal.SIGKILL)
        log(f"pause us idle {sorted(idle)}; with 2 hogs {sorted(loaded)}; with 2 hogs and no real-time "
            f"tracer {sorted(unboosted)}")
        emit("watch_pause_idle_p50_us", median(idle), "us", digits=1)
        emit("watch_pause_idle_p99_us", percentile(idle, 0.99), "us", median(idle), digits=1)
        emit("watch_pause_loaded_p50_us", median(loaded), "us", median(idle), digits=1)
        emit("watch_pause_loaded_p99_us", percentile(loaded, 0.99), "us", median(idle), digits=1)
        emit("watch_pause_loaded_norealtime_p50_us", median(unboosted), "us", median(idle), digits=1)
        emit("watch_pause_loaded_norealtime_p99_us", percentile(unboosted, 0.99), "us", median(idle), digits=1)
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)


if __name__ == "__main__":
    main()
