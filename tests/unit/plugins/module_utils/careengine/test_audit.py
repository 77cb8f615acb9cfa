"""The audit log on real files: modes, one line per record, rotation, reading back, syslog.

The records are made from real results for real processes (this test process and a child),
so their program, start time and the lookup of "who applied this" are the real ones.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.module_utils.careengine import audit
from plugins.module_utils.careengine.audit import AuditLog, Requester
from plugins.module_utils.careengine.errors import AuditError
from plugins.module_utils.careengine.results import ObjectResult, ProcessResult

ROOT = Path(__file__).resolve().parents[5]
BUILD_ID = "ab" * 20
FIELDS = {"time", "event", "outcome", "reason", "requested_by", "pid", "process_start", "comm", "exe", "object",
          "build_id", "level", "previous_level", "patch_sha256", "signer", "source", "insecure_store",
          "paused_us", "host", "tool_pid"}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def applied_result(pid: int, level: int = 1, action: str = "applied") -> ProcessResult:
    obj = ObjectResult(path="/usr/bin/server", build_id=BUILD_ID, action=action,
                       applied_level=level if action == "applied" else None,
                       previous_level=None if action == "applied" else level, reason=f"level {level} {action}",
                       paused_us=640, functions=("handle",))
    return ProcessResult(pid, "server", (obj,), "", 640)


def test_prepare_creates_a_root_only_directory_and_file(tmp_path):
    log = tmp_path / "var" / "log" / "libcare" / "audit.jsonl"
    AuditLog(str(log)).prepare()
    assert stat.S_IMODE(os.stat(log.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    assert log.read_text() == ""


def test_prepare_refuses_a_log_it_cannot_write(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(AuditError, match=r"cannot write the audit log .*file/audit.jsonl: .*nothing was done"):
        AuditLog(str(tmp_path / "file" / "audit.jsonl")).prepare()


def test_a_symlinked_log_is_refused_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    os.symlink(target, tmp_path / "audit.jsonl")
    with pytest.raises(AuditError):
        AuditLog(str(tmp_path / "audit.jsonl")).prepare()
    assert target.read_text() == "precious\n"


def test_one_line_per_record_with_every_field(tmp_path):
    log = tmp_path / "audit.jsonl"
    requester = Requester.from_command(["libcare-ctl", "patch", "-p", str(os.getpid()), "/store dir"])
    results = [applied_result(os.getpid()), ProcessResult(os.getpid(), "server", (), "", None),
               ProcessResult(999999999, "gone", (), "process exited", None)]
    records = audit.result_records("patch", results, requester, source=str(tmp_path),
                                   patch_sha256=lambda build_id, level: f"{build_id}:{level}", signer="ops@example")
    AuditLog(str(log), to_syslog=False).append_all(records)
    written = lines(log)
    assert len(written) == 2                               # nothing-to-do processes leave no line
    applied, failed = written
    assert set(applied) == FIELDS
    assert applied["event"] == "patch" and applied["outcome"] == "applied"
    assert applied["pid"] == os.getpid() and applied["exe"] == os.readlink("/proc/self/exe")
    assert applied["comm"] == Path("/proc/self/comm").read_text().strip()
    assert applied["process_start"] == int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert (applied["build_id"], applied["level"], applied["previous_level"]) == (BUILD_ID, 1, None)
    assert applied["patch_sha256"] == f"{BUILD_ID}:1" and applied["signer"] == "ops@example"
    assert applied["paused_us"] == 640 and applied["source"] == str(tmp_path)
    assert applied["requested_by"] == {"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name,
                                       "via": "command", "command": f"libcare-ctl patch -p {os.getpid()} '/store dir'",
                                       "ansible_host": None, "ansible_user": None, "peer_pid": None}
    assert applied["time"].endswith("Z") and applied["tool_pid"] == os.getpid()
    assert failed["pid"] == 999999999 and failed["outcome"] == "failed" and failed["reason"] == "process exited"
    assert failed["comm"] == "gone" and failed["exe"] is None and failed["build_id"] is None


def test_an_unpatch_names_the_patch_it_removed(tmp_path):
    log = AuditLog(str(tmp_path / "audit.jsonl"), to_syslog=False)
    asked = Requester.from_service(0, peer_pid=42)
    log.append_all(audit.result_records("patch", [applied_result(os.getpid(), 2)], asked,
                                        patch_sha256=lambda build_id, level: "d1g35t"))
    removed = audit.result_records("unpatch", [applied_result(os.getpid(), 2, "removed")], asked,
                                   known=audit.index_applied(log.records()))
    assert len(removed) == 1
    assert (removed[0]["outcome"], removed[0]["level"], removed[0]["patch_sha256"]) == ("removed", 2, "d1g35t")
    assert removed[0]["requested_by"]["via"] == "service" and removed[0]["requested_by"]["peer_pid"] == 42


def test_applied_record_tells_a_process_from_a_later_one_with_the_same_pid(tmp_path):
    log = AuditLog(str(tmp_path / "audit.jsonl"), to_syslog=False)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        log.append_all(audit.result_records("patch", [applied_result(child.pid)], Requester.from_command(["x"])))
        index = audit.index_applied(log.records())
        found = audit.applied_record(index, child.pid, BUILD_ID, 1)
        assert found is not None and found["pid"] == child.pid
        assert audit.applied_record(index, child.pid, BUILD_ID, 2) is None
        start = found["process_start"]
        assert audit.applied_record(index, child.pid, BUILD_ID, 1, start=start + 1) is None
    finally:
        child.kill()
        child.wait()


def test_rotation_by_rename_loses_nothing_and_both_files_are_read(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), to_syslog=False)
    requester = Requester.from_command(["x"])
    log.append_all(audit.refusal_records("patch", "first", requester))
    os.rename(path, str(path) + ".1")                       # what logrotate does
    log.append_all(audit.refusal_records("patch", "second", requester))
    assert [r["reason"] for r in lines(Path(str(path) + ".1"))] == ["first"]
    assert [r["reason"] for r in lines(path)] == ["second"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    path.write_text(path.read_text() + "not json\n")
    assert [r["reason"] for r in log.records()] == ["first", "second"]


def test_a_refusal_is_one_line_per_asked_process_or_one_for_all(tmp_path):
    requester = Requester.from_command(["x"])
    for_all = audit.refusal_records("patch", "insecure", requester, source="store")
    assert [(r["pid"], r["outcome"], r["source"]) for r in for_all] == [(None, "refused", os.path.abspath("store"))]
    for_two = audit.refusal_records("patch", "insecure", requester, pids=[os.getpid(), 999999999])
    assert [r["pid"] for r in for_two] == [os.getpid(), 999999999]
    assert for_two[0]["exe"] == os.readlink("/proc/self/exe") and for_two[1]["exe"] is None


def test_ansible_requester_from_the_module_environment():
    asked = Requester.from_ansible("libcare.livepatch.livepatch",
                                   {"SSH_CLIENT": "192.0.2.10 50022 22", "SUDO_USER": "deploy", "LOGNAME": "root"})
    assert (asked.via, asked.command, asked.ansible_host, asked.ansible_user) == \
        ("ansible", "libcare.livepatch.livepatch", "192.0.2.10", "deploy")
    local = Requester.from_ansible("m", {"LOGNAME": "ops"})
    assert (local.ansible_host, local.ansible_user) == ("localhost", "ops")


def test_default_path(monkeypatch):
    assert audit.default_audit_log_path({audit.AUDIT_LOG_ENV: "/x/a.jsonl"}) == "/x/a.jsonl"
    if os.geteuid() == 0:
        assert audit.default_audit_log_path({}) == "/var/log/libcare/audit.jsonl"
    else:
        assert audit.default_audit_log_path({"XDG_STATE_HOME": "/s"}) == "/s/libcare/audit.jsonl"


@pytest.mark.skipif(os.geteuid() != 0, reason="running a child as another user needs root")
def test_another_user_logs_into_their_own_state_directory(tmp_path):
    child = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from plugins.module_utils.careengine.audit import default_audit_log_path as d; print(d())")
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", child,
                          str(ROOT)], capture_output=True, text=True, check=False, timeout=60,
                         env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{tmp_path}/.local/state/libcare/audit.jsonl"


def test_the_syslog_message_is_short_and_says_who():
    record = audit.result_records("patch", [applied_result(os.getpid())], Requester.from_service(1000))[0]
    message = audit.syslog_message(record)
    assert message.startswith(f"patch applied: pid {os.getpid()} (")
    assert f"build-id {BUILD_ID} level 1, by uid 1000 " in message and message.endswith("via service")
    refused = audit.refusal_records("patch", "refusing patch source /s: why", Requester.from_command(["x"]))[0]
    assert audit.syslog_message(refused).startswith("patch refused: all processes, by uid ")
    assert audit.syslog_message(refused).endswith(": refusing patch source /s: why")


SYSLOG_CHILD = """
import sys
sys.path.insert(0, {root!r})
from plugins.module_utils.careengine.audit import AuditLog, Requester, refusal_records
AuditLog({log!r}).append_all(refusal_records("patch", "refusing patch source /s: why", Requester.from_command(["t"])))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a private /dev/log needs a mount namespace (root)")
def test_each_record_also_goes_to_syslog(tmp_path):
    """The child sees a private /dev (bind mount in its own mount namespace) whose log socket is ours."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "null").write_text("")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(dev / "log"))
    receiver.settimeout(30)
    child = SYSLOG_CHILD.format(root=str(ROOT), log=str(tmp_path / "audit.jsonl"))
    script = f"mount --bind /dev/null {dev}/null && mount --bind {dev} /dev && exec {sys.executable} -c \"$0\""
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, child],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    message = receiver.recv(4096).decode()
    receiver.close()
    assert message.startswith("<84>")                      # authpriv (10) * 8 + warning (4)
    assert "libcare[" in message and "patch refused: all processes, by uid 0 (root) via command" in message
    assert len(lines(tmp_path / "audit.jsonl")) == 1
