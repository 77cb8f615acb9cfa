"""Real processes for the process/ integration tests: tiny C programs built with gcc.

The programs are built once per session into a world-readable directory, so that a
copy can also run under another uid.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PROGRAMS = Path(__file__).parent / "programs"


def _state(pid: int, tid: int | None = None) -> str:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, "rb") as stream:
        stat = stream.read()
    return stat[stat.rfind(b")") + 2:][:1].decode()


class Running:
    """A started test program: line-wise output with timeouts, killed at the end."""

    def __init__(self, argv: list[str], prefix: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            (prefix or []) + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self.pid = self.process.pid
        self._buffer = b""
        self.values: dict[str, str] = {}

    def readline(self, timeout: float = 10.0) -> str:
        """The next output line (without newline); fails the test on timeout or EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no output line from pid {self.pid} within {timeout} s")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    pytest.fail(f"pid {self.pid} closed its output (exit code {self.process.poll()})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def wait_for(self, prefix: str, timeout: float = 10.0) -> str:
        """Read lines until one starts with ``prefix``; remember ``key value`` lines."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(deadline - time.monotonic(), 0.001))
            key, _, value = line.partition(" ")
            if value:
                self.values[key] = value
            if line.startswith(prefix):
                return line

    def address(self, key: str) -> int:
        return int(self.values[key], 16)

    def drain(self) -> list[str]:
        """The complete lines available now, without waiting."""
        lines = []
        while select.select([self.process.stdout], [], [], 0)[0]:
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                break
            self._buffer += chunk
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            lines.append(line.decode())
        return lines

    def state(self, tid: int | None = None) -> str:
        return _state(self.pid, tid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


@pytest.fixture(scope="session")
def programs() -> dict[str, str]:
    """name -> path of each program in programs/, built with gcc."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test programs")
    build_dir = tempfile.mkdtemp(prefix="careengine-process-")
    os.chmod(build_dir, 0o755)
    built = {}
    for source in sorted(PROGRAMS.glob("*.c")):
        output = os.path.join(build_dir, source.stem)
        subprocess.run(["gcc", "-O1", "-g", "-pthread", "-o", output, str(source)], check=True)
        built[source.stem] = output
    # A non-PIE (ET_EXEC) build of the loop.
    output = os.path.join(build_dir, "loop_nopie")
    subprocess.run(["gcc", "-O1", "-g", "-no-pie", "-o", output, str(PROGRAMS / "loop.c")], check=True)
    built["loop_nopie"] = output
    yield built
    shutil.rmtree(build_dir, ignore_errors=True)


@pytest.fixture
def spawn():
    """Start a program (``spawn(argv, prefix=None)``); everything started is killed afterwards."""
    started: list[Running] = []

    def start(argv: list[str], prefix: list[str] | None = None) -> Running:
        running = Running(argv, prefix)
        started.append(running)
        return running

    yield start
    for running in started:
        running.kill()


@pytest.fixture
def threads_program(programs, spawn):
    """``threads_program(count, mode='sleep', reader=False)``: started and ready."""

    def start(count: int, mode: str = "sleep", reader: bool = False) -> Running:
        argv = [programs["threads"], str(count), mode] + (["reader"] if reader else [])
        running = spawn(argv)
        running.wait_for("ready")
        if reader:
            while "reader" not in running.values or running.values["reader"] == "none":
                running.wait_for("reader")
        return running

    return start
