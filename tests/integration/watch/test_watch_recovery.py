"""The service killed at any moment leaves nothing stopped or traced; processes started
while it was down are patched late when it is back, and reported as such."""

from __future__ import annotations

import json
import signal

from watch_helpers import Service, not_held, until


def test_killed_service_leaves_nothing_held_and_patches_late_on_restart(service, store, tmp_path, project,
                                                                        programs):
    started = [programs(str(project.greeter), "sleep", "60") for _ in range(10)]
    assert [program.line(0) for program in started] == ["greeting FIXED"] * 10
    for index in range(20):
        started.append(programs(str(project.greeter), "sleep", "60"))
        if index == 4:
            service.process.send_signal(signal.SIGKILL)   # while execs are being caught and patched
            service.process.wait(timeout=30)
    first_lines = [program.line(0) for program in started]
    assert set(first_lines) <= {"greeting FIXED", "greeting UNPATCHED"}, first_lines
    assert "greeting UNPATCHED" in first_lines[15:], "the execs after the kill were patched by no one"
    for pid in [program.pid for program in started]:
        assert until(lambda pid=pid: not_held(pid)), f"pid {pid} left traced or stopped"
    assert all(program.process.poll() is None for program in started), "a process died"

    unpatched = [p.pid for p, line in zip(started, first_lines, strict=True) if line == "greeting UNPATCHED"]
    again = Service(store, tmp_path, project)
    try:
        assert until(lambda: again.status()["patched_late"] >= len(unpatched)), again.text()
        late = {r["pid"] for r in again.status()["recent"] if r["how"] == "late" and r["outcome"] == "applied"}
        assert set(unpatched) <= late
        info = json.loads(again.ctl("info", "--json", "-s", "").stdout)
        levels = {p["pid"]: [o["applied_level"] for o in p["objects"] if o["path"] == str(project.greeter)]
                  for p in info["processes"]}
        assert all(levels[pid] == [1] for pid in unpatched), {pid: levels.get(pid) for pid in unpatched}
        audit = [json.loads(line) for line in again.audit_log.read_text().splitlines()]
        assert {r["pid"] for r in audit if "late" in r["requested_by"]["command"]} >= set(unpatched)
    finally:
        again.stop()
