"""Who may make libcare-ctl load code: insecure stores refused before any process is touched.

A real patient (built with its patch by libcare-patch-make) runs while ``libcare-ctl patch``
is pointed at a store that someone but root could change: a store writable by others, a
store under a user-owned directory, a patch owned by another user, a group-writable
SHA256SUMS, a single patch file owned by another user. Each is refused with a one-line
error naming the path, its owner and its mode, leaves one "refused" line in the audit log,
and the patient is untouched: its maps and code bytes are unchanged, nothing traces it and
it still answers the old way. The same stores are accepted with ``--insecure-store``, which
warns, and the patch then works (and is logged as made from an insecure store).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from apply_helpers import CTL
from security_helpers import answers, audit_lines, flat_store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the permission check and chown need root")

NOBODY = 65534


def snapshot(pid: int) -> tuple[str, bytes]:
    """The patient's maps and the bytes of every executable mapping of its program."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    exe = os.readlink(f"/proc/{pid}/exe")
    code = b""
    with open(f"/proc/{pid}/mem", "rb") as memory:
        for line in maps.splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[5] == exe and "x" in fields[1]:
                start, end = (int(value, 16) for value in fields[0].split("-"))
                memory.seek(start)
                code += memory.read(end - start)
    return maps, code


def tracer_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError("no TracerPid in status")


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CTL, *args], capture_output=True, text=True, check=False, timeout=120)


# Each layout: (make it from a good store, return (what to pass to libcare-ctl, the path to be named, owner, mode)).
Layout = Callable[[Path], tuple[Path, Path, str, str]]


def writable_by_others(store: Path):
    os.chmod(store, 0o757)
    return store, store, "root", "0757"


def under_a_user_directory(store: Path):
    home = store.parent / "home-alice"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    moved = home / "store"
    os.rename(store, moved)
    os.chown(home, NOBODY, NOBODY)
    return moved, home, "nobody", "0755"


def patch_of_another_user(store: Path):
    patch = next(store.glob("*.kpatch"))
    os.chown(patch, NOBODY, NOBODY)
    return store, patch, "nobody", "0644"


def group_writable_sums(store: Path):
    os.chmod(store / "SHA256SUMS", 0o664)
    return store, store / "SHA256SUMS", "root", "0664"


def single_file_of_another_user(store: Path):
    patch = next(store.glob("*.kpatch"))
    os.chown(patch, NOBODY, NOBODY)
    return patch, patch, "nobody", "0644"


LAYOUTS = {
    "store_writable_by_others": writable_by_others,
    "store_under_user_directory": under_a_user_directory,
    "patch_owned_by_another_user": patch_of_another_user,
    "group_writable_sha256sums": group_writable_sums,
    "single_patch_file_of_another_user": single_file_of_another_user,
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_insecure_source_refused_and_patient_untouched(answer, patient, tmp_path, layout):
    source, named, owner, mode = layout(flat_store(answer, tmp_path))
    log = tmp_path / "log" / "audit.jsonl"
    before = snapshot(patient.pid)

    refused = ctl("patch", "-p", str(patient.pid), "--audit-log", str(log), str(source))

    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert refused.stdout == ""
    message = refused.stderr.strip()
    assert "\n" not in message, message
    assert f"{named} (owner {owner}, mode {mode}) is " in message, message
    assert message.startswith(f"libcare-ctl: error: refusing patch source {source}: ")
    assert snapshot(patient.pid) == before, "the refused patch changed the patient's maps or code"
    assert tracer_pid(patient.pid) == 0
    assert answers(patient, 1) and patient.alive()
    records = audit_lines(log)
    assert [(r["event"], r["outcome"], r["pid"]) for r in records] == [("patch", "refused", patient.pid)]
    assert str(named) in records[0]["reason"] and records[0]["build_id"] is None


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_insecure_source_accepted_with_insecure_store(answer, patient, tmp_path, layout):
    source, _, _, _ = layout(flat_store(answer, tmp_path))
    log = tmp_path / "log" / "audit.jsonl"

    applied = ctl("patch", "-p", str(patient.pid), "--audit-log", str(log), "--insecure-store", str(source))

    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "WARNING: --insecure-store" in applied.stderr
    assert answers(patient, 2)
    removed = ctl("unpatch", "-p", str(patient.pid), "--audit-log", str(log))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert answers(patient, 1)
    records = audit_lines(log)
    assert [(r["event"], r["outcome"], r["insecure_store"]) for r in records] == \
        [("patch", "applied", True), ("unpatch", "removed", False)]
