"""The audit trail: what code was put into which process, when, and who asked.

Every patch, unpatch and refusal (by ``libcare-ctl``, the Ansible modules or the resident
service) becomes one JSON line in the audit log and a short message to the system log::

    {"time": "2026-12-02T06:03:20.123456Z", "event": "patch", "outcome": "applied",
     "reason": "level 1 applied", "requested_by": {"uid": 0, "user": "root", "via": "command",
     "command": "libcare-ctl patch -p 4242 /var/lib/libcare", "ansible_host": null,
     "ansible_user": null, "peer_pid": null}, "pid": 4242, "process_start": 1234567,
     "comm": "server", "exe": "/usr/sbin/server", "object": "/usr/sbin/server",
     "build_id": "8e1f...", "level": 1, "previous_level": null, "patch_sha256": "5d41...",
     "signer": null, "source": "/var/lib/libcare", "insecure_store": false, "paused_us": 640,
     "host": "web1", "tool_pid": 4300}

The log (default ``/var/log/libcare/audit.jsonl``, its directory created 0700 and the file
0600) is opened with ``O_APPEND`` for every line and closed again, so a log rotation that
renames it loses nothing: the next line starts the new file. Each line is one ``write``.
``process_start`` (clock ticks after boot, from ``/proc/PID/stat``) tells a process from a
later one with the same pid.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import shlex
import socket
import syslog
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

from .errors import AuditError
from .results import ObjectAction, ProcessResult

DEFAULT_AUDIT_LOG = "/var/log/libcare/audit.jsonl"
AUDIT_LOG_ENV = "LIBCARE_AUDIT_LOG"        # overrides the default path (tests, labs)
SYSLOG_IDENT = "libcare"
# "skipped" changed nothing: not recorded
RECORDED_ACTIONS = (ObjectAction.APPLIED, ObjectAction.REMOVED, ObjectAction.FAILED)
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


# ------------------------------------------------------------------------------ who asked
@dataclass(frozen=True)
class Requester:
    """Who asked for a patch or unpatch."""

    uid: int
    via: str                          # "command" (libcare-ctl), "ansible" (a module) or "service"
    command: str = ""                 # the command line, the module's name, or "service"
    ansible_host: str | None = None   # where the Ansible run came from (its SSH client address)
    ansible_user: str | None = None   # the user Ansible logged in as (before become)
    peer_pid: int | None = None       # the service's client process, when known

    @classmethod
    def from_command(cls, argv: Sequence[str]) -> Requester:
        """The user running this command line."""
        return cls(os.getuid(), "command", shlex.join(argv))

    @classmethod
    def from_ansible(cls, module_name: str, environ: dict[str, str] | None = None) -> Requester:
        """The Ansible module ``module_name`` run over SSH (or locally), as its environment tells."""
        environ = os.environ if environ is None else environ
        ssh_client = environ.get("SSH_CLIENT", "").split()
        host = ssh_client[0] if ssh_client else "localhost"
        user = environ.get("SUDO_USER") or environ.get("LOGNAME") or environ.get("USER") or _user_name(os.getuid())
        return cls(os.getuid(), "ansible", module_name, host, user)

    @classmethod
    def from_service(cls, uid: int, peer_pid: int | None = None) -> Requester:
        """A client of the resident service, with the credentials its socket reported."""
        return cls(uid, "service", "service", None, None, peer_pid)

    def to_json(self) -> dict:
        """A JSON-ready dict, with the uid's user name."""
        return {"uid": self.uid, "user": _user_name(self.uid), **{k: v for k, v in asdict(self).items() if k != "uid"}}

    def describe(self) -> str:
        """One short phrase: ``uid 0 (root) via command``."""
        return f"uid {self.uid} ({_user_name(self.uid)}) via {self.via}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# ------------------------------------------------------------------------------ the log
def default_audit_log_path(environ: dict[str, str] | None = None) -> str:
    """``$LIBCARE_AUDIT_LOG``, else the system log for root, else one in the user's state directory."""
    environ = os.environ if environ is None else environ
    if environ.get(AUDIT_LOG_ENV):
        return environ[AUDIT_LOG_ENV]
    if os.geteuid() == 0:
        return DEFAULT_AUDIT_LOG
    state = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "libcare", "audit.jsonl")


class AuditLog:
    """The JSON-lines audit log at ``path`` (default: :func:`default_audit_log_path`), plus syslog."""

    def __init__(self, path: str | None = None, *, to_syslog: bool = True) -> None:
        self.path = path or default_audit_log_path()
        self.to_syslog = to_syslog

    def prepare(self) -> None:
        """Make sure a line can be appended (create the directory 0700 and the file 0600).

        Called before anything is done: an action that could not be recorded is not taken.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
                os.chmod(directory, 0o700)
            os.close(os.open(self.path, _OPEN_FLAGS, 0o600))
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror}; "
                             f"nothing was done (give another path with --audit-log)") from None

    def append(self, record: dict) -> None:
        """Append ``record`` as one line (one ``write`` to a freshly opened file) and tell syslog."""
        line = (json.dumps(record, separators=(", ", ": ")) + "\n").encode()
        try:
            descriptor = os.open(self.path, _OPEN_FLAGS, 0o600)
            try:
                written = os.write(descriptor, line)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror}") from None
        if written != len(line):
            raise AuditError(f"short write to the audit log {self.path} ({written} of {len(line)} bytes)")
        if self.to_syslog:
            send_to_syslog(record)

    def append_all(self, records: Iterable[dict]) -> None:
        """:meth:`append` each record."""
        for record in records:
            self.append(record)

    def records(self) -> Iterator[dict]:
        """Every record, oldest first: the rotated ``PATH.1`` first, then ``PATH``; bad lines skipped."""
        for path in (self.path + ".1", self.path):
            try:
                with open(path, encoding="utf-8", errors="replace") as stream:
                    for line in stream:
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(record, dict):
                            yield record
            except OSError:
                continue


_syslog_opened = False


def send_to_syslog(record: dict) -> None:
    """One short message about ``record`` to the system log (authpriv; warning for failures)."""
    global _syslog_opened
    if not _syslog_opened:
        syslog.openlog(SYSLOG_IDENT, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        _syslog_opened = True
    priority = syslog.LOG_NOTICE if record.get("outcome") in ("applied", "removed") else syslog.LOG_WARNING
    syslog.syslog(priority, syslog_message(record))


def syslog_message(record: dict) -> str:
    """``patch applied: pid 4242 (server) build-id 8e1f... level 1, by uid 0 (root) via command``."""
    asked = record.get("requested_by") or {}
    target = f"pid {record['pid']} ({record.get('comm') or '?'})" if record.get("pid") is not None \
        else "all processes"
    parts = [f"{record.get('event')} {record.get('outcome')}: {target}"]
    if record.get("build_id"):
        parts.append(f"build-id {record['build_id']}")
    if record.get("level") is not None:
        parts.append(f"level {record['level']}")
    message = " ".join(parts) + f", by uid {asked.get('uid')} ({asked.get('user')}) via {asked.get('via')}"
    if record.get("outcome") in ("failed", "refused") and record.get("reason"):
        message += f": {record['reason']}"
    return message


# ------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class ProcessFacts:
    """What identifies a process in the log: its program and start time."""

    comm: str | None
    exe: str | None
    start: int | None                 # clock ticks after boot (field 22 of /proc/PID/stat)


def process_facts(pid: int) -> ProcessFacts:
    """The facts of ``pid`` (None for what cannot be read, e.g. when it exited)."""
    comm = exe = start = None
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            stat_line = stream.read()
        close = stat_line.rindex(b")")
        comm = stat_line[stat_line.index(b"(") + 1:close].decode("utf-8", "replace")
        start = int(stat_line[close + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        pass
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        pass
    return ProcessFacts(comm, exe, start)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _base_record(event: str, outcome: str, reason: str, requester: Requester, pid: int | None,
                 facts: ProcessFacts | None, source: str | None, insecure_store: bool) -> dict:
    return {
        "time": _now(), "event": event, "outcome": outcome, "reason": reason,
        "requested_by": requester.to_json(),
        "pid": pid, "process_start": facts.start if facts else None,
        "comm": facts.comm if facts else None, "exe": facts.exe if facts else None,
        "object": None, "build_id": None, "level": None, "previous_level": None,
        "patch_sha256": None, "signer": None, "source": os.path.abspath(source) if source else None,
        "insecure_store": insecure_store,
        "paused_us": None, "host": socket.gethostname(), "tool_pid": os.getpid(),
    }


# (build_id, level) -> sha256 of the patch file, or None when unknown
DigestLookup = Callable[[str, "int | None"], "str | None"]


def result_records(event: str, results: Iterable[ProcessResult], requester: Requester, *,
                   source: str | None = None, patch_sha256: DigestLookup | None = None,
                   signer: str | None = None, insecure_store: bool = False,
                   known: dict | None = None) -> list[dict]:
    """One record per object applied, removed or failed, and per process that failed as a whole.

    ``event``: "patch" or "unpatch". ``patch_sha256`` finds the digest of a patch by build-id
    and level; for an unpatch, the digest and signer are taken from ``known`` (see
    :func:`index_applied`), the record of when that patch was applied.
    """
    records = []
    for process in results:
        wanted = [obj for obj in process.objects if obj.action in RECORDED_ACTIONS]
        if not wanted and not (process.error and not process.objects):
            continue
        facts = process_facts(process.pid)
        if facts.comm is None:
            facts = ProcessFacts(process.comm, None, None)
        if not wanted:
            records.append(_base_record(event, ObjectAction.FAILED.value, process.error, requester, process.pid, facts, source,
                                        insecure_store))
            continue
        for obj in wanted:
            record = _base_record(event, obj.action.value, obj.reason or process.error, requester, process.pid, facts,
                                  source, insecure_store)
            applied_now = obj.action == ObjectAction.APPLIED
            level = obj.applied_level if event == "patch" and applied_now else obj.previous_level
            record.update(object=obj.path, build_id=obj.build_id, level=level, previous_level=obj.previous_level,
                          paused_us=obj.paused_us)
            if event == "patch":
                record["patch_sha256"] = patch_sha256(obj.build_id, level if applied_now else None) \
                    if patch_sha256 else None
                record["signer"] = signer
            elif known is not None:
                applied = known.get((process.pid, facts.start, obj.build_id, obj.previous_level))
                if applied is not None:
                    record["patch_sha256"] = applied.get("patch_sha256")
                    record["signer"] = applied.get("signer")
            records.append(record)
    return records


def refusal_records(event: str, reason: str, requester: Requester, *, pids: Sequence[int] | None = None,
                    source: str | None = None, insecure_store: bool = False) -> list[dict]:
    """One ``refused`` record per requested pid (one with pid null when all processes were asked)."""
    targets: Sequence[int | None] = list(pids) if pids else [None]
    return [_base_record(event, "refused", reason, requester, pid, process_facts(pid) if pid is not None else None,
                         source, insecure_store) for pid in targets]


def index_applied(records: Iterable[dict]) -> dict[tuple, dict]:
    """The latest ``applied`` patch record per (pid, process_start, build_id, level)."""
    index = {}
    for record in records:
        if record.get("event") == "patch" and record.get("outcome") == "applied":
            index[(record.get("pid"), record.get("process_start"), record.get("build_id"), record.get("level"))] = record
    return index


def applied_record(index: dict[tuple, dict], pid: int, build_id: str | None, level: int | None,
                   start: int | None = None) -> dict | None:
    """When and by whom ``level`` of ``build_id`` was applied to ``pid``, from :func:`index_applied`."""
    if start is None:
        start = process_facts(pid).start
    return index.get((pid, start, build_id, level))


__all__ = [
    "AUDIT_LOG_ENV", "DEFAULT_AUDIT_LOG", "AuditLog", "ProcessFacts", "Requester", "applied_record",
    "default_audit_log_path", "index_applied", "process_facts", "refusal_records", "result_records",
    "send_to_syslog", "syslog_message",
]
