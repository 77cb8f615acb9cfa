"""A thread running a signal handler on an alternate stack: the frames of the code it
interrupted are on its normal stack, which only the walk across the signal frame sees."""

from __future__ import annotations

import re

import pytest
from apply_helpers import Built, map_count, single_program_project

from plugins.module_utils.careengine.apply import operations

SOURCE = r"""#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile int spins;

static void handler(int signo)
{
	(void)signo;
	printf("in handler\n");
	fflush(stdout);
	for (;;)
		pause();
}

__attribute__((noinline, noipa)) void inner(void)
{
	raise(SIGUSR1);
	spins++;
}

__attribute__((noinline, noipa)) void outer(void)
{
	inner();
	printf("outer UNPATCHED\n");
}

int main(int argc, char **argv)
{
	stack_t alternate = { .ss_sp = malloc(1 << 16), .ss_size = 1 << 16 };
	struct sigaction action = { .sa_handler = handler, .sa_flags = SA_ONSTACK };

	sigaltstack(&alternate, NULL);
	sigaction(SIGUSR1, &action, NULL);
	printf("started %s\n", argc > 1 ? argv[1] : "");
	fflush(stdout);
	if (argc > 1)
		outer();
	for (;;)
		pause();
}
"""
MAKEFILE = """CFLAGS ?= -O2 -g -Wall
PREFIX ?= /usr/local
all: sigalt
sigalt: sigalt.c
\t$(CC) $(CFLAGS) -fPIE -pie -o $@ sigalt.c
install: all
\tinstall -D -m 755 sigalt $(DESTDIR)$(PREFIX)/bin/sigalt
clean:
\trm -f sigalt *.o .kpatch_*
.PHONY: all install clean
"""


@pytest.fixture(scope="module")
def sigalt(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "sigalt", SOURCE, (("outer UNPATCHED", "outer PATCHED"),),
                                  MAKEFILE)


def test_function_interrupted_by_a_handler_on_an_alternate_stack_is_busy(sigalt, start):
    patient = start(sigalt, "interrupt")
    patient.wait_for(lambda line: line == "in handler", after=0)
    maps_before = map_count(patient.pid)
    result = operations.patch_processes(str(sigalt.patches_dir), [patient.pid], timeout=0.3)
    obj = result[0].objects[0]
    assert obj.action == "failed"
    assert re.search(r"thread \d+ .*outer", obj.reason), obj.reason
    assert map_count(patient.pid) == maps_before
    assert patient.alive()


def test_same_program_without_the_interrupted_frame_is_patched(sigalt, start):
    patient = start(sigalt)
    result = operations.patch_processes(str(sigalt.patches_dir), [patient.pid])
    assert result[0].objects[0].action == "applied", result[0].objects[0].reason
