"""The safety check unwinds through the code of an applied patch (its own unwind records).

A reader thread is blocked in ``read()`` inside ``g``, called by ``f``, called by ``c``.
Level 1 replaces ``f``: the thread then blocks in ``g`` called from the level-1 patch
code. Level 2 replaces ``f`` again and ``c``, the caller of the patch code. The walk of
the reader's stack must go on through the patch frame (``f'``) to ``c``:

* the walk is complete and sees ``c`` above the patch frame;
* level 2 is refused while the thread stays blocked (the patient runs on, level 1);
* with a byte sent to the thread now and then, level 2 is applied: the thread is run
  alone until it returns from ``c`` (its exit point, found only through the patch's
  records). Polled instead, it is found back in ``read()`` under ``f'`` at every look.

A level-1 patch built without unwind tables keeps the conservative path: the walk
stops in its code, and the refusal says that it has no unwind records.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
from apply_helpers import Built, Patient, built_with, make_diff, patch_make, single_program_project

from plugins.module_utils.careengine.apply import engine, operations
from plugins.module_utils.careengine.apply.safety import GuardedRange, ThreadState, stack_ranges, walk_frames
from plugins.module_utils.careengine.process import StoppedProcess, read_ranges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of other processes needs root")

SOURCE = r"""#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Blocks in read() until the test sends a byte. */
__attribute__((noinline, noipa)) long g(void)
{
	char byte;

	if (read(0, &byte, 1) != 1)
		exit(0);
	return byte;
}

__attribute__((noinline, noipa)) long f(void)
{
	return g() + 1;
}

__attribute__((noinline, noipa)) long c(void)
{
	return f() * 10;
}

static void *reader(void *arg)
{
	(void)arg;
	for (;;) {
		long value = c();

		printf("value=%ld\n", value);
		fflush(stdout);
	}
	return NULL;
}

int main(void)
{
	pthread_t tid;
	char go;

	printf("started\n");
	fflush(stdout);
	if (read(0, &go, 1) != 1)	/* the reader enters c only once the test says so */
		return 0;
	pthread_create(&tid, NULL, reader, NULL);
	for (;;)
		sleep(1);
}
"""
LEVEL1 = (("return g() + 1;", "return g() + 2;"),)
LEVEL2 = (("return g() + 1;", "return g() + 2;"), ("return f() * 10;", "return f() * 100;"))
BYTE = "A"                                 # 65: values 660 (original), 670 (level 1), 6700 (level 2)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Built, str, str]:
    """The program, its level-1 patch (f) and its level-2 patch (f and c)."""
    built = single_program_project(tmp_path_factory, "chain", SOURCE, LEVEL1)
    make_diff(built.root, "chain.c", LEVEL2, "level2.patch")
    level2 = patch_make(built.root, "level2.patch")[1]
    return built, str(built.patch_of(built.binary)), str(next(iter(level2.values())))


# The same program with g in a unit of its own, and the others (those the patches
# change) built without unwind tables: the patches carry no unwind records.
G_SOURCE = SOURCE[SOURCE.index("/* Blocks"):SOURCE.index("__attribute__((noinline, noipa)) long f")]
NO_TABLES_SOURCE = SOURCE.replace(G_SOURCE, "long g(void);\n\n")
NO_TABLES_MAKEFILE = """CFLAGS ?= -O2 -Wall
PREFIX ?= /usr/local
all: chain
chain.o: chain.c
\t$(CC) $(CFLAGS) -fno-asynchronous-unwind-tables -fno-unwind-tables -fPIE -c -o $@ chain.c
g.o: g.c
\t$(CC) $(CFLAGS) -fPIE -c -o $@ g.c
chain: chain.o g.o
\t$(CC) -pie -o $@ chain.o g.o -lpthread $(LDFLAGS)
install: all
\tinstall -D -m 755 chain $(DESTDIR)$(PREFIX)/bin/chain
clean:
\trm -f chain *.o .kpatch_*
.PHONY: all install clean
"""


@pytest.fixture(scope="module")
def chain_without_tables(tmp_path_factory) -> tuple[Built, str, str]:
    """As :func:`chain`, its patches without unwind records."""
    project = tmp_path_factory.mktemp("apply") / "chain"
    project.mkdir()
    (project / "chain.c").write_text(NO_TABLES_SOURCE)
    (project / "g.c").write_text("#include <stdlib.h>\n#include <unistd.h>\n\n" + G_SOURCE)
    (project / "Makefile").write_text(NO_TABLES_MAKEFILE)
    make_diff(project, "chain.c", LEVEL1, "fix.patch")
    built = built_with(project, "chain", "fix.patch")
    make_diff(project, "chain.c", LEVEL2, "level2.patch")
    level2 = patch_make(project, "level2.patch")[1]
    return built, str(built.patch_of(built.binary)), str(next(iter(level2.values())))


@pytest.fixture
def patient_at_level1(chain):
    """The program at level 1, its reader blocked in g under the level-1 code of f."""
    yield from started_at_level1(chain)


@pytest.fixture
def patient_without_tables(chain_without_tables):
    """As :func:`patient_at_level1`, with the patch without unwind records."""
    yield from started_at_level1(chain_without_tables)


def started_at_level1(chain: tuple[Built, str, str]):
    built, level1, _ = chain
    patient = Patient([str(built.binary)], stdin=subprocess.PIPE)
    try:
        patient.wait_for(lambda line: line == "started", after=0)
        first = operations.patch_processes(level1, [patient.pid], level=1)[0].objects[0]
        assert first.action == "applied", first.reason
        send(patient, "go")
        send(patient, BYTE)
        patient.wait_for(lambda line: line == "value=670", after=0)
        wait_blocked_in_read(patient)
        yield patient
    finally:
        patient.stop()


def send(patient: Patient, text: str) -> None:
    patient.process.stdin.write(text[:1])
    patient.process.stdin.flush()


def reader_tid(patient: Patient) -> int:
    return next(int(tid) for tid in os.listdir(f"/proc/{patient.pid}/task") if int(tid) != patient.pid)


def wait_blocked_in_read(patient: Patient, timeout: float = 10.0) -> None:
    """Poll until the reader thread sleeps in read(2) (syscall 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{patient.pid}/task/{reader_tid(patient)}/syscall") as stream:
                if stream.read().split()[0] == "0":
                    return
        except (OSError, StopIteration, IndexError):
            pass
        time.sleep(0.01)
    raise AssertionError("the reader thread never blocked in read()")


def function_range(built: Built, patient: engine.Patient, name: str) -> GuardedRange:
    mapped = next(o for o in patient.objects if o.path == str(built.binary))
    symbol = patient.file_of(mapped).lookup_local(name)
    return GuardedRange(mapped.load_bias + symbol.vaddr, symbol.size, name)


def test_the_walk_goes_through_the_patch_frame_to_its_caller(chain, patient_at_level1):
    built = chain[0]
    patient = engine.read_patient(patient_at_level1.pid)
    for mapped in patient.objects:
        patient.file_of(mapped)
    applied = next(iter(patient.applied.values()))
    caller = function_range(built, patient, "c")
    rules = engine.patient_rules(patient)
    tid = reader_tid(patient_at_level1)
    with StoppedProcess(patient.pid) as stopped:
        thread = ThreadState(tid, engine._registers(stopped, tid))
        (base, size), = stack_ranges([thread], patient.mappings)
        stack, = read_ranges(patient.pid, [(base, size)])
        frames, complete = walk_frames(thread, stack, base, rules)
    pcs = [frame.pc for frame in frames]
    in_patch = [i for i, pc in enumerate(pcs) if applied.mapping.contains(pc)]
    assert in_patch, f"no frame in the level-1 code: {[hex(pc) for pc in pcs]}"
    assert caller.holds_return_address(pcs[in_patch[0] + 1]), "the frame above the patch frame is not c"
    assert complete, [hex(pc) for pc in pcs]


def test_level2_waits_for_the_thread_under_patch_code_then_applies(chain, patient_at_level1):
    _, _, level2 = chain
    patient = patient_at_level1
    refused = operations.patch_processes(level2, [patient.pid], level=2, timeout=1)[0].objects[0]
    assert refused.action == "failed", refused.reason
    assert "the level-1 patch code (f)" in refused.reason, refused.reason
    assert "no unwind records" not in refused.reason, refused.reason
    assert patient.alive()
    seen = len(patient.lines)
    send(patient, BYTE)
    patient.wait_for(lambda line: line == "value=670", after=seen)      # level 1 still, nothing half-done
    wait_blocked_in_read(patient)

    done = threading.Event()
    results = []

    def apply_level2() -> None:
        try:
            results.append(operations.patch_processes(level2, [patient.pid], level=2, timeout=20)[0])
        finally:
            done.set()

    worker = threading.Thread(target=apply_level2)
    worker.start()
    sent = 0
    while not done.wait(0.05):                     # one byte now and then: one round of the reader each
        send(patient, BYTE)
        sent += 1
    worker.join()
    result = results[0]
    applied = result.objects[0]
    assert applied.action == "applied" and applied.applied_level == 2, applied.reason
    seen = len(patient.lines)
    send(patient, BYTE)
    patient.wait_for(lambda line: line == "value=6700", after=seen)
    print(f"\nlevel 2 applied after {sent} bytes sent; waited_us {result.waited_us}, paused_us {result.paused_us}")


def test_patch_code_without_unwind_records_is_polled_and_the_refusal_says_so(chain_without_tables,
                                                                            patient_without_tables):
    _, _, level2 = chain_without_tables
    patient = patient_without_tables
    refused = operations.patch_processes(level2, [patient.pid], level=2, timeout=1)[0].objects[0]
    assert refused.action == "failed", refused.reason
    assert "the level-1 patch code (f)" in refused.reason, refused.reason
    assert "the level-1 patch code (f) has no unwind records" in refused.reason, refused.reason
    seen = len(patient.lines)
    send(patient, BYTE)
    patient.wait_for(lambda line: line == "value=670", after=seen)      # level 1 still
