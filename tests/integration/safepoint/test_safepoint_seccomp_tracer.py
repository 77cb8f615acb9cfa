"""An engine that runs under seccomp itself, as in a container with the runtime's default
profile: the kernel hides every patient's filter from it (PTRACE_SECCOMP_GET_FILTER says
EACCES). A patient that runs exactly the filters the engine inherited is judged by a child
of the engine making the same calls; any other filtered patient is refused, alive."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from apply_helpers import CTL, Built, Patient, map_count, single_program_project

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="patching other processes needs root")

# seccomp-run MODE PROGRAM ARGS...: install one filter, then exec PROGRAM.
#   allow:  everything but acct(2) (EPERM), a stand-in for a container runtime's profile
#   noexec: as allow, and EPERM for mprotect with PROT_EXEC (the loader maps with mmap)
LAUNCHER = r"""#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LOAD(off) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, off)
#define RET(value) BPF_STMT(BPF_RET | BPF_K, value)

int main(int argc, char **argv)
{
	int noexec = argc > 1 && strcmp(argv[1], "noexec") == 0;
	struct sock_filter rules[] = {
		LOAD(offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_acct, 0, 1), RET(SECCOMP_RET_ERRNO | EPERM),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_mprotect, 0, 3),
		LOAD(offsetof(struct seccomp_data, args[2])),
		BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, noexec ? 4 : 0, 0, 1),
		RET(SECCOMP_RET_ERRNO | EPERM),
		RET(SECCOMP_RET_ALLOW),
	};
	struct sock_fprog program = { sizeof(rules) / sizeof(rules[0]), rules };

	if (argc < 3)
		return 2;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program)) {
		perror("seccomp");
		return 2;
	}
	execv(argv[2], argv + 2);
	perror("execv");
	return 2;
}
"""

SOURCE = r"""#include <stdio.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline, noipa)) int answer(void)
{
	return 1;
}

int main(void)
{
	struct timespec pause = { 0, 2000000 };

	for (long round = 0;; round++) {
		printf("round=%ld answer=%d\n", round, answer());
		fflush(stdout);
		nanosleep(&pause, NULL);
	}
}
"""


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("seccomp-run")
    (folder / "seccomp-run.c").write_text(LAUNCHER)
    subprocess.run(["gcc", "-O2", "-o", str(folder / "seccomp-run"), str(folder / "seccomp-run.c")], check=True)
    return str(folder / "seccomp-run")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "plain", SOURCE, (("return 1;", "return 2;"),))


@pytest.fixture
def patients():
    started: list[Patient] = []
    yield started
    for patient in started:
        patient.stop()


def _start(patients: list[Patient], argv: list[str]) -> Patient:
    patient = Patient(argv)
    patients.append(patient)
    patient.wait_for(lambda line: line.endswith("answer=1"), after=0)
    return patient


def _ctl_under(launcher: str, mode: str, *args: str) -> dict:
    run = subprocess.run([launcher, mode, CTL, *args, "--json"], capture_output=True, text=True,
                         check=False, timeout=120)
    assert run.stdout, run.stderr
    return json.loads(run.stdout)


def _object(report: dict) -> dict:
    return report["processes"][0]["objects"][0]


def test_patient_with_the_engines_own_filters_is_patched(launcher, plain, patients):
    patient = _start(patients, [launcher, "allow", str(plain.binary)])
    applied = _object(_ctl_under(launcher, "allow", "patch", "-p", str(patient.pid), str(plain.patches_dir)))
    assert applied["action"] == "applied", applied
    patient.wait_for(lambda line: line.endswith("answer=2"))
    removed = _object(_ctl_under(launcher, "allow", "unpatch", "-p", str(patient.pid)))
    assert removed["action"] == "removed", removed
    patient.wait_for(lambda line: line.endswith("answer=1"))


def test_patient_with_a_filter_of_its_own_is_refused(launcher, plain, patients):
    patient = _start(patients, [launcher, "allow", launcher, "allow", str(plain.binary)])
    maps_before = map_count(patient.pid)
    refused = _object(_ctl_under(launcher, "allow", "patch", "-p", str(patient.pid), str(plain.patches_dir)))
    assert refused["action"] == "failed"
    assert "the kernel hides filters from such a tracer" in refused["reason"], refused
    patient.wait_for(lambda line: line.endswith("answer=1"))
    assert map_count(patient.pid) == maps_before


def test_shared_filter_that_denies_exec_mappings_is_refused(launcher, plain, patients):
    patient = _start(patients, [launcher, "noexec", str(plain.binary)])
    maps_before = map_count(patient.pid)
    refused = _object(_ctl_under(launcher, "noexec", "patch", "-p", str(patient.pid), str(plain.patches_dir)))
    assert refused["action"] == "failed"
    assert "shares with the engine would deny" in refused["reason"], refused
    patient.wait_for(lambda line: line.endswith("answer=1"))
    assert map_count(patient.pid) == maps_before
