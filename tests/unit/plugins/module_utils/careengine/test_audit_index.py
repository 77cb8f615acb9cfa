"""audit_index.applied_index: always what a full read of the log gives (for live processes),
however the log changed between two calls: appended to (also mid-line), rotated, replaced,
truncated."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from plugins.module_utils.careengine import audit, audit_index
from plugins.module_utils.careengine.audit import AuditLog, Requester
from plugins.module_utils.careengine.results import ObjectResult, ProcessResult

BUILD_ID = "cd" * 20


def _applied(pid: int, level: int) -> list[dict]:
    obj = ObjectResult(path="/usr/bin/server", build_id=BUILD_ID, action="applied", applied_level=level,
                       reason=f"level {level} applied", paused_us=500, functions=("handle",))
    return audit.result_records("patch", [ProcessResult(pid, "server", (obj,), "", 500)],
                                Requester.from_command([f"level {level}"]))


def _full_read(log: AuditLog) -> dict[tuple, dict]:
    return audit.index_applied(log.records())


@pytest.fixture
def log(tmp_path):
    return AuditLog(str(tmp_path / "audit.jsonl"), to_syslog=False)


def test_appended_records_are_indexed_and_a_line_being_written_waits(log):
    log.append_all(_applied(os.getpid(), 1))
    assert audit_index.applied_index(log) == _full_read(log) != {}
    log.append_all(_applied(os.getpid(), 2))
    assert audit_index.applied_index(log) == _full_read(log)
    line = (json.dumps(_applied(os.getpid(), 3)[0]) + "\n").encode()
    with open(log.path, "ab") as stream:
        stream.write(line[:20])                                  # half a line: not read yet
    assert audit_index.applied_index(log) == _full_read(log) and len(audit_index.applied_index(log)) == 2
    with open(log.path, "ab") as stream:
        stream.write(line[20:])
    assert audit_index.applied_index(log) == _full_read(log) and len(audit_index.applied_index(log)) == 3


def test_rotation_replacement_and_truncation_are_read_from_the_start(log):
    log.append_all(_applied(os.getpid(), 1))
    audit_index.applied_index(log)
    os.rename(log.path, log.path + ".1")                         # rotated
    log.append_all(_applied(os.getpid(), 2))
    assert audit_index.applied_index(log) == _full_read(log) and len(_full_read(log)) == 2
    os.rename(log.path + ".1", log.path + ".old")                # the rotated file goes away
    assert audit_index.applied_index(log) == _full_read(log) and len(_full_read(log)) == 1
    replacement = log.path + ".new"
    AuditLog(replacement, to_syslog=False).append_all(_applied(os.getpid(), 7) + _applied(os.getpid(), 8))
    os.replace(replacement, log.path)                            # another file, longer than what was read
    assert audit_index.applied_index(log) == _full_read(log) and {k[3] for k in _full_read(log)} == {7, 8}
    with open(log.path, "r+b") as stream:                        # the same file, truncated and rewritten
        stream.truncate(0)
    log.append_all(_applied(os.getpid(), 9))
    assert audit_index.applied_index(log) == _full_read(log) and {k[3] for k in _full_read(log)} == {9}


def test_a_large_index_forgets_processes_that_exited(log, monkeypatch):
    monkeypatch.setattr(audit_index, "PRUNE_ABOVE", 1)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    log.append_all(_applied(child.pid, 1))
    child.wait()
    log.append_all(_applied(os.getpid(), 1) + _applied(os.getpid(), 2))
    assert {key[0] for key in audit_index.applied_index(log)} == {os.getpid()}
    assert {key for key in _full_read(log) if key[0] == os.getpid()} == set(audit_index.applied_index(log))


def test_a_log_rewritten_in_place_and_longer_is_read_again(log):
    log.append_all(_applied(os.getpid(), 1))
    audit_index.applied_index(log)
    with open(log.path, "r+b") as stream:                        # same inode, now longer than what was read
        stream.truncate(0)
    log.append_all(_applied(os.getpid(), 4) + _applied(os.getpid(), 5))
    assert audit_index.applied_index(log) == _full_read(log) and {k[3] for k in _full_read(log)} == {4, 5}
