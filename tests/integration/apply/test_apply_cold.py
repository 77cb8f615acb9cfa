"""A function gcc split into ``foo`` and ``foo.cold``: a thread in either part is busy.

The patch's record for ``foo`` covers only ``foo``; the original ``foo.cold`` is found by
name in the object's ``.symtab`` and guarded too; in a stripped binary it is found from
foo's jumps and the CFI (apply/split_parts.py). After the patch, the new cold part
(``foo.cold.kpatch``) lives in the patch mapping, which unpatch guards as a whole.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from apply_helpers import Built, ctl, single_program_project

from plugins.module_utils.careengine.apply import operations
from plugins.module_utils.careengine.apply.object_files import forget_objects

# A worker thread calls foo() in a loop. SIGUSR1 makes foo take its cold path, which
# calls wait_here(): it blocks (sleeping) until SIGUSR2, so the worker's stack holds a
# return address into foo.cold. The main thread reports foo's last answer and how many
# times a thread entered wait_here.
COLD_MAIN = r"""#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static volatile sig_atomic_t park;
static volatile int last, entered;

__attribute__((noinline, cold)) void wait_here(int x)
{
	entered++;
	while (park)
		usleep(1000);
	last = -x;
}

__attribute__((noinline)) int foo(int x)
{
	if (__builtin_expect(park, 0)) {
		wait_here(x);
		x = (x * 5) ^ 0x55;
	}
	return x * 3 + 1;
}

static void *worker(void *arg)
{
	(void)arg;
	for (;;) {
		last = foo(5);
		usleep(500);
	}
	return NULL;
}

static void on_signal(int number)
{
	park = number == SIGUSR1;
}

int main(void)
{
	pthread_t tid;
	sigset_t mask;

	signal(SIGUSR1, on_signal);
	signal(SIGUSR2, on_signal);
	/* Only the main thread takes the signals: the worker sleeps on undisturbed. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGUSR2);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	pthread_create(&tid, NULL, worker, NULL);
	pthread_sigmask(SIG_UNBLOCK, &mask, NULL);
	for (long round = 0;; round++) {
		printf("round=%ld value=%d entered=%d\n", round, last, entered);
		fflush(stdout);
		usleep(5000);
	}
	return 0;
}
"""
COLD_FIX = (("return x * 3 + 1;", "return x * 3 + 2;"),)
ORIGINAL, PATCHED = 16, 17          # foo(5) before and after the fix


@pytest.fixture(scope="module")
def cold_project(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "cold", COLD_MAIN, COLD_FIX)


def _symbols(binary: Path) -> set[str]:
    listing = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in listing.splitlines() if line.split()}


def _entered(line: str) -> int:
    return int(re.search(r"entered=(\d+)", line).group(1))


def _park(patient) -> None:
    """Send SIGUSR1 and wait until the worker sits in foo's cold path."""
    count = _entered(patient.lines[-1])
    os.kill(patient.pid, signal.SIGUSR1)
    patient.wait_for(lambda line: _entered(line) > count)


def test_thread_in_cold_part_blocks_patch_and_unpatch(cold_project, start):
    symbols = _symbols(cold_project.binary)
    if not any(re.fullmatch(r"foo\.cold(\.\d+)?", name) for name in symbols):
        pytest.skip("gcc did not split foo into foo and foo.cold at -O2")
    patch = str(cold_project.patch_of(cold_project.binary))
    patient = start(cold_project)
    patient.wait_for(lambda line: f"value={ORIGINAL} " in line)

    # Apply: the worker returns into the original foo.cold, so foo is busy.
    _park(patient)
    refused = ctl("patch", "-p", str(patient.pid), "--timeout", "0.5", patch)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert re.search(r"thread \d+ (returns|may return) into foo \(foo\.cold(\.\d+)?\)", refused.stderr), \
        refused.stderr
    os.kill(patient.pid, signal.SIGUSR2)
    patient.wait_for(lambda line: f"value={ORIGINAL} " in line)
    applied = ctl("patch", "-p", str(patient.pid), "--timeout", "2", patch)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    patient.wait_for(lambda line: f"value={PATCHED} " in line)

    # Unpatch: the worker now returns into the new cold part, in the patch mapping.
    _park(patient)
    result, = operations.unpatch_processes([patient.pid], timeout=0.3)
    removed, = result.objects
    assert removed.action == "failed", removed
    assert re.search(r"thread \d+ (returns|may return) into the level-\d+ patch code \(foo\)", removed.reason), \
        removed.reason
    os.kill(patient.pid, signal.SIGUSR2)
    patient.wait_for(lambda line: f"value={PATCHED} " in line)
    result, = operations.unpatch_processes([patient.pid], timeout=2.0)
    assert result.objects[0].action == "removed", result.objects[0]
    patient.wait_for(lambda line: f"value={ORIGINAL} " in line)


def test_thread_in_cold_part_of_a_stripped_binary_blocks_patch(cold_project, start, tmp_path):
    """Without .symtab the cold part is found from foo's jumps and the CFI (strip keeps
    .eh_frame and the build-id, so the patch still matches)."""
    if not any(re.fullmatch(r"foo\.cold(\.\d+)?", name) for name in _symbols(cold_project.binary)):
        pytest.skip("gcc did not split foo into foo and foo.cold at -O2")
    stripped_dir = tmp_path / "bin"
    stripped_dir.mkdir()
    stripped = stripped_dir / "cold"
    subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(cold_project.binary)], check=True)
    assert not _symbols_or_none(stripped)
    patch = str(cold_project.patch_of(cold_project.binary))
    forget_objects()            # files are cached by build-id: the unstripped one may be cached
    patient = start(Built(cold_project.root, stripped, cold_project.libdir, cold_project.patches,
                          cold_project.patches_dir))
    patient.wait_for(lambda line: f"value={ORIGINAL} " in line)

    _park(patient)
    result, = operations.patch_processes(patch, [patient.pid], timeout=0.5)
    refused, = result.objects
    assert refused.action == "failed", refused
    assert re.search(r"thread \d+ (returns|may return) into foo \(its split-off part at 0x[0-9a-f]+\)",
                     refused.reason), refused.reason
    os.kill(patient.pid, signal.SIGUSR2)
    patient.wait_for(lambda line: f"value={ORIGINAL} " in line)
    result, = operations.patch_processes(patch, [patient.pid], timeout=2.0)
    assert result.objects[0].action == "applied", result.objects[0]
    patient.wait_for(lambda line: f"value={PATCHED} " in line)
    result, = operations.unpatch_processes([patient.pid], timeout=2.0)
    assert result.objects[0].action == "removed", result.objects[0]
    forget_objects()


def _symbols_or_none(binary: Path) -> set[str]:
    listing = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=False)
    return {line.split()[-1] for line in listing.stdout.splitlines() if line.split()}
