"""What libcare-ctl tells a first-time user: which process a "skipped" line is about, and
that ``info`` found no store (and where it looked)."""

from __future__ import annotations

import os

from apply_helpers import ctl

from plugins.module_utils.careengine.storage import DEFAULT_STORE


def comm_of(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as stream:
        return stream.read().strip()


def test_skipped_lines_name_the_process(libdemo, start):
    patient = start(libdemo)
    first = ctl("patch", "-p", str(patient.pid), str(libdemo.patches_dir))
    assert first.returncode == 0, first.stderr
    patient.wait_for(lambda line: line.startswith("libdemo PATCHED"))

    again = ctl("patch", "-p", str(patient.pid), str(libdemo.patches_dir))
    assert again.returncode == 0, again.stderr
    skipped = [line for line in again.stdout.splitlines() if ": skipped: " in line]
    assert len(skipped) == 2, again.stdout
    for line in skipped:
        assert line.startswith(f"PID '{patient.pid}' ({comm_of(patient.pid)}): "), line
        assert line.endswith("skipped: level 0 is already applied"), line
    assert ctl("unpatch", "-p", str(patient.pid)).returncode == 0


def test_info_says_when_no_store_was_found(libdemo, start):
    patient = start(libdemo)
    info = ctl("info", "-p", str(patient.pid))
    assert info.returncode == 0, info.stderr
    assert f"pid={patient.pid} comm=" in info.stdout
    notice = f"no patch store found (looked for {DEFAULT_STORE}; give one with -s STORE)"
    if os.path.exists(DEFAULT_STORE):
        assert notice not in info.stderr   # the default store is there and used
    else:
        assert notice in info.stderr

    explicit = ctl("info", "-p", str(patient.pid), "-s", str(libdemo.patches_dir))
    assert explicit.returncode == 0, explicit.stderr
    assert "no patch store found" not in explicit.stderr
