"""Patients under seccomp: a filter that would kill or deny the engine's own system calls
is read and evaluated before the first remote syscall, and the patch is refused with the
reason while the patient lives on; a filter that allows them does not stand in the way."""

from __future__ import annotations

import os

import pytest
from apply_helpers import Built, map_count, single_program_project

from plugins.module_utils.careengine.apply import operations

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reading seccomp filters needs CAP_SYS_ADMIN")

# argv[1]: "kill" (kill the process on mmap/mprotect with PROT_EXEC), "errno" (EPERM for
# them), "allow" (an allow-list: this loop's syscalls and the engine's), "strict";
# "thread-kill": a second thread installs the "kill" filter for itself only and sleeps.
SOURCE = r"""#include <errno.h>
#include <pthread.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NR offsetof(struct seccomp_data, nr)
#define ARCH offsetof(struct seccomp_data, arch)
#define ARG2 offsetof(struct seccomp_data, args[2])
#define LOAD(off) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, off)
#define RET(value) BPF_STMT(BPF_RET | BPF_K, value)
#define ALLOW_NR(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1), RET(SECCOMP_RET_ALLOW)

__attribute__((noinline, noipa)) int answer(void)
{
	return 1;
}

static void install(const char *mode)
{
	struct sock_filter exec_rule[] = {
		LOAD(ARCH), BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0), RET(SECCOMP_RET_KILL_PROCESS),
		LOAD(NR),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_mmap, 1, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_mprotect, 0, 3),
		LOAD(ARG2), BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 4, 0, 1),
		RET(strcmp(mode, "kill") == 0 ? SECCOMP_RET_KILL_PROCESS : SECCOMP_RET_ERRNO | EPERM),
		RET(SECCOMP_RET_ALLOW),
	};
	struct sock_filter allow_list[] = {
		LOAD(ARCH), BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0), RET(SECCOMP_RET_KILL_PROCESS),
		LOAD(NR),
		ALLOW_NR(__NR_write), ALLOW_NR(__NR_clock_nanosleep), ALLOW_NR(__NR_nanosleep),
		ALLOW_NR(__NR_restart_syscall), ALLOW_NR(__NR_rt_sigreturn), ALLOW_NR(__NR_exit_group),
		ALLOW_NR(__NR_mmap), ALLOW_NR(__NR_mprotect), ALLOW_NR(__NR_munmap), ALLOW_NR(__NR_getpid),
		RET(SECCOMP_RET_KILL_PROCESS),
	};
	struct sock_fprog program = { sizeof(exec_rule) / sizeof(exec_rule[0]), exec_rule };

	if (strcmp(mode, "allow") == 0) {
		program.len = sizeof(allow_list) / sizeof(allow_list[0]);
		program.filter = allow_list;
	}
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	if (strcmp(mode, "strict") == 0)
		prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
	else if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0)
		perror("seccomp");
}

static void *filtered_sleeper(void *arg)
{
	struct timespec forever = { 1000, 0 };

	install("kill");
	*(volatile int *)arg = 1;
	for (;;)
		syscall(__NR_nanosleep, &forever, NULL);
	return NULL;
}

int main(int argc, char **argv)
{
	char line[64];
	struct timespec pause = { 0, 2000000 };
	static volatile int installed;
	pthread_t thread;

	printf("starting\n");
	fflush(stdout);
	if (argc > 1 && strcmp(argv[1], "thread-kill") == 0) {
		pthread_create(&thread, NULL, filtered_sleeper, (void *)&installed);
		while (!installed)
			syscall(__NR_nanosleep, &pause, NULL);
	} else {
		install(argc > 1 ? argv[1] : "none");
	}
	for (long round = 0;; round++) {
		int length = snprintf(line, sizeof(line), "round=%ld answer=%d\n", round, answer());
		write(1, line, length);
		if (strcmp(argv[1], "strict") == 0) {
			for (volatile long spin = 0; spin < 2000000; spin++)
				;
		} else {
			syscall(__NR_nanosleep, &pause, NULL);
		}
	}
}
"""
MAKEFILE = """CFLAGS ?= -O2 -g -Wall
PREFIX ?= /usr/local
all: filtered
filtered: filtered.c
\t$(CC) $(CFLAGS) -fPIE -pie -o $@ filtered.c -lpthread
install: all
\tinstall -D -m 755 filtered $(DESTDIR)$(PREFIX)/bin/filtered
clean:
\trm -f filtered *.o .kpatch_*
.PHONY: all install clean
"""


@pytest.fixture(scope="module")
def filtered(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "filtered", SOURCE, (("return 1;", "return 2;"),), MAKEFILE)


@pytest.mark.parametrize(("mode", "reason"), [
    ("kill", "would kill the process on mprotect(PROT_READ|PROT_EXEC)"),
    ("errno", "would deny (EPERM) mprotect(PROT_READ|PROT_EXEC)"),
    ("strict", "runs under strict seccomp"),
])
def test_filter_that_forbids_the_engine_syscalls_is_refused(filtered, start, mode, reason):
    patient = start(filtered, mode)
    patient.wait_for(lambda line: line.endswith("answer=1"), after=0)
    maps_before = map_count(patient.pid)
    result = operations.patch_processes(str(filtered.patches_dir), [patient.pid])
    obj = result[0].objects[0]
    assert obj.action == "failed"
    assert reason in obj.reason, obj.reason
    patient.wait_for(lambda line: line.endswith("answer=1"))     # alive, still running the old code
    assert map_count(patient.pid) == maps_before


def _patched_then_unpatched(filtered, patient) -> None:
    """Patched (answer 2), unpatched (answer 1 again), alive throughout."""
    patient.wait_for(lambda line: line.endswith("answer=1"), after=0)
    result = operations.patch_processes(str(filtered.patches_dir), [patient.pid])
    assert result[0].objects[0].action == "applied", result[0].objects[0].reason
    patient.wait_for(lambda line: line.endswith("answer=2"))
    removed = operations.unpatch_processes([patient.pid])
    assert removed[0].objects[0].action == "removed", removed[0].objects[0].reason
    patient.wait_for(lambda line: line.endswith("answer=1"))


def test_allow_list_that_permits_the_engine_syscalls_is_patched(filtered, start):
    patient = start(filtered, "allow")
    _patched_then_unpatched(filtered, patient)


def test_only_the_threads_that_make_the_calls_are_judged_by_their_filters(filtered, start):
    """A filter is per thread: one installed by a thread that only sleeps does not stand in
    the way (the engine makes its calls in another thread), and the patient lives on."""
    patient = start(filtered, "thread-kill")
    _patched_then_unpatched(filtered, patient)
