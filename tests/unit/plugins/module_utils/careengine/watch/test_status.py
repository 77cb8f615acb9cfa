"""The service's counters and records, and what each user may see of them."""

from __future__ import annotations

from plugins.module_utils.careengine.watch.status import HOW_EXEC, HOW_LATE, PatchRecord, Status


def _record(pid, uid, how, outcome="applied"):
    return PatchRecord(pid, uid, "prog", "ab" * 20, 1, how, "service", "2026-01-01T00:00:00.000Z", outcome,
                       "why", 100, 2.5 if how == HOW_EXEC else None)


def test_counts_by_how_and_failures():
    status = Status()
    status.note(_record(10, 0, HOW_EXEC))
    status.note(_record(11, 1000, HOW_LATE))
    status.note(_record(12, 0, HOW_LATE, "failed"))
    data = status.to_json()
    assert (data["patched_at_exec"], data["patched_late"], data["failures"], data["processes_patched"]) == (1, 1, 1, 2)
    status.forget(10)
    assert status.to_json()["processes_patched"] == 1


def test_a_user_sees_only_the_records_of_their_processes():
    status = Status()
    status.note(_record(10, 0, HOW_EXEC))
    status.note(_record(11, 1000, HOW_LATE))
    assert [r["pid"] for r in status.to_json(uid=1000)["recent"]] == [11]
    text = status.text(uid=1000)
    assert "pid=11" in text and "pid=10" not in text and "patched late: 1" in text
