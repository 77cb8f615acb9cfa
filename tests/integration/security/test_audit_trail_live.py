"""The audit trail of real patches: one JSON line per patch and unpatch, syslog, and `info`.

A real patient and its real patch; ``libcare-ctl`` (and the Ansible modules through the
``ansible`` command) patch and unpatch it with ``--audit-log`` in a temporary directory.
Each patch and each unpatch leaves exactly one line with who asked, the process, build-id,
level, the patch's sha256, outcome and pause; a patch that changes nothing leaves none;
``libcare-ctl info`` and ``livepatch_info`` say when and by whom the patch in force was
applied. One run goes through a private ``/dev/log`` (a mount namespace) to see the
system-log message too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from apply_helpers import CTL, ROOT, Patient
from security_helpers import answers, audit_lines, flat_store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="patching another process and /var/log need root")

FIELDS = {"time", "event", "outcome", "reason", "requested_by", "pid", "process_start", "comm", "exe", "object",
          "build_id", "level", "previous_level", "patch_sha256", "signer", "source", "insecure_store",
          "paused_us", "host", "tool_pid"}


def ctl(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    run = subprocess.run([*prefix, CTL, *args], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, f"libcare-ctl {' '.join(args)}: {run.stdout}{run.stderr}"
    return run


def process_start(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def check_record(record: dict, patient: Patient, answer, store: Path, event: str, outcome: str) -> None:
    """Every field of a patch or unpatch record of the answer patient."""
    patch = next(store.glob("*.kpatch"))
    assert set(record) == FIELDS
    assert (record["event"], record["outcome"]) == (event, outcome)
    assert record["pid"] == patient.pid and record["process_start"] == process_start(patient.pid)
    assert record["comm"] == "answer" and record["exe"] == str(answer.binary) == record["object"]
    assert record["build_id"] == patch.name[: -len(".kpatch")]
    assert record["patch_sha256"] == hashlib.sha256(patch.read_bytes()).hexdigest()
    assert isinstance(record["level"], int) and isinstance(record["paused_us"], int) and record["paused_us"] >= 0
    assert record["signer"] is None and record["insecure_store"] is False
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", record["time"])
    assert record["requested_by"]["uid"] == 0 and record["requested_by"]["user"] == "root"


def test_patch_and_unpatch_leave_one_line_each_and_info_says_who(answer, patient, tmp_path):
    store = flat_store(answer, tmp_path)
    log = tmp_path / "log" / "audit.jsonl"

    ctl("patch", "-p", str(patient.pid), "--audit-log", str(log), str(store))
    assert answers(patient, 2)
    records = audit_lines(log)
    assert len(records) == 1
    check_record(records[0], patient, answer, store, "patch", "applied")
    assert records[0]["previous_level"] is None and records[0]["source"] == str(store)
    assert records[0]["requested_by"]["via"] == "command"
    assert records[0]["requested_by"]["command"] == f"libcare-ctl patch -p {patient.pid} --audit-log {log} {store}"
    assert (log.stat().st_mode & 0o777, log.parent.stat().st_mode & 0o777) == (0o600, 0o700)

    ctl("patch", "-p", str(patient.pid), "--audit-log", str(log), str(store))     # already applied: no change
    assert len(audit_lines(log)) == 1

    shown = ctl("info", "-p", str(patient.pid), "-s", "", "--audit-log", str(log)).stdout
    assert f" applied={records[0]['time']} by=root/command" in shown, shown
    reported = json.loads(ctl("info", "-p", str(patient.pid), "-s", "", "--json", "--audit-log", str(log)).stdout)
    patched = [o for o in reported["processes"][0]["objects"] if o["applied_level"] is not None]
    assert [(o["applied_at"], o["applied_by"]["command"]) for o in patched] == \
        [(records[0]["time"], records[0]["requested_by"]["command"])]

    ctl("unpatch", "-p", str(patient.pid), "--audit-log", str(log))
    assert answers(patient, 1)
    records = audit_lines(log)
    assert len(records) == 2
    check_record(records[1], patient, answer, store, "unpatch", "removed")
    assert records[1]["level"] == records[1]["previous_level"] == records[0]["level"]
    ctl("unpatch", "-p", str(patient.pid), "--audit-log", str(log))               # nothing applied: no change
    assert len(audit_lines(log)) == 2


def test_a_verified_signer_is_recorded_with_the_patch_and_its_removal(answer, patient, tmp_path):
    store = flat_store(answer, tmp_path)
    log = tmp_path / "log" / "audit.jsonl"
    key = tmp_path / "keys" / "release"
    key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "release", "-f", str(key)], check=True,
                   capture_output=True, timeout=60)
    allowed = tmp_path / "keys" / "allowed_signers"
    allowed.write_text("release@example.org " + " ".join(Path(f"{key}.pub").read_text().split()[:2]) + "\n")
    subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", "libcare-livepatch", str(store / "SHA256SUMS")],
                   check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

    ctl("patch", "-p", str(patient.pid), "--allowed-signers", str(allowed), "--audit-log", str(log), str(store))
    assert answers(patient, 2)
    ctl("unpatch", "-p", str(patient.pid), "--audit-log", str(log))
    assert answers(patient, 1)
    assert [(r["event"], r["outcome"], r["signer"]) for r in audit_lines(log)] == \
        [("patch", "applied", "release@example.org"), ("unpatch", "removed", "release@example.org")]


def test_check_mode_logs_nothing(answer, patient, tmp_path):
    store = flat_store(answer, tmp_path)
    log = tmp_path / "log" / "audit.jsonl"
    ctl("patch", "--check", "-p", str(patient.pid), "--audit-log", str(log), str(store))
    assert answers(patient, 1)
    assert not log.exists()


def test_an_unwritable_audit_log_refuses_before_touching_anything(answer, patient, tmp_path):
    store = flat_store(answer, tmp_path)
    (tmp_path / "not-a-dir").write_text("")
    run = subprocess.run([CTL, "patch", "-p", str(patient.pid), "--audit-log", str(tmp_path / "not-a-dir" / "a"),
                          str(store)], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode != 0
    assert "cannot write the audit log" in run.stderr and "nothing was done" in run.stderr
    assert answers(patient, 1)


def test_the_patch_also_goes_to_syslog(answer, patient, tmp_path):
    """libcare-ctl runs in its own mount namespace whose /dev/log is our socket."""
    store = flat_store(answer, tmp_path)
    log = tmp_path / "log" / "audit.jsonl"
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "null").write_text("")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(dev / "log"))
    receiver.settimeout(60)
    namespace = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f'mount --bind /dev/null {dev}/null && mount --bind {dev} /dev && exec "$@"', "sh")
    try:
        ctl("patch", "-p", str(patient.pid), "--audit-log", str(log), str(store), prefix=namespace)
        message = receiver.recv(4096).decode()
    finally:
        receiver.close()
    assert answers(patient, 2)
    record = audit_lines(log)[0]
    assert message.startswith("<85>")                      # authpriv (10) * 8 + notice (5)
    assert f"libcare[{record['tool_pid']}]: patch applied: pid {patient.pid} (answer) build-id {record['build_id']} " \
           f"level {record['level']}, by uid 0 (root) via command" in message, message


def ansible(module: str, arguments: dict, tmp_path: Path) -> dict:
    """Run one module on localhost as the ``ansible`` command does over SSH (SSH_CLIENT, SUDO_USER set)."""
    collections = tmp_path / "collections" / "ansible_collections" / "libcare"
    collections.mkdir(parents=True, exist_ok=True)
    if not (collections / "livepatch").exists():
        os.symlink(ROOT, collections / "livepatch")
    environment = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections"),
                   "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal",
                   "ANSIBLE_NOCOLOR": "1",
                   "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
                   "SSH_CLIENT": "192.0.2.10 50022 22", "SUDO_USER": "deploy"}
    run = subprocess.run([str(ROOT / ".venv" / "bin" / "ansible"), "localhost", "-c", "local", "-i", "localhost,",
                          "-e", f"ansible_python_interpreter={ROOT / '.venv' / 'bin' / 'python'}",
                          "-m", f"libcare.livepatch.{module}", "-a", json.dumps(arguments)],
                         capture_output=True, text=True, check=False, timeout=300, env=environment)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout.split(" => ", 1)[1])        # localhost | CHANGED => {...}


def test_the_modules_log_the_ansible_user_and_controller(answer, patient, tmp_path):
    store = flat_store(answer, tmp_path)
    log = tmp_path / "log" / "audit.jsonl"
    shutil.rmtree(tmp_path / "collections", ignore_errors=True)

    applied = ansible("livepatch", {"store": str(store), "pid": patient.pid, "audit_log": str(log)}, tmp_path)
    assert applied["changed"] and applied["counts"]["applied"] == 1
    assert answers(patient, 2)
    records = audit_lines(log)
    assert len(records) == 1
    check_record(records[0], patient, answer, store, "patch", "applied")
    assert {key: records[0]["requested_by"][key] for key in ("via", "command", "ansible_host", "ansible_user")} == \
        {"via": "ansible", "command": "libcare.livepatch.livepatch", "ansible_host": "192.0.2.10",
         "ansible_user": "deploy"}

    info = ansible("livepatch_info", {"pid": patient.pid, "audit_log": str(log)}, tmp_path)
    patched = [o for o in info["processes"][0]["objects"] if o["applied_level"] is not None]
    assert [(o["applied_at"], o["applied_by"]["ansible_user"]) for o in patched] == [(records[0]["time"], "deploy")]

    removed = ansible("livepatch", {"store": str(store), "pid": patient.pid, "state": "absent",
                                    "audit_log": str(log)}, tmp_path)
    assert removed["changed"] and removed["counts"]["removed"] == 1
    assert answers(patient, 1)
    records = audit_lines(log)
    assert len(records) == 2
    check_record(records[1], patient, answer, store, "unpatch", "removed")
    assert records[1]["requested_by"]["ansible_host"] == "192.0.2.10"
