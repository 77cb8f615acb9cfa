"""Real patches from bin/libcare-patch-make, real patients, real ptrace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from plugins.module_utils.careengine import patchfile
from plugins.module_utils.careengine.storage import PatchStore

pytest.importorskip("plugins.module_utils.careengine.asm.gensrc", reason="the asm diff has not landed yet")

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures" / "projects"
PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
CTL = str(ROOT / "bin" / "libcare-ctl")
CC_ARG = f"CC={ROOT / 'bin' / 'libcare-cc'}"

# A multi-threaded patient: 8 workers call compute() in a loop and count wrong answers;
# in "busy" mode one thread spins forever inside spin(); in "late" mode one thread waits until
# compute() is patched and then spins forever inside the new spin(). Both functions are patched.
THREADS_MAIN = r"""#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile long bad, spins;
static int base;

__attribute__((noinline, noipa)) int compute(int x)
{
	int r = x;
	for (int i = 0; i < 3; i++)
		r = (r * 7 + 3) % 1000;
	return r + 1;
}

__attribute__((noinline, noipa)) void spin(void)
{
	for (;;)
		spins++;
}

static void *worker(void *arg)
{
	(void)arg;
	for (;;) {
		int v = compute(5);
		if (v != base && v != base + 1)
			__atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
		for (volatile int k = 0; k < 300; k++)
			;
	}
	return NULL;
}

static void *spinner(void *arg)
{
	(void)arg;
	spin();
	return NULL;
}

static void *late_spinner(void *arg)
{
	(void)arg;
	while (compute(5) == base)	/* enter spin() only once it is the patched one */
		usleep(1000);
	spin();
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t tid;
	int busy = argc > 1 && strcmp(argv[1], "busy") == 0;

	base = compute(5);

	for (int i = 0; i < 8 && !busy; i++)
		pthread_create(&tid, NULL, worker, NULL);
	if (busy)
		pthread_create(&tid, NULL, spinner, NULL);
	if (argc > 1 && strcmp(argv[1], "late") == 0)
		pthread_create(&tid, NULL, late_spinner, NULL);
	for (long round = 0;; round++) {
		printf("round=%ld value=%d bad=%ld\n", round, compute(5), bad);
		fflush(stdout);
		usleep(5000);
	}
	return 0;
}
"""


def single_program_makefile(name: str) -> str:
    """A fixture-style Makefile for one PIE program ``name`` built from ``name.c`` with pthreads."""
    return f"""CFLAGS ?= -O2 -g -Wall
PREFIX ?= /usr/local
all: {name}
{name}.o: {name}.c
\t$(CC) $(CFLAGS) -fPIE -c -o $@ {name}.c
{name}: {name}.o
\t$(CC) -pie -o $@ {name}.o -lpthread $(LDFLAGS)
install: all
\tinstall -D -m 755 {name} $(DESTDIR)$(PREFIX)/bin/{name}
clean:
\trm -f {name} *.o .kpatch_*
.PHONY: all install clean
"""



# (old, new) replacements that make the fix of each project; the patch is made with diff -u.
# The fixed compute() calls strlen, an IFUNC in libc: its resolver runs in the patient.
THREADS_FIX = (("return r + 1;", "const char *volatile word = \"abc\";\n\n\treturn r + (int)strlen(word) - 1;"),
               ("spins++;", "spins += 2;"))
LEVEL2_FIX = (('printf("libdemo UNPATCHED %d\\n", demo_value(counter));',
               'printf("libdemo LEVEL2 %d\\n", demo_value(counter) + 1000);'),)


def make_diff(project: Path, name: str, replacements: tuple[tuple[str, str], ...], patch_name: str) -> None:
    """Write ``patch_name`` in ``project``: a -p1 diff of ``name`` with ``replacements`` made."""
    original = (project / name).read_text()
    changed = original
    for old, new in replacements:
        assert old in changed, old
        changed = changed.replace(old, new)
    work = project.parent / (project.name + "-diff")
    for side, text in (("a", original), ("b", changed)):
        (work / side).mkdir(parents=True, exist_ok=True)
        (work / side / name).write_text(text)
    diff = subprocess.run(["diff", "-u", f"a/{name}", f"b/{name}"], cwd=work, capture_output=True, text=True,
                          check=False)
    assert diff.returncode == 1, diff.stderr
    (project / patch_name).write_text(diff.stdout)


@dataclass(frozen=True)
class Built:
    """A fixture project built by libcare-patch-make."""

    root: Path
    binary: Path
    libdir: Path
    patches: dict[str, Path]          # build-id -> patch file (the last build)
    patches_dir: Path                 # those patches as a flat store (<build-id>.kpatch)

    def patch_of(self, path: Path) -> Path:
        """The patch file made for the object at ``path``."""
        return self.patches[build_id_of(path)]


def build_id_of(path: Path) -> str:
    notes = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", notes).group(1)


def patch_make(project: Path, *patches: str) -> tuple[Path, dict[str, Path]]:
    """Run libcare-patch-make; copy the resulting patches aside; build-id -> file."""
    result = subprocess.run([PATCH_MAKE, "-m", CC_ARG, *patches], cwd=project, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = project / ("patches-" + "-".join(Path(p).stem for p in patches))
    saved.mkdir()
    found = {}
    for path in (project / "patchroot").glob("*.kpatch"):
        copy = saved / path.name
        shutil.copy(path, copy)
        found[path.name[: -len(".kpatch")]] = copy
    for name in ("SHA256SUMS", "SHA256SUMS.sig"):      # the digests (and signature) patch-make wrote
        if (project / "patchroot" / name).exists():
            shutil.copy(project / "patchroot" / name, saved / name)
    return saved, found


def built_with(project: Path, program: str, *patches: str) -> Built:
    """``project`` after libcare-patch-make with ``patches``; ``program`` is in its bin/."""
    saved, made = patch_make(project, *patches)
    root = project / "lpmake" / "usr" / "local"
    return Built(project, root / "bin" / program, root / "lib", made, saved)


def single_program_project(tmp_path_factory, name: str, source: str, fix: tuple[tuple[str, str], ...],
                           makefile: str | None = None) -> Built:
    """A project of one program ``name`` built from ``name.c`` = ``source`` (Makefile:
    ``makefile``, else :func:`single_program_makefile`), and its patch for ``fix``."""
    project = tmp_path_factory.mktemp("apply") / name
    project.mkdir()
    (project / f"{name}.c").write_text(source)
    (project / "Makefile").write_text(makefile or single_program_makefile(name))
    make_diff(project, f"{name}.c", fix, "fix.patch")
    return built_with(project, name, "fix.patch")


@pytest.fixture(scope="session")
def libdemo(tmp_path_factory) -> Built:
    project = Path(shutil.copytree(FIXTURES / "libdemo", tmp_path_factory.mktemp("apply") / "libdemo"))
    make_diff(project, "libdemo.c", LEVEL2_FIX, "level2.patch")
    return built_with(project, "demo", "fix.patch")


@pytest.fixture(scope="session")
def nonpie(tmp_path_factory) -> Built:
    project = Path(shutil.copytree(FIXTURES / "nonpie", tmp_path_factory.mktemp("apply") / "nonpie"))
    return built_with(project, "nonpie", "fix.patch")


@pytest.fixture(scope="session")
def threads_project(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "threads", THREADS_MAIN, THREADS_FIX)


@pytest.fixture(scope="session")
def level_store(libdemo, tmp_path_factory) -> tuple[Path, str, dict[int, Path]]:
    """A store for libdemo.so: level 1 = lib-only.patch, level 2 = level2.patch."""
    lib_id = build_id_of(libdemo.libdir / "libdemo.so")
    level1 = patch_make(libdemo.root, "lib-only.patch")[1][lib_id]
    level2 = patch_make(libdemo.root, "level2.patch")[1][lib_id]
    assert build_id_of(libdemo.libdir / "libdemo.so") == lib_id, "the original build is not reproducible"
    store = tmp_path_factory.mktemp("store")
    return store, lib_id, {1: level1, 2: level2}


def install(store: Path, patch_path: Path, level: int) -> None:
    PatchStore(str(store)).install(patchfile.load_patch(str(patch_path)), level)


class Patient:
    """A running fixture program whose output lines are collected."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, stdin: int | None = None) -> None:
        self.process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1, env={**os.environ, **(env or {})})
        self.pid = self.process.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 5.0, after: int | None = None) -> str:
        """The first line (from index ``after``, default: lines not seen yet) matching."""
        start = len(self.lines) if after is None else after
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if predicate(line):
                    return line
            if self.process.poll() is not None:
                raise AssertionError(f"patient exited with {self.process.returncode}: {self.lines[-5:]}")
            time.sleep(0.005)
        raise AssertionError(f"no matching output within {timeout}s; last lines: {self.lines[-5:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=5)


@pytest.fixture
def start():
    started: list[Patient] = []

    def _start(built: Built, *args: str) -> Patient:
        patient = Patient([str(built.binary), *args], {"LD_LIBRARY_PATH": str(built.libdir)})
        started.append(patient)
        patient.wait_for(lambda line: True, after=0)
        return patient

    yield _start
    for patient in started:
        patient.stop()


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CTL, *args], capture_output=True, text=True, check=False, timeout=60)


def map_count(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as stream:
        return len(stream.readlines())
