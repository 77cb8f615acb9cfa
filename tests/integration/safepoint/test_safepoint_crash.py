"""The engine killed (SIGKILL) while a thread runs to its return address: nothing was written
into the program's code, so the patient goes on exactly as before; the thread returns
through the trampoline to where it would have returned, with its return value intact.
(A kill that lands after the engine finished is retried: the test wants one mid-run.)"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from apply_helpers import ROOT, Built, single_program_project
from waiting import eventually

from plugins.module_utils.careengine.apply.run_to_return import TRAMPOLINE_CODE
from plugins.module_utils.careengine.process import read_maps, read_memory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of other processes needs root")

SOURCE = r"""#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline, noipa)) long f(long x)
{
	usleep(1000000);			/* a thread is nearly always in here */
	return x + 1;
}

static void *worker(void *arg)
{
	(void)arg;
	for (long round = 0;; round++) {
		long value = f(round);
		printf("round=%ld result=%s\n", round,
			value == round + 1 ? "old" : value == round + 2 ? "new" : "wrong");
		fflush(stdout);
	}
	return NULL;
}

int main(void)
{
	pthread_t tid;

	pthread_create(&tid, NULL, worker, NULL);
	for (;;)
		pause();
}
"""

APPLY = """import sys
from plugins.module_utils.careengine.apply import operations
operations.patch_processes(sys.argv[1], [int(sys.argv[2])], timeout=30)
"""


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "sleeper", SOURCE, (("return x + 1;", "return x + 2;"),))


def trampoline_page(pid: int) -> int | None:
    """The engine's trampoline page in ``pid``, if one is mapped."""
    for mapping in read_maps(pid):
        if mapping.executable and not mapping.path and mapping.size == 4096:
            try:
                if read_memory(pid, mapping.start, len(TRAMPOLINE_CODE)) == TRAMPOLINE_CODE:
                    return mapping.start
            except Exception:  # noqa: BLE001 - unmapped meanwhile
                continue
    return None


def redirected(pid: int, page: int) -> bool:
    """Whether a writable anonymous mapping (a thread stack) holds the trampoline's address."""
    wanted = struct.pack("<Q", page)
    for mapping in read_maps(pid):
        if mapping.writable and not mapping.is_file and mapping.size <= 64 << 20:
            try:
                if wanted in read_memory(pid, mapping.start, mapping.size):
                    return True
            except Exception:  # noqa: BLE001 - unmapped meanwhile
                continue
    return False


def kill_engine_mid_run(built: Built, pid: int) -> bool:
    """Start the engine on ``pid`` and SIGKILL it once a return address points at its
    trampoline; False if it finished first (the thread was outside f, or the kill came late)."""
    engine = subprocess.Popen([sys.executable, "-c", APPLY, str(built.patches_dir), str(pid)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(Path(ROOT))})
    try:
        assert eventually(lambda: trampoline_page(pid) is not None or engine.poll() is not None,
                          timeout=30, interval=0.001)
        page = trampoline_page(pid)
        if page is None or not eventually(lambda: redirected(pid, page) or engine.poll() is not None,
                                          timeout=10, interval=0.001):
            return False
        if engine.poll() is not None:
            return False
        os.kill(engine.pid, signal.SIGKILL)
    finally:
        engine.wait(timeout=30)
    # Still mapped: it was killed before the end of its wait (a finished run unmaps the page).
    return trampoline_page(pid) == page


def test_engine_killed_while_a_thread_runs_to_its_return(sleeper, start):
    for _ in range(5):
        patient = start(sleeper)
        patient.wait_for(lambda line: line.startswith("round="), after=0)
        if kill_engine_mid_run(sleeper, patient.pid):
            break
        patient.stop()                    # it finished first: try again on a fresh patient
    else:
        pytest.fail("the engine was never caught running a thread to its return")
    seen = len(patient.lines)
    for _ in range(3):                 # the redirected return, then normal rounds
        patient.wait_for(lambda line: line.startswith("round="), timeout=10)
    assert patient.alive()
    # The old f (no jump was written yet), with the right value: a return through the
    # trampoline keeps %rax.
    rounds = [line for line in patient.lines[seen:] if line.startswith("round=")]
    assert rounds and all(line.endswith("result=old") for line in rounds), rounds
    status = Path(f"/proc/{patient.pid}/status").read_text()
    assert "TracerPid:\t0" in status
