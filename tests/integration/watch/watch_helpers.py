"""Real programs, real patches, a real ``libcare-ctl watch`` service: helpers of the watch tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "process"))

from waiting import eventually  # noqa: E402

from plugins.module_utils.careengine import integrity, patchfile  # noqa: E402
from plugins.module_utils.careengine.storage import PatchStore  # noqa: E402

CTL = str(ROOT / "bin" / "libcare-ctl")
PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
CC_ARG = f"CC={ROOT / 'bin' / 'libcare-cc'}"

# A program that prints greeting() first thing; "sleep N" then sleeps; "wait" reads a line
# and re-executes itself (as nginx does on USR2); "dlopen LIB" reads a line, loads LIB and
# prints its plug_greeting() as soon as dlopen returns ("dlopen LIB threads": with two more
# threads calling greeting() all along).
GREETER_C = r"""#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline, noipa)) const char *greeting(void)
{
	return "greeting UNPATCHED";
}

static void *busy(void *arg)
{
	for (;;) {
		*(volatile const char **)arg = greeting();
		usleep(100);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	char line[64];
	static const char *seen[2];
	pthread_t tid;

	for (int i = 0; argc > 3 && strcmp(argv[3], "threads") == 0 && i < 2; i++)
		pthread_create(&tid, NULL, busy, &seen[i]);

	printf("%s\n", greeting());
	fflush(stdout);
	if (argc > 2 && strcmp(argv[1], "sleep") == 0)
		sleep(atoi(argv[2]));
	if (argc > 1 && strcmp(argv[1], "wait") == 0 && fgets(line, sizeof line, stdin)) {
		execl("/proc/self/exe", argv[0], "sleep", "30", (char *)NULL);
		return 2;
	}
	if (argc > 2 && strcmp(argv[1], "dlopen") == 0 && fgets(line, sizeof line, stdin)) {
		void *lib = dlopen(argv[2], RTLD_NOW);
		const char *(*plug)(void) = lib ? (const char *(*)(void))dlsym(lib, "plug_greeting") : NULL;

		printf("%s\n", plug ? plug() : dlerror());
		fflush(stdout);
		sleep(30);
	}
	return 0;
}
"""
PLUG_C = r"""__attribute__((noinline, noipa)) const char *plug_greeting(void)
{
	return "plug UNPATCHED";
}
"""
STATIC_C = r"""#include <stdio.h>

__attribute__((noinline, noipa)) const char *static_greeting(void)
{
	return "static UNPATCHED";
}

int main(void)
{
	printf("%s\n", static_greeting());
	return 0;
}
"""
MAKEFILE = """CFLAGS ?= -O2 -g -Wall
PREFIX ?= /usr/local
all: greeter libplug.so greeter-static
greeter-static.o: greeter-static.c
\t$(CC) $(CFLAGS) -c -o $@ greeter-static.c
greeter-static: greeter-static.o
\t$(CC) -static -o $@ greeter-static.o $(LDFLAGS)
greeter.o: greeter.c
\t$(CC) $(CFLAGS) -fPIE -c -o $@ greeter.c
greeter: greeter.o
\t$(CC) -pie -o $@ greeter.o -ldl $(LDFLAGS)
plug.o: plug.c
\t$(CC) $(CFLAGS) -fPIC -c -o $@ plug.c
libplug.so: plug.o
\t$(CC) -shared -o $@ plug.o $(LDFLAGS)
install: all
\tinstall -D -m 755 greeter $(DESTDIR)$(PREFIX)/bin/greeter
\tinstall -D -m 755 libplug.so $(DESTDIR)$(PREFIX)/lib/libplug.so
\tinstall -D -m 755 greeter-static $(DESTDIR)$(PREFIX)/bin/greeter-static
clean:
\trm -f greeter libplug.so greeter-static *.o .kpatch_*
.PHONY: all install clean
"""
FIXES = {"greeter.c": ('"greeting UNPATCHED"', '"greeting FIXED"'), "plug.c": ('"plug UNPATCHED"', '"plug FIXED"'),
         "greeter-static.c": ('"static UNPATCHED"', '"static FIXED"')}
SOURCES = {"greeter.c": GREETER_C, "plug.c": PLUG_C, "greeter-static.c": STATIC_C}


@dataclass(frozen=True)
class Project:
    """The greeter project built by libcare-patch-make, and its patches."""

    root: Path
    greeter: Path
    plug: Path
    static: Path                     # a statically linked program (no dynamic loader)
    patches: dict[str, Path]         # build-id -> patch file


def build_project(where: Path) -> Project:
    """Write, build and patch the greeter project in ``where``."""
    project = where / "greeter"
    for side in ("a", "b"):
        (where / side).mkdir(parents=True)
    project.mkdir()
    for name, text in SOURCES.items():
        (project / name).write_text(text)
    (project / "Makefile").write_text(MAKEFILE)
    diff = ""
    for name, (old, new) in FIXES.items():
        original = (project / name).read_text()
        (where / "a" / name).write_text(original)
        (where / "b" / name).write_text(original.replace(old, new))
        run = subprocess.run(["diff", "-u", f"a/{name}", f"b/{name}"], cwd=where, capture_output=True, text=True,
                             check=False)
        assert run.returncode == 1, run.stderr
        diff += run.stdout
    (project / "fix.patch").write_text(diff)
    made = subprocess.run([PATCH_MAKE, "-m", CC_ARG, "fix.patch"], cwd=project, capture_output=True, text=True,
                          check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    patches = {path.name[: -len(".kpatch")]: path for path in (project / "patchroot").glob("*.kpatch")}
    installed = project / "lpmake" / "usr" / "local"
    return Project(project, installed / "bin" / "greeter", installed / "lib" / "libplug.so",
                   installed / "bin" / "greeter-static", patches)


def make_store(project: Project, where: Path, level: int = 1) -> Path:
    """A store with every patch of ``project`` at ``level``, its SHA256SUMS written."""
    where.mkdir(mode=0o755, parents=True, exist_ok=True)
    for path in project.patches.values():
        PatchStore(str(where)).install(patchfile.load_patch(str(path)), level)
    integrity.write_sums(str(where))
    return where


class Service:
    """``libcare-ctl watch`` running in the background, its log collected."""

    def __init__(self, store: Path, workdir: Path, project: Project, *extra: str, socket_dir: Path | None = None) -> None:
        self.socket = (socket_dir or workdir) / "ctl.sock"
        self.log_path = workdir / f"service-{time.monotonic_ns()}.log"
        self.audit_log = workdir / "audit.jsonl"
        argv = [CTL, "watch", "--store", str(store), "--socket", str(self.socket), "--rescan", "0.5",
                "--path", str(project.greeter.parent), "--path", str(project.plug.parent),
                "--audit-log", str(self.audit_log), *extra]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        assert eventually(self.ready, timeout=60), self.text()

    def ready(self) -> bool:
        assert self.process.poll() is None, self.text()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def env(self) -> dict[str, str]:
        return {**os.environ, "LIBCARE_SOCKET": str(self.socket), "LIBCARE_AUDIT_LOG": str(self.audit_log)}

    def ctl(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
        """``libcare-ctl args`` as a client of this service (as ``user`` through setpriv)."""
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user_group(user)}", "--clear-groups"] if user else []
        return subprocess.run([*prefix, CTL, *args], capture_output=True, text=True, check=False, timeout=120,
                              env=self.env())

    def status(self) -> dict:
        run = self.ctl("watch", "--status", "--json", "--socket", str(self.socket))
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    def stop(self, signo: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signo)
            self.process.wait(timeout=30)
        self.log.close()


def user_group(user: str) -> str:
    return "nogroup" if user == "nobody" else user


class Program:
    """A started program whose output lines are collected as they come."""

    def __init__(self, argv: list[str], stdin: bool = False, user: str | None = None) -> None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user_group(user)}", "--clear-groups"] if user else []
        self.process = subprocess.Popen([*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True)
        self.pid = self.process.pid
        self.lines: list[str] = []
        self.ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
        self.ended = True

    def line(self, index: int, timeout: float = 30.0) -> str:
        """Output line ``index`` (0: the first), waiting for it."""
        assert eventually(lambda: len(self.lines) > index or self.ended, timeout=timeout), \
            f"no line {index} within {timeout} s: {self.lines}"
        assert len(self.lines) > index, f"pid {self.pid} ended with {self.lines}"
        return self.lines[index]

    def send(self, text: str) -> None:
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as stream:
        return dict(line.rstrip("\n").split(":\t", 1) for line in stream if ":\t" in line)


def not_held(pid: int) -> bool:
    """Neither traced nor stopped."""
    status = proc_status(pid)
    return status["TracerPid"] == "0" and status["State"][0] not in "tT"


def until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    return eventually(condition, timeout=timeout, interval=0.02)


