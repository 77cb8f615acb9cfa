"""New processes, re-execs and dlopen'ed libraries get the patch before their own code runs."""

from __future__ import annotations

import statistics

from watch_helpers import until


def test_restarted_100_times_every_first_line_is_fixed(service, project, programs):
    first_lines = []
    for _ in range(100):
        program = programs(str(project.greeter))
        first_lines.append(program.line(0))
        program.process.wait(timeout=30)
    assert first_lines == ["greeting FIXED"] * 100, [line for line in first_lines if "FIXED" not in line][:3]
    status = service.status()
    assert status["patched_at_exec"] >= 100, status
    latencies = [r["latency_ms"] for r in status["recent"] if r["how"] == "exec" and r["latency_ms"] is not None]
    print(f"exec-to-patched latency: median {statistics.median(latencies):.2f} ms, max {max(latencies):.2f} ms")


def test_a_process_that_reexecutes_itself_runs_the_fix_in_its_new_image(service, project, programs):
    program = programs(str(project.greeter), "wait", stdin=True)
    assert program.line(0) == "greeting FIXED"
    program.send("upgrade\n")                       # execve of its own binary, as nginx on USR2
    assert program.line(1) == "greeting FIXED"
    assert until(lambda: service.status()["patched_at_exec"] >= 2)


def test_a_library_loaded_by_dlopen_is_patched_before_dlopen_returns(service, project, programs):
    program = programs(str(project.greeter), "dlopen", str(project.plug), stdin=True)
    assert program.line(0) == "greeting FIXED"
    program.send("load\n")
    assert program.line(1) == "plug FIXED"         # printed right after dlopen returned
    info = service.ctl("info", "-p", str(program.pid))
    assert info.returncode == 0, info.stderr
    assert "libplug.so" in info.stdout and "patchlvl=1" in info.stdout.split("libplug.so", 1)[1], info.stdout


def test_a_static_program_is_patched_at_its_exec(service, project, programs):
    first_lines = [programs(str(project.static)).line(0) for _ in range(5)]
    assert first_lines == ["static FIXED"] * 5


def test_dlopen_in_a_multithreaded_process_stops_every_thread_for_the_patch(service, project, programs):
    program = programs(str(project.greeter), "dlopen", str(project.plug), "threads", stdin=True)
    assert program.line(0) == "greeting FIXED"
    program.send("load\n")
    assert program.line(1) == "plug FIXED"
    assert program.process.poll() is None
