"""Stacks no thread runs on right now: a swapcontext coroutine parked inside the replaced
function (refused, then patched once it has left; unpatch likewise for the new code), a
hand-made stack switch the engine cannot follow (refused, naming why; patched with
force_unsafe, which says so), a signal handler on an alternate signal stack that is inside
the function (refused until it leaves), and a program that can switch stacks (it links
libcrypto) with no suspended stack in the function (patched)."""

from __future__ import annotations

import os
import re
import signal

import pytest
from apply_helpers import Built, map_count, single_program_project

from plugins.module_utils.careengine.apply import coroutines, engine, operations

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of other processes needs root")

COMMON = r"""#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

static volatile sig_atomic_t leave;
static volatile int last;

static void on_usr1(int signo) { (void)signo; leave = 1; }
static void on_usr2(int signo) { (void)signo; leave = 0; }

/* A coroutine stack as coroutine libraries make them: mmap'ed, a guard page below. */
static char *new_stack(size_t size)
{
	char *base = mmap(NULL, size + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	mprotect(base, 4096, PROT_NONE);
	return base + 4096;
}

static void handlers(void)
{
	signal(SIGUSR1, on_usr1);
	signal(SIGUSR2, on_usr2);
}
"""

UCONTEXT = COMMON + r"""
static ucontext_t main_context, coroutine_context;

__attribute__((noinline, noipa)) int f(int x)
{
	int r = x + 1;
	swapcontext(&coroutine_context, &main_context);	/* parked inside f */
	return r;
}

__attribute__((noinline, noipa)) void g(void)
{
	swapcontext(&coroutine_context, &main_context);	/* parked outside f */
}

static void coroutine(void)
{
	for (;;) {
		if (leave)
			g();
		else
			last = f(1);
	}
}

int main(void)
{
	handlers();
	getcontext(&coroutine_context);
	coroutine_context.uc_stack.ss_sp = new_stack(1 << 16);
	coroutine_context.uc_stack.ss_size = 1 << 16;
	coroutine_context.uc_link = NULL;
	makecontext(&coroutine_context, coroutine, 0);
	for (long round = 0;; round++) {
		swapcontext(&main_context, &coroutine_context);
		printf("round=%ld last=%d leave=%d\n", round, last, (int)leave);
		fflush(stdout);
		usleep(2000);
	}
}
"""

HANDMADE = COMMON + r"""
struct context { void *sp; };
static struct context main_context, coroutine_context;
void co_switch(struct context *from, struct context *to);
__asm__(".text\n.globl co_switch\n.type co_switch, @function\nco_switch:\n.cfi_startproc\n"
	"push %rbp\npush %rbx\npush %r12\npush %r13\npush %r14\npush %r15\n"
	"mov %rsp, (%rdi)\nmov (%rsi), %rsp\n"
	"pop %r15\npop %r14\npop %r13\npop %r12\npop %rbx\npop %rbp\nret\n"
	".cfi_endproc\n.size co_switch, .-co_switch\n");

__attribute__((noinline, noipa)) int f(int x)
{
	int r = x + 1;
	co_switch(&coroutine_context, &main_context);	/* parked inside f */
	return r;
}

static void coroutine(void)
{
	for (;;)
		last = f(1);
}

int main(void)
{
	char *top = new_stack(1 << 16) + (1 << 16);
	uintptr_t *sp = (uintptr_t *)top;

	handlers();
	*--sp = 0;				/* coroutine()'s return address: none */
	*--sp = (uintptr_t)coroutine;
	for (int i = 0; i < 6; i++)
		*--sp = 0;
	coroutine_context.sp = sp;
	for (long round = 0;; round++) {
		co_switch(&main_context, &coroutine_context);
		printf("round=%ld last=%d leave=%d\n", round, last, (int)leave);
		fflush(stdout);
		usleep(2000);
	}
}
"""

ALTSTACK = COMMON + r"""
__attribute__((noinline, noipa)) int f(int x)
{
	int r = x + 1;
	printf("in f\n");
	fflush(stdout);
	while (!leave)
		pause();
	return r;
}

static void on_hup(int signo)
{
	(void)signo;
	last = f(1);
}

int main(void)
{
	stack_t alternate = { .ss_sp = new_stack(1 << 16), .ss_size = 1 << 16 };
	struct sigaction action = { .sa_handler = on_hup, .sa_flags = SA_ONSTACK };

	handlers();
	sigaltstack(&alternate, NULL);
	sigaction(SIGHUP, &action, NULL);
	for (long round = 0;; round++) {
		printf("round=%ld last=%d leave=%d\n", round, last, (int)leave);
		fflush(stdout);
		usleep(2000);
	}
}
"""

# Links libcrypto, which uses setcontext/makecontext (OpenSSL's async jobs): a process that
# can switch stacks but has no suspended stack in f must be patched all the same.
CRYPTO_USER = COMMON + r"""
__attribute__((noinline, noipa)) int f(int x)
{
	volatile int r = x + 1;
	return r;
}

int main(void)
{
	handlers();
	for (long round = 0;; round++) {
		last = f(1);
		printf("round=%ld last=%d leave=%d\n", round, last, (int)leave);
		fflush(stdout);
		usleep(2000);
	}
}
"""

FIX = (("int r = x + 1;", "int r = x + 100;"),)


def makefile(name: str, libraries: str = "") -> str:
    return f"""CFLAGS ?= -O2 -g -Wall
PREFIX ?= /usr/local
all: {name}
{name}: {name}.c
\t$(CC) $(CFLAGS) -fPIE -pie -o $@ {name}.c {libraries}
install: all
\tinstall -D -m 755 {name} $(DESTDIR)$(PREFIX)/bin/{name}
clean:
\trm -f {name} *.o .kpatch_*
.PHONY: all install clean
"""


def project(tmp_path_factory, name: str, source: str, libraries: str = "") -> Built:
    return single_program_project(tmp_path_factory, name, source, FIX, makefile(name, libraries))


@pytest.fixture(scope="module")
def ucontext_program(tmp_path_factory) -> Built:
    return project(tmp_path_factory, "ucoro", UCONTEXT)


@pytest.fixture(scope="module")
def handmade_program(tmp_path_factory) -> Built:
    return project(tmp_path_factory, "handco", HANDMADE)


@pytest.fixture(scope="module")
def altstack_program(tmp_path_factory) -> Built:
    return project(tmp_path_factory, "altf", ALTSTACK)


@pytest.fixture(scope="module")
def crypto_user(tmp_path_factory) -> Built:
    return project(tmp_path_factory, "cryptouser", CRYPTO_USER, "-Wl,--no-as-needed -l:libcrypto.so.3")


def patch(built: Built, pid: int, timeout: float = 5.0):
    result = operations.patch_processes(str(built.patches_dir), [pid], timeout=timeout)[0]
    assert result.objects, result.error
    return result.objects[0]


def test_swapcontext_coroutine_parked_inside_the_function(ucontext_program, start):
    patient = start(ucontext_program)
    patient.wait_for(lambda line: line.endswith("last=2 leave=0"), after=0)
    maps_before = map_count(patient.pid)
    refused = patch(ucontext_program, patient.pid, timeout=0.3)
    assert refused.action == "failed"
    assert re.search(r"a suspended context \(ucontext at 0x[0-9a-f]+\) resumes inside f", refused.reason), \
        refused.reason
    assert map_count(patient.pid) == maps_before
    os.kill(patient.pid, signal.SIGUSR1)                 # the coroutine leaves f and parks in g
    patient.wait_for(lambda line: line.endswith("leave=1"))
    applied = patch(ucontext_program, patient.pid)
    assert applied.action == "applied", applied.reason
    os.kill(patient.pid, signal.SIGUSR2)                 # back into f: the new one
    patient.wait_for(lambda line: line.endswith("last=101 leave=0"))
    # Unpatch looks at the same stacks, for the patch's code.
    kept = operations.unpatch_processes([patient.pid], timeout=0.3)[0].objects[0]
    assert kept.action == "failed"
    assert re.search(r"a suspended context \(ucontext at 0x[0-9a-f]+\) resumes inside the level-0 patch code \(f\)",
                     kept.reason), kept.reason
    os.kill(patient.pid, signal.SIGUSR1)
    patient.wait_for(lambda line: line.endswith("leave=1"))
    removed = operations.unpatch_processes([patient.pid])[0].objects[0]
    assert removed.action == "removed", removed.reason
    os.kill(patient.pid, signal.SIGUSR2)
    patient.wait_for(lambda line: line.endswith("last=2 leave=0"))


def test_hand_made_stack_switch_is_refused_with_the_reason(handmade_program, start):
    patient = start(handmade_program)
    patient.wait_for(lambda line: line.endswith("last=2 leave=0"), after=0)
    maps_before = map_count(patient.pid)
    refused = patch(handmade_program, patient.pid, timeout=0.3)
    assert refused.action == "failed"
    assert "it can switch stacks (handco loads %rsp from memory at" in refused.reason, refused.reason
    assert "may be a return address into f on a stack that could not be found" in refused.reason, refused.reason
    assert map_count(patient.pid) == maps_before
    patient.wait_for(lambda line: line.endswith("last=2 leave=0"))
    # --force-unsafe goes past what cannot be accounted for, and says so.
    forced = operations.patch_processes(str(handmade_program.patches_dir), [patient.pid], force_unsafe=True)[0].objects[0]
    assert forced.action == "applied", forced.reason
    assert "FORCED (force_unsafe) although it can switch stacks" in forced.reason, forced.reason
    patient.wait_for(lambda line: line.endswith("last=101 leave=0"))


def test_handler_on_an_alternate_stack_inside_the_function(altstack_program, start):
    patient = start(altstack_program)
    patient.wait_for(lambda line: line.endswith("leave=0"), after=0)
    os.kill(patient.pid, signal.SIGHUP)                  # its handler runs f on the alternate stack
    patient.wait_for(lambda line: line == "in f")
    maps_before = map_count(patient.pid)
    refused = patch(altstack_program, patient.pid, timeout=0.3)
    assert refused.action == "failed"
    assert re.search(r"thread \d+ returns into f", refused.reason), refused.reason
    assert map_count(patient.pid) == maps_before
    os.kill(patient.pid, signal.SIGUSR1)                 # f returns, so does the handler
    patient.wait_for(lambda line: line.endswith("last=2 leave=1"))
    applied = patch(altstack_program, patient.pid)
    assert applied.action == "applied", applied.reason
    os.kill(patient.pid, signal.SIGUSR2)
    os.kill(patient.pid, signal.SIGHUP)
    patient.wait_for(lambda line: line == "in f")
    os.kill(patient.pid, signal.SIGUSR1)
    patient.wait_for(lambda line: line.endswith("last=101 leave=1"))


def test_process_that_can_switch_stacks_but_has_none_in_f_is_patched(crypto_user, start):
    patient = start(crypto_user)
    patient.wait_for(lambda line: line.endswith("last=2 leave=0"), after=0)
    seen = engine.read_patient(patient.pid)
    for mapped in seen.objects:
        seen.file_of(mapped)
    switching = coroutines.stack_switching(seen.objects, seen.files)
    assert "libcrypto.so.3 uses setcontext, makecontext" in switching.describe(), switching.describe()
    applied = operations.patch_processes(str(crypto_user.patches_dir), [patient.pid])[0]
    assert applied.objects[0].action == "applied", applied.objects[0].reason
    patient.wait_for(lambda line: line.endswith("last=101 leave=0"))
    removed = operations.unpatch_processes([patient.pid])[0]
    assert removed.objects[0].action == "removed", removed.objects[0].reason
    patient.wait_for(lambda line: line.endswith("last=2 leave=0"))
    print(f"\nlibcrypto user: patch paused {applied.paused_us} us (waited {applied.waited_us}), "
          f"unpatch paused {removed.paused_us} us")
