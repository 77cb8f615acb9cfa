"""A fleet of real processes patched in one call by forked workers (fleet.run_parallel).

200 processes of the nonpie fixture, its patch from libcare-patch-make. One call patches
each exactly once (one applied result each, one patch mapping each, each prints PATCHED);
a process that exits during the run (reaped at once, or left a zombie) is reported
failed with the reason and the others are patched; a second call skips them all; one call unpatches them all (each prints
UNPATCHED again, no patch mapping left). Every process started here is killed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from plugins.module_utils.careengine.apply import engine, fleet, operations
from plugins.module_utils.careengine.process import find_applied_patches, read_maps
from plugins.module_utils.careengine.results import summarize_results
from plugins.module_utils.careengine.storage import PatchSource

pytest.importorskip("plugins.module_utils.careengine.asm.gensrc", reason="the asm diff has not landed yet")

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "projects" / "nonpie"
PATCH_MAKE = ROOT / "bin" / "libcare-patch-make"
COUNT = 200
JOBS = 2

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of other processes needs root")


@pytest.fixture(scope="module")
def nonpie(tmp_path_factory) -> tuple[Path, Path]:
    """(the original binary, the patch store directory) of the nonpie fixture."""
    project = Path(shutil.copytree(FIXTURE, tmp_path_factory.mktemp("fleet") / "nonpie"))
    result = subprocess.run([str(PATCH_MAKE), "fix.patch"], cwd=project, capture_output=True, text=True,
                            check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return project / "lpmake" / "usr" / "local" / "bin" / "nonpie", project / "patchroot"


class Fleet:
    """COUNT running patients, each printing into its own file."""

    def __init__(self, binary: Path, where: Path) -> None:
        self.where = where
        self.processes: list[subprocess.Popen] = []
        for index in range(COUNT):
            with open(where / f"out-{index}", "w") as output:
                self.processes.append(subprocess.Popen([str(binary)], stdin=subprocess.DEVNULL, stdout=output,
                                                       stderr=subprocess.STDOUT))
        self.pids = [p.pid for p in self.processes]
        deadline = time.monotonic() + 30
        while any(not self.output(i) for i in range(COUNT)):     # each has printed: past the dynamic linker
            assert time.monotonic() < deadline, "the patients did not start"
            time.sleep(0.05)

    def output(self, index: int) -> str:
        return (self.where / f"out-{index}").read_text()

    def wait_every_output(self, indices: list[int], word: str, timeout: float = 20.0) -> None:
        """Wait until each patient of ``indices`` printed a line starting with ``nonpie word``
        after what it had printed when called."""
        marks = {i: len(self.output(i)) for i in indices}
        deadline = time.monotonic() + timeout
        waiting = set(indices)
        while waiting:
            waiting = {i for i in waiting if f"\nnonpie {word} " not in "\n" + self.output(i)[marks[i]:]}
            assert not waiting or time.monotonic() < deadline, \
                f"{len(waiting)} patients never printed 'nonpie {word}', e.g. {self.output(min(waiting))[-200:]!r}"
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=10)


@pytest.fixture
def fleet_of(nonpie, tmp_path):
    started: list[Fleet] = []

    def _start() -> Fleet:
        patients = Fleet(nonpie[0], tmp_path)
        started.append(patients)
        return patients

    yield _start
    for patients in started:
        patients.stop()


def patch_function(source: PatchSource, victims: tuple[int, ...] = ()):
    """The per-process function of operations.patch_processes; a process of ``victims`` is killed
    when its turn comes (a process exiting during the run) and handled once it has exited."""
    def patch_one(pid: int):
        if pid in victims:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _state(pid) not in ("Z", "gone") and time.monotonic() < deadline:
                time.sleep(0.005)
        return operations._safely(pid, engine.patch_process, source, level=None, timeout=5.0, retries=0, check=False)
    return patch_one


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def unpatch_function(pid: int):
    """The per-process function of operations.unpatch_processes."""
    return operations._safely(pid, engine.unpatch_process, None, timeout=5.0, check=False)


def applied_patch_count(pid: int) -> int:
    return len(find_applied_patches(pid, read_maps(pid)))


def test_fleet_patch_skip_unpatch(nonpie, fleet_of):
    _, patchroot = nonpie
    patients = fleet_of()
    # Two processes exit during the run: one is reaped at once (its pid vanishes), the
    # other stays a zombie (its parent, this test, has not waited for it yet).
    vanished, zombie = COUNT // 2, COUNT // 3
    reaper = threading.Thread(target=patients.processes[vanished].wait, daemon=True)
    reaper.start()
    source = PatchSource(str(patchroot))
    others = [i for i in range(COUNT) if i not in (vanished, zombie)]

    stats = fleet.FleetStats()
    results = fleet.run_parallel(patch_function(source, (patients.pids[vanished], patients.pids[zombie])),
                                 patients.pids, JOBS, stats=stats)

    assert [r.pid for r in results] == patients.pids
    assert stats.workers_started >= JOBS and stats.workers_died == 0
    for index in (vanished, zombie):
        gone = results[index]
        assert not gone.ok and gone.objects == () and gone.paused_us is None
        assert str(patients.pids[index]) in gone.error, gone.error
        assert "does not exist" in gone.error or "exited" in gone.error, gone.error
    for index in others:
        result = results[index]
        assert result.error == "" and [o.action for o in result.objects] == ["applied"], result.to_json()
        assert result.objects[0].functions == ("report",) and result.paused_us is not None
        assert applied_patch_count(result.pid) == 1           # exactly once: one patch mapping
    assert summarize_results(results) == {"applied": COUNT - 2, "skipped": 0, "removed": 0, "failed": 2}
    patients.wait_every_output(others, "PATCHED")

    survivors = [patients.pids[i] for i in others]
    again = fleet.run_parallel(patch_function(source), survivors, JOBS)
    assert summarize_results(again) == {"applied": 0, "skipped": COUNT - 2, "removed": 0, "failed": 0}, \
        [r for r in again if [o.action for o in r.objects] != ["skipped"]][:1]
    assert all("already applied" in r.objects[0].reason for r in again)
    assert all(applied_patch_count(pid) == 1 for pid in survivors)

    removed = fleet.run_parallel(unpatch_function, survivors, JOBS)
    assert summarize_results(removed) == {"applied": 0, "skipped": 0, "removed": COUNT - 2, "failed": 0}
    assert all(applied_patch_count(pid) == 0 for pid in survivors)
    patients.wait_every_output(others, "UNPATCHED")
    assert all(patients.processes[i].poll() is None for i in others)
