"""Thread-local variables: local-exec TLS in a PIE executable, initial-exec TLS
(R_X86_64_GOTTPOFF through the original object's GOT slot) in a shared library."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from apply_helpers import Built, build_id_of, built_with, make_diff

from plugins.module_utils.careengine.apply import operations

MAIN = r"""#include <stdio.h>
#include <unistd.h>

int lib_tick(void);
static __thread int app_ticks;

__attribute__((noinline)) void app_tick(void)
{
	app_ticks += 1;
	printf("app UNPATCHED %d\n", app_ticks);
}

int main(void)
{
	for (;;) {
		app_tick();
		printf("lib %d\n", lib_tick());
		fflush(stdout);
		usleep(5000);
	}
}
"""
LIBRARY = r"""static __thread int lib_ticks;

int lib_tick(void)
{
	lib_ticks += 1;
	return lib_ticks;
}
"""
MAKEFILE = """CFLAGS ?= -O2 -g -Wall
PREFIX ?= /usr/local
all: tlsapp libtls.so
libtls.o: libtls.c
\t$(CC) $(CFLAGS) -fPIC -ftls-model=initial-exec -c -o $@ libtls.c
libtls.so: libtls.o
\t$(CC) -shared -o $@ libtls.o $(LDFLAGS)
main.o: main.c
\t$(CC) $(CFLAGS) -fPIE -c -o $@ main.c
tlsapp: main.o libtls.so
\t$(CC) -pie -o $@ main.o -L. -ltls -Wl,-rpath,'$$ORIGIN/../lib' $(LDFLAGS)
install: all
\tinstall -D -m 755 tlsapp $(DESTDIR)$(PREFIX)/bin/tlsapp
\tinstall -D -m 755 libtls.so $(DESTDIR)$(PREFIX)/lib/libtls.so
clean:
\trm -f tlsapp libtls.so *.o .kpatch_*
.PHONY: all install clean
"""


@pytest.fixture(scope="module")
def tls_project(tmp_path_factory) -> Built:
    project = tmp_path_factory.mktemp("apply") / "tls"
    project.mkdir()
    (project / "main.c").write_text(MAIN)
    (project / "libtls.c").write_text(LIBRARY)
    (project / "Makefile").write_text(MAKEFILE)
    make_diff(project, "main.c", (("app_ticks += 1;\n\tprintf(\"app UNPATCHED", "app_ticks += 100;\n\tprintf(\"app PATCHED"),),
              "app.patch")
    # Both changes in one patch file: concatenate two diffs.
    make_diff(project, "libtls.c", (("lib_ticks += 1;", "lib_ticks += 100;"),), "lib.patch")
    (project / "fix.patch").write_text((project / "app.patch").read_text() + (project / "lib.patch").read_text())
    return built_with(project, "tlsapp", "fix.patch")


def _numbers(lines: list[str], prefix: str) -> list[int]:
    return [int(line.split()[-1]) for line in lines if re.match(prefix + r" -?\d+$", line)]


def test_tls_variables_keep_their_storage(tls_project: Built, start):
    assert set(tls_project.patches) == {build_id_of(tls_project.binary),
                                        build_id_of(tls_project.libdir / "libtls.so")}
    patient = start(tls_project)
    patient.wait_for(lambda line: line.startswith("lib 3"))
    seen = len(patient.lines)
    result = operations.patch_processes(str(tls_project.patches_dir), [patient.pid])[0]
    assert [o.action for o in result.objects] == ["applied", "applied"], [o.reason for o in result.objects]
    first = patient.wait_for(lambda line: line.startswith("app PATCHED"), after=seen)
    index = patient.lines.index(first)
    patient.wait_for(lambda line: line.startswith("app PATCHED"), after=index + 1)
    app = _numbers(patient.lines[index:], "app PATCHED")
    lib = _numbers(patient.lines[index:], "lib")
    before_app = _numbers(patient.lines[:index], "app UNPATCHED")[-1]
    # The patched code adds 100 to the very same thread-local variables.
    assert app[0] == before_app + 100 and app[1] == app[0] + 100
    assert lib[1] - lib[0] == 100
    assert operations.unpatch_processes([patient.pid])[0].ok
    line = patient.wait_for(lambda line: line.startswith("app UNPATCHED"))
    assert int(line.split()[-1]) > app[1]


def test_helpers_are_paths(tls_project: Built):
    assert isinstance(tls_project.binary, Path) and tls_project.binary.exists()
