"""What the service did: counters and, per process, when, how and by whom it was patched."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field

HOW_EXEC = "exec"            # caught at its exec or library load, patched before its code ran
HOW_LATE = "late"            # found running unpatched (started while the service was not watching)
HOW_PUBLISH = "publish"      # a new level was published to the store
HOW_REQUEST = "request"      # libcare-ctl patch through the socket
_RECENT = 200


def now_text() -> str:
    """The current time, ISO 8601 UTC to the millisecond."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


@dataclass(frozen=True)
class PatchRecord:
    """One patch the service applied (or failed to) in one process."""

    pid: int
    uid: int
    comm: str
    build_id: str
    level: int | None
    how: str
    by: str
    when: str
    outcome: str                 # applied | failed
    reason: str = ""
    paused_us: int | None = None
    latency_ms: float | None = None    # exec (or library open) to patched, for HOW_EXEC


@dataclass
class Status:
    """Counters since the service started, and the latest records."""

    started: str = field(default_factory=now_text)
    patched_at_exec: int = 0
    patched_late: int = 0
    patched_on_publish: int = 0
    patched_on_request: int = 0
    failures: int = 0
    released: int = 0            # caught processes let go to be patched late
    objects_watched: int = 0
    records: deque = field(default_factory=lambda: deque(maxlen=_RECENT))
    by_pid: dict = field(default_factory=dict)

    def note(self, record: PatchRecord) -> None:
        """Count ``record`` and keep it."""
        if record.outcome == "failed":
            self.failures += 1
        else:
            attribute = {HOW_EXEC: "patched_at_exec", HOW_LATE: "patched_late", HOW_PUBLISH: "patched_on_publish",
                         HOW_REQUEST: "patched_on_request"}[record.how]
            setattr(self, attribute, getattr(self, attribute) + 1)
            self.by_pid.setdefault(record.pid, {})[record.build_id] = record
        self.records.append(record)

    def forget(self, pid: int) -> None:
        """Process ``pid`` exited."""
        self.by_pid.pop(pid, None)

    def to_json(self, uid: int | None = None) -> dict:
        """JSON-ready; only the records of processes of ``uid`` when it is given."""
        visible = [r for r in self.records if uid is None or r.uid == uid]
        return {
            "started": self.started,
            "objects_watched": self.objects_watched,
            "processes_patched": sum(1 for records in self.by_pid.values() if records),
            "patched_at_exec": self.patched_at_exec,
            "patched_late": self.patched_late,
            "patched_on_publish": self.patched_on_publish,
            "patched_on_request": self.patched_on_request,
            "failures": self.failures,
            "released": self.released,
            "recent": [asdict(r) for r in visible],
        }

    def text(self, uid: int | None = None) -> str:
        """The ``libcare-ctl watch --status`` lines."""
        data = self.to_json(uid)
        lines = [f"service started {data['started']}",
                 f"objects watched: {data['objects_watched']}",
                 f"processes patched now: {data['processes_patched']}",
                 f"patched at exec: {data['patched_at_exec']}",
                 f"patched late: {data['patched_late']}",
                 f"patched on publish: {data['patched_on_publish']}",
                 f"patched on request: {data['patched_on_request']}",
                 f"failures: {data['failures']}"]
        for record in data["recent"][-20:]:
            extra = f" ({record['latency_ms']:.1f} ms after exec)" if record["latency_ms"] is not None else ""
            lines.append(f"{record['when']} pid={record['pid']} comm={record['comm']} {record['outcome']} "
                         f"level {record['level']} of {record['build_id']} {record['how']} by {record['by']}{extra}"
                         + (f": {record['reason']}" if record["outcome"] == "failed" else ""))
        return "\n".join(lines) + "\n"
