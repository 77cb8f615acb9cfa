"""Requests through the resident service: whatever it keeps between requests, each one
checks the store as it is now (the service lives for months; its caches must not)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from plugins.module_utils.careengine.elf import read_build_id
from plugins.module_utils.careengine.storage import PatchStore


def _patched_level(service, pid: int) -> int | None:
    run = service.ctl("info", "-p", str(pid), "--json", "-s", "")
    assert run.returncode == 0, run.stderr
    [process] = json.loads(run.stdout)["processes"]
    levels = [obj["applied_level"] for obj in process["objects"] if obj.get("applied_level") is not None]
    return levels[0] if levels else None


def _rewrite_keeping_times(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` in place, its size and mtime as before (only ctime moves)."""
    before = os.stat(path)
    assert len(data) == before.st_size
    with open(path, "r+b") as stream:
        stream.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_patch_changed_or_opened_to_others_between_two_requests_is_refused(service, store, project, programs):
    running = programs(str(project.greeter), "sleep", "60")
    assert running.line(0) == "greeting FIXED"                     # patched at exec, by the service
    patch = Path(PatchStore(str(store)).find(read_build_id(str(project.greeter))).path)
    original = patch.read_bytes()

    def unpatch_then_patch() -> tuple[int, str]:
        removed = service.ctl("unpatch", "-p", str(running.pid))
        assert removed.returncode == 0, removed
        assert _patched_level(service, running.pid) is None
        assert (patch.parent.parent / "unpatched").read_text().strip() == "1"   # held unpatched
        applied = service.ctl("patch", "-p", str(running.pid), str(store))
        return applied.returncode, applied.stdout + applied.stderr

    assert unpatch_then_patch()[0] == 0 and _patched_level(service, running.pid) == 1
    mark = store / read_build_id(str(project.greeter)) / "unpatched"
    assert not mark.exists()                                        # the operator's patch cleared the unpatch mark

    tampered = bytearray(original)
    tampered[-1] ^= 0xFF                                            # same size, same mtime: only the bytes differ
    _rewrite_keeping_times(patch, bytes(tampered))
    status, output = unpatch_then_patch()
    assert status != 0 and "SHA256SUMS" in output, output
    assert _patched_level(service, running.pid) is None

    _rewrite_keeping_times(patch, original)                         # the refusal is not remembered either
    assert unpatch_then_patch()[0] == 0 and _patched_level(service, running.pid) == 1

    mode = os.stat(store).st_mode
    os.chmod(store, mode | 0o020)                                   # the store's group may write now
    try:
        status, output = unpatch_then_patch()
        assert status != 0 and "writable by group" in output, output
        assert _patched_level(service, running.pid) is None
    finally:
        os.chmod(store, mode)
    assert unpatch_then_patch()[0] == 0 and _patched_level(service, running.pid) == 1
