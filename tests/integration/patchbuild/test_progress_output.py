"""libcare-patch-make's progress on a terminal: a live line rewritten in place while a
stage runs (units compiled, elapsed time); real pty, real make."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

from plugins.module_utils.careengine.patchbuild import sourcetree

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "projects" / "hostile"
PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")


def _read_until(master: int, wanted: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} on the terminal within {timeout}s: {seen[-400:]!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:          # the other side closed
                chunk = b""
            assert chunk, f"the terminal closed before {wanted!r}: {seen[-400:]!r}"
            seen += chunk
    return seen


def test_terminal_gets_a_live_line_while_a_stage_runs(tmp_path, monkeypatch):
    monkeypatch.setenv(sourcetree.STATE_ENV, str(tmp_path / "state"))
    project = Path(shutil.copytree(FIXTURE, tmp_path / "hostile"))
    master, slave = pty.openpty()
    process = subprocess.Popen([PATCH_MAKE, "fix.patch"], cwd=project, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=slave,
                               env=dict(os.environ, LPM_HOLD="original-all", LPM_HOLD_PID=str(tmp_path / "pid")))
    os.close(slave)
    try:
        shown = _read_until(master, b"stage original: make\r\n", timeout=60)
        # While make is held, the counts are rewritten in place (carriage return, erase line).
        shown += _read_until(master, b"\r\x1b[Klibcare-patch-make: make: 1 unit compiled, ", timeout=60)
        assert b"\r\x1b[Klibcare-patch-make: make: 1 unit compiled" in shown
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        os.close(master)
