"""A function that is always being called again: four threads call it in a tight loop,
so nearly every look finds a thread inside it or in its callee returning into it. Run-until-return gets each busy thread out
(its return address redirected to a trampoline, that thread alone run to it) and patches in
the same stop, within the default timeout, every time. Replacing the level and unpatching
under the same load are done too: threads in the patch code are run out through its own
unwind records. The waits are measured and reported (``waited_us``)."""

from __future__ import annotations

import os
import statistics

import pytest
from apply_helpers import Built, map_count, single_program_project

from plugins.module_utils.careengine.apply import operations

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of other processes needs root")

RUNS = 20
SOURCE = r"""#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static volatile long calls[4];

__attribute__((noinline, noipa)) long step(long r)
{
	return (r * 7 + 3) % 1000003;
}

/* A thread is nearly always in f, or in step() returning into f. */
__attribute__((noinline, noipa)) long f(long x)
{
	long r = x;
	for (int i = 0; i < 2000; i++)
		r = step(r);
	return r % 2 + 1;
}

static void *worker(void *arg)
{
	long index = (long)arg;
	for (;;)
		calls[index] += f(index);
	return NULL;
}

int main(void)
{
	pthread_t tid;

	for (long i = 0; i < 4; i++)
		pthread_create(&tid, NULL, worker, (void *)i);
	for (long round = 0;; round++) {
		printf("round=%ld kind=%ld\n", round, f(3) > 2 ? 100L : 1L);
		fflush(stdout);
		usleep(2000);
	}
}
"""
FIX = (("return r % 2 + 1;", "return r % 2 + 101;"),)


def _anonymous_code(pid: int) -> set[str]:
    """The patient's anonymous executable mappings (the patch's code; a trampoline page)."""
    with open(f"/proc/{pid}/maps") as stream:
        return {line.split()[0] for line in stream if len(line.split()) == 5 and "x" in line.split()[1]}


@pytest.fixture(scope="module")
def busyloop(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "busyloop", SOURCE, FIX)


def test_function_called_in_a_tight_loop_by_four_threads_is_patched_every_time(busyloop, start):
    waits, pauses = [], []
    for run in range(RUNS):
        patient = start(busyloop)
        maps_before = _anonymous_code(patient.pid)
        applied = operations.patch_processes(str(busyloop.patches_dir), [patient.pid])[0]
        assert applied.objects, applied.error
        assert applied.objects[0].action == "applied", f"run {run}: {applied.objects[0].reason}"
        patient.wait_for(lambda line: line.endswith("kind=100"))
        added = _anonymous_code(patient.pid) - maps_before
        assert len(added) == 1, f"a trampoline page was left behind besides the patch's code: {added}"
        assert applied.waited_us is not None
        waits.append(applied.waited_us)
        pauses.append(applied.paused_us)
        patient.stop()
    print(f"\n{RUNS} runs: waited_us median {statistics.median(waits)} max {max(waits)}; "
          f"paused_us median {statistics.median(pauses)} max {max(pauses)}")


def test_replacing_a_level_under_the_same_load_is_applied(busyloop, start):
    # Replacing a level also guards the applied patch's own code. Its unwind records
    # (read back from the patient) give each thread busy there an exit point, so it is
    # run out like one busy in the original code, not polled (which timed out here).
    waits = []
    for run in range(RUNS // 4):
        patient = start(busyloop)
        patch_file = str(busyloop.patch_of(busyloop.binary))
        first = operations.patch_processes(patch_file, [patient.pid], level=1)[0].objects[0]
        assert first.action == "applied", first.reason
        patient.wait_for(lambda line: line.endswith("kind=100"))
        maps_patched = map_count(patient.pid)
        result = operations.patch_processes(patch_file, [patient.pid], level=2, timeout=10)[0]
        second = result.objects[0]
        assert second.action == "applied" and second.applied_level == 2, f"run {run}: {second.reason}"
        assert map_count(patient.pid) == maps_patched, "the replaced level or a trampoline page was left behind"
        waits.append(result.waited_us)
        patient.wait_for(lambda line: line.endswith("kind=100"))
        assert patient.alive()
        patient.stop()
    print(f"\n{len(waits)} level replacements: waited_us median {statistics.median(waits)} max {max(waits)}")


def test_unpatching_under_the_same_load_is_done(busyloop, start):
    # Unpatch guards the patch code alone: the threads always in it (f', or step() called
    # from it) are run out through the patch's unwind records, not polled.
    waits = []
    for run in range(RUNS // 4):
        patient = start(busyloop)
        maps_before = map_count(patient.pid)
        applied = operations.patch_processes(str(busyloop.patches_dir), [patient.pid])[0].objects[0]
        assert applied.action == "applied", applied.reason
        patient.wait_for(lambda line: line.endswith("kind=100"))
        result = operations.unpatch_processes([patient.pid], timeout=10)[0]
        removed = result.objects[0]
        assert removed.action == "removed", f"run {run}: {removed.reason}"
        assert map_count(patient.pid) == maps_before, "the patch or a trampoline page was left behind"
        waits.append(result.waited_us)
        patient.wait_for(lambda line: line.endswith("kind=1"))
        patient.stop()
    print(f"\n{len(waits)} unpatches: waited_us median {statistics.median(waits)} max {max(waits)}")
