"""Shared by the benchmarks: build a bench program's live patch, start patients, print results.

Every benchmark prints one JSON object per line on stdout::

    {"bench": name, "value": number, "unit": "...", "baseline": number-or-null, "ratio": number-or-null}

with its baseline measured in the same run; progress and notes go to stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROGRAMS = ROOT / "bench" / "programs"
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
PATCH_MAKE = ROOT / "bin" / "libcare-patch-make"
CTL = ROOT / "bin" / "libcare-ctl"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def emit(bench: str, value: float, unit: str, baseline: float | None = None, digits: int = 3) -> dict:
    """Print one result line; the ratio is value / baseline when there is a baseline."""
    ratio = round(value / baseline, 3) if baseline else None
    line = {"bench": bench, "value": round(value, digits), "unit": unit,
            "baseline": None if baseline is None else round(baseline, digits), "ratio": ratio}
    print(json.dumps(line), flush=True)
    return line


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


@dataclass(frozen=True)
class BuiltProgram:
    """A bench program built by libcare-patch-make: the original binary and its patches."""

    name: str
    project: Path
    binary: Path
    patchroot: Path


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A scratch directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="libcare-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build_program(name: str, where: Path) -> BuiltProgram:
    """Copy ``bench/programs/<name>`` to ``where`` and run ``libcare-patch-make fix.patch`` there."""
    project = Path(shutil.copytree(PROGRAMS / name, where / name))
    result = subprocess.run([str(PATCH_MAKE), "fix.patch"], cwd=project, capture_output=True, text=True,
                            check=False, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"bench: libcare-patch-make failed for {name}:\n{result.stdout}{result.stderr}")
    binary = project / "lpmake" / "usr" / "local" / "bin" / name
    patches = list((project / "patchroot").glob("*.kpatch"))
    if not binary.exists() or len(patches) != 1:
        raise SystemExit(f"bench: {name}: expected {binary} and one patch, found {patches}")
    return BuiltProgram(name, project, binary, project / "patchroot")


_BENCH_PID = os.getpid()


def _die_with_parent() -> None:
    """In a patient before exec: SIGKILL when the benchmark dies, however it dies
    (also if it died before this ran)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _BENCH_PID:
        os._exit(1)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(f"bench: terminated by signal {signum}")


class Patients:
    """Processes started by a benchmark; every one is killed on leaving the block, on
    SIGTERM (a time limit), and by the kernel if the benchmark itself is killed."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Patients:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()

    def start(self, argv: list[str], *, output: bool = False) -> subprocess.Popen:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE if output else subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, text=output, close_fds=True,
                                   preexec_fn=_die_with_parent)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
        self.processes.clear()


def read_lines_until(process: subprocess.Popen, predicate: Callable[[str], bool], timeout: float) -> str:
    """Read the process's output until a line matches; that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"bench: patient {process.pid} exited (status {process.poll()})")
        if predicate(line):
            return line.rstrip("\n")
    raise SystemExit(f"bench: no matching output from patient {process.pid} within {timeout}s")


def wait_started(pids: list[int], timeout: float = 30.0) -> None:
    """Wait until every process of ``pids`` runs its program (libc is mapped: the
    dynamic linker is done)."""
    deadline = time.monotonic() + timeout
    waiting = list(pids)
    while waiting and time.monotonic() < deadline:
        still = []
        for pid in waiting:
            try:
                with open(f"/proc/{pid}/maps") as stream:
                    if "/libc.so" not in stream.read():
                        still.append(pid)
            except OSError:
                raise SystemExit(f"bench: process {pid} exited while starting") from None
        waiting = still
        if waiting:
            time.sleep(0.01)
    if waiting:
        raise SystemExit(f"bench: {len(waiting)} process(es) did not start within {timeout}s")


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (ptrace of other processes)")
