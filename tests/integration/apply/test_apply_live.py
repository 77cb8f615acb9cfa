"""Patch, unpatch and info on real processes with real patches from libcare-patch-make."""

from __future__ import annotations

import os
import random
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from apply_helpers import build_id_of, ctl, install, map_count

from plugins.module_utils.careengine.apply import engine, operations
from plugins.module_utils.careengine.apply.object_files import ObjectFile
from plugins.module_utils.careengine.process import StoppedProcess, mapped_objects, read_memory

# A patch occupies two mappings: its code pages (r-x) and its data pages (rw-; every
# fixture's patch has data: at least its string literals).
VMAS_PER_PATCH = 2


def function_bytes(pid: int, path: Path, name: str) -> bytes:
    """The patient's bytes of function ``name`` of the object at ``path``."""
    mapped = next(o for o in mapped_objects(pid) if o.path == str(path))
    with open(path, "rb") as stream:
        symbol = ObjectFile(str(path), stream).lookup_local(name)
        assert symbol is not None and symbol.size >= 5
        return read_memory(pid, mapped.load_bias + symbol.vaddr, symbol.size)


def only(results):
    assert len(results) == 1, results
    return results[0]


def test_patch_and_unpatch_executable_and_library(libdemo, start):
    patient = start(libdemo)
    library = libdemo.libdir / "libdemo.so"
    originals = {"app_report": function_bytes(patient.pid, libdemo.binary, "app_report"),
                 "demo_report": function_bytes(patient.pid, library, "demo_report")}
    maps_before = map_count(patient.pid)

    result = ctl("-v", "patch", "-p", str(patient.pid), str(libdemo.patches_dir))
    assert result.returncode == 0, result.stderr
    assert f"2 patch hunk(s) have been successfully applied to PID '{patient.pid}'" in result.stdout
    patient.wait_for(lambda line: line.startswith("demo PATCHED"))
    line = patient.wait_for(lambda line: line.startswith("libdemo PATCHED"))
    counter = int(line.split()[-1])
    assert counter % 2 == 0                   # demo_twice, the new function, is called
    assert map_count(patient.pid) == maps_before + 2 * VMAS_PER_PATCH
    for name, path in (("app_report", libdemo.binary), ("demo_report", library)):
        assert function_bytes(patient.pid, path, name)[:1] == b"\xe9"

    info = ctl("info", "-p", str(patient.pid), "-s", str(libdemo.patches_dir))
    assert info.returncode == 0, info.stderr
    applied_by = r" applied=\S+Z by=root/command"          # from the audit log (tests/conftest.py)
    assert re.search(rf"^demo buildid=[0-9a-f]+ patchlvl=0 latest=0 functions=app_report{applied_by}$", info.stdout,
                     re.M)
    assert re.search(rf"^libdemo.so buildid=[0-9a-f]+ patchlvl=0 latest=0 functions=demo_report{applied_by}$",
                     info.stdout, re.M)

    result = ctl("unpatch", "-p", str(patient.pid))
    assert result.returncode == 0, result.stderr
    assert f"2 patch hunk(s) were successfully cancelled from PID '{patient.pid}'" in result.stdout
    patient.wait_for(lambda line: line.startswith("demo UNPATCHED"))
    patient.wait_for(lambda line: line.startswith("libdemo UNPATCHED"))
    assert function_bytes(patient.pid, libdemo.binary, "app_report") == originals["app_report"]
    assert function_bytes(patient.pid, library, "demo_report") == originals["demo_report"]
    assert map_count(patient.pid) == maps_before


def test_library_only_patch_file_and_json(libdemo, start):
    patient = start(libdemo)
    patch = libdemo.patch_of(libdemo.libdir / "libdemo.so")
    result = ctl("patch", "-p", str(patient.pid), "--json", str(patch))
    assert result.returncode == 0, result.stderr
    report = __import__("json").loads(result.stdout)
    assert report["summary"] == {"applied": 1, "skipped": 0, "removed": 0, "failed": 0}
    obj = only(report["processes"])["objects"][0]
    assert obj["action"] == "applied" and obj["path"].endswith("libdemo.so") and obj["paused_us"] > 0
    assert obj["functions"] == ["demo_report"]
    patient.wait_for(lambda line: line.startswith("libdemo PATCHED"))
    patient.wait_for(lambda line: line.startswith("demo UNPATCHED"))
    again = ctl("patch", "-p", str(patient.pid), str(patch))
    assert again.returncode == 0 and "already applied" in again.stdout


def test_non_pie_executable(nonpie, start):
    patient = start(nonpie)
    before = function_bytes(patient.pid, nonpie.binary, "report")
    maps_before = map_count(patient.pid)
    results = operations.patch_processes(str(nonpie.patch_of(nonpie.binary)), [patient.pid])
    obj = only(only(results).objects)
    assert obj.action == "applied", obj.reason
    line = patient.wait_for(lambda line: line.startswith("nonpie PATCHED"))
    first = patient.wait_for(lambda line: line.startswith("nonpie PATCHED"), after=patient.lines.index(line) + 1)
    # The patched code keeps using the original static and global variables.
    calls = [int(re.search(r"calls=(\d+)", x).group(1)) for x in (line, first)]
    totals = [int(re.search(r"total=(\d+)", x).group(1)) for x in (line, first)]
    assert calls[1] == calls[0] + 1 and totals[1] == totals[0] + 1000
    results = operations.unpatch_processes([patient.pid])
    assert only(only(results).objects).action == "removed"
    patient.wait_for(lambda line: line.startswith("nonpie UNPATCHED"))
    assert function_bytes(patient.pid, nonpie.binary, "report") == before
    assert map_count(patient.pid) == maps_before


def test_check_mode_changes_nothing(libdemo, start):
    patient = start(libdemo)
    maps_before = map_count(patient.pid)
    result = only(operations.patch_processes(str(libdemo.patches_dir), [patient.pid], check=True))
    assert [o.action for o in result.objects] == ["applied", "applied"]
    assert all(o.paused_us is None for o in result.objects)
    assert map_count(patient.pid) == maps_before
    patient.wait_for(lambda line: line.startswith("demo UNPATCHED"))
    assert only(operations.unpatch_processes([patient.pid], check=True)).objects == ()


def test_levels_replace_skip_and_conflict(libdemo, level_store, start, tmp_path):
    store, lib_id, levels = level_store
    install(store, levels[1], 1)
    patient = start(libdemo)
    maps_before = map_count(patient.pid)

    obj = only(only(operations.patch_processes(str(store), [patient.pid])).objects)
    assert (obj.action, obj.applied_level, obj.previous_level) == ("applied", 1, None)
    patient.wait_for(lambda line: line.startswith("libdemo PATCHED"))
    info = only(operations.info_processes([patient.pid], str(store)))
    lib_info = next(o for o in info.objects if o.build_id == lib_id)
    assert (lib_info.applied_level, lib_info.available_level) == (1, 1)

    install(store, levels[2], 2)
    obj = only(only(operations.patch_processes(str(store), [patient.pid])).objects)
    assert (obj.action, obj.applied_level, obj.previous_level) == ("applied", 2, 1), obj.reason
    patient.wait_for(lambda line: line.startswith("libdemo LEVEL2"))
    assert map_count(patient.pid) == maps_before + VMAS_PER_PATCH       # the level-1 mapping is gone

    obj = only(only(operations.patch_processes(str(store), [patient.pid])).objects)
    assert obj.action == "skipped" and "already applied" in obj.reason
    obj = only(only(operations.patch_processes(str(store), [patient.pid], level=1)).objects)
    assert obj.action == "skipped" and "newer" in obj.reason

    conflicting = tmp_path / "conflict"
    install(conflicting, levels[1], 2)
    obj = only(only(operations.patch_processes(str(conflicting), [patient.pid])).objects)
    assert obj.action == "failed" and "different patch" in obj.reason
    patient.wait_for(lambda line: line.startswith("libdemo LEVEL2"))

    cli = ctl("info", "-p", str(patient.pid), "-s", str(store))
    assert re.search(rf"^libdemo.so buildid={lib_id} patchlvl=2 latest=2", cli.stdout, re.M)
    assert ctl("unpatch", "-p", str(patient.pid), lib_id).returncode == 0
    patient.wait_for(lambda line: line.startswith("libdemo UNPATCHED"))
    assert map_count(patient.pid) == maps_before


def test_threads_survive_patch_unpatch_cycles(threads_project, start):
    patient = start(threads_project)
    patch = str(threads_project.patch_of(threads_project.binary))
    assert len(os.listdir(f"/proc/{patient.pid}/task")) == 9
    original = function_bytes(patient.pid, threads_project.binary, "compute")
    base = int(re.search(r"value=(\d+)", patient.lines[0]).group(1))
    pauses = []
    for cycle in range(50):
        result = only(operations.patch_processes(patch, [patient.pid], timeout=5.0))
        obj = only(result.objects)
        assert obj.action == "applied", f"cycle {cycle}: {obj.reason}"
        pauses.append(obj.paused_us)
        patient.wait_for(lambda line: f"value={base + 1} " in line)
        removed = only(only(operations.unpatch_processes([patient.pid], timeout=5.0)).objects)
        assert removed.action == "removed", f"cycle {cycle}: {removed.reason}"
        patient.wait_for(lambda line: f"value={base} " in line)
    line = patient.wait_for(lambda line: "bad=" in line)
    assert line.endswith("bad=0")
    assert function_bytes(patient.pid, threads_project.binary, "compute") == original
    print(f"pause over 50 patches of 9 threads: median {statistics.median(pauses)} us, max {max(pauses)} us")


def test_busy_function_is_refused(threads_project, start):
    patient = start(threads_project, "busy")
    maps_before = map_count(patient.pid)
    before = function_bytes(patient.pid, threads_project.binary, "spin")
    result = ctl("patch", "-p", str(patient.pid), "--timeout", "0.5",
                 str(threads_project.patch_of(threads_project.binary)))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.search(r"thread \d+ executing spin", result.stderr), result.stderr
    assert patient.alive()
    value = re.search(r"value=(\d+)", patient.lines[0]).group(1)
    patient.wait_for(lambda line: f"value={value} " in line)
    assert function_bytes(patient.pid, threads_project.binary, "spin") == before
    assert map_count(patient.pid) == maps_before


def test_unpatch_refused_while_a_thread_runs_new_code(threads_project, start):
    patient = start(threads_project, "late")
    patch = str(threads_project.patch_of(threads_project.binary))
    applied = only(only(operations.patch_processes(patch, [patient.pid])).objects)
    assert applied.action == "applied", applied.reason
    maps_patched = map_count(patient.pid)
    patched_spin = function_bytes(patient.pid, threads_project.binary, "spin")
    value = int(re.search(r"value=(\d+)", patient.lines[0]).group(1))
    patient.wait_for(lambda line: f"value={value + 1} " in line)
    time.sleep(0.2)                          # the late thread is now spinning in the new spin()
    removed = only(only(operations.unpatch_processes([patient.pid], timeout=0.3)).objects)
    assert removed.action == "failed"
    assert re.search(r"thread \d+ executing the level-0 patch code \(compute, spin\)", removed.reason), removed.reason
    assert function_bytes(patient.pid, threads_project.binary, "spin") == patched_spin
    assert map_count(patient.pid) == maps_patched
    patient.wait_for(lambda line: f"value={value + 1} " in line)


def test_leftover_of_an_interrupted_run_is_replaced(nonpie, start):
    patient = start(nonpie)
    patch = str(nonpie.patch_of(nonpie.binary))
    maps_before = map_count(patient.pid)
    original = function_bytes(patient.pid, nonpie.binary, "report")
    assert only(only(operations.patch_processes(patch, [patient.pid])).objects).action == "applied"
    # Simulate a tool killed after mapping the patch but before writing the jumps.
    applied = engine.read_patient(patient.pid).applied[build_id_of(nonpie.binary)]
    with StoppedProcess(patient.pid) as stopped:
        stopped.write(applied.entries[0].daddr, applied.undo[0])
    patient.wait_for(lambda line: line.startswith("nonpie UNPATCHED"))
    info = only(operations.info_processes([patient.pid]))
    assert next(o for o in info.objects if o.path == str(nonpie.binary)).applied_level is None
    obj = only(only(operations.patch_processes(patch, [patient.pid])).objects)
    assert obj.action == "applied" and "incomplete" in obj.reason, obj.reason
    patient.wait_for(lambda line: line.startswith("nonpie PATCHED"))
    assert map_count(patient.pid) == maps_before + VMAS_PER_PATCH
    assert only(only(operations.unpatch_processes([patient.pid])).objects).action == "removed"
    assert function_bytes(patient.pid, nonpie.binary, "report") == original
    assert map_count(patient.pid) == maps_before


def test_process_exiting_mid_run_is_a_failed_result(nonpie):
    patch = str(nonpie.patch_of(nonpie.binary))
    process = subprocess.Popen([str(nonpie.binary), "4"], stdout=subprocess.DEVNULL)
    outcomes = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for results in (operations.patch_processes(patch, [process.pid]), operations.unpatch_processes([process.pid]),
                        operations.info_processes([process.pid])):
            result = only(results)
            reason = getattr(result, "error", "") or getattr(result, "unpatchable", "")
            reason = reason or " ".join(o.reason for o in result.objects if getattr(o, "action", "") == "failed")
            outcomes.add("gone" if reason else "ok")
            if reason:
                assert re.search(r"exit|does not exist|no address space|gone|still starting", reason), reason
        if "gone" in outcomes and process.poll() is not None:
            break
    process.wait(timeout=5)
    assert "gone" in outcomes


def test_process_of_another_user(nonpie, tmp_path):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    binary = tmp_path / "nonpie-copy"
    shutil.copy(nonpie.binary, binary)
    os.chmod(tmp_path, 0o755)
    process = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(binary)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("nonpie UNPATCHED")
        assert os.stat(f"/proc/{process.pid}").st_uid != 0
        result = only(operations.patch_processes(str(nonpie.patch_of(nonpie.binary)), [process.pid]))
        assert only(result.objects).action == "applied", result
        for _ in range(50):
            if process.stdout.readline().startswith("nonpie PATCHED"):
                break
        else:
            raise AssertionError("the other user's process was not patched")
        assert only(only(operations.unpatch_processes([process.pid])).objects).action == "removed"
    finally:
        process.kill()
        process.wait()


def test_deleted_executable_and_library(libdemo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(libdemo.binary.parent.parent, copy)
    process = subprocess.Popen([str(copy / "bin" / "demo")], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "LD_LIBRARY_PATH": str(copy / "lib")})
    try:
        assert "UNPATCHED" in process.stdout.readline()
        shutil.rmtree(copy)                    # both files are gone: only the mappings remain
        result = only(operations.patch_processes(str(libdemo.patches_dir), [process.pid]))
        assert [o.action for o in result.objects] == ["applied", "applied"], result
        lines = [process.stdout.readline() for _ in range(6)]
        assert any(line.startswith("libdemo PATCHED") for line in lines), lines
        assert any(line.startswith("demo PATCHED") for line in lines), lines
    finally:
        process.kill()
        process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_errors_are_one_line_and_leave_the_patient_alone(libdemo, nonpie, start, tmp_path):
    patient = start(libdemo)
    maps_before = map_count(patient.pid)
    good = libdemo.patch_of(libdemo.binary).read_bytes()
    truncated = tmp_path / "truncated.kpatch"
    truncated.write_bytes(good[:1000])
    noise = tmp_path / "random.kpatch"
    noise.write_bytes(random.Random(7).randbytes(4096))
    cases = [
        (["patch", "-p", str(patient.pid), str(nonpie.patch_of(nonpie.binary))], "has build-id"),
        (["patch", "-p", str(_dead_pid()), str(libdemo.patch_of(libdemo.binary))], "does not exist"),
        (["patch", "-p", str(patient.pid), str(truncated)], "has no SHA256SUMS"),
        (["patch", "--no-verify", "-p", str(patient.pid), str(truncated)], "truncated"),
        (["patch", "--no-verify", "-p", str(patient.pid), str(noise)], "not a patch file"),
        (["patch", "-p", str(patient.pid), str(tmp_path / "missing")], "does not exist"),
        (["unpatch", "-p", str(_dead_pid())], "does not exist"),
    ]
    for argv, expected in cases:
        result = ctl(*argv)
        assert result.returncode != 0, argv
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (argv, result.stderr)
    patient.wait_for(lambda line: line.startswith("demo UNPATCHED"))
    assert map_count(patient.pid) == maps_before


def test_all_processes_and_selection(nonpie, start):
    patient = start(nonpie)
    other = start(nonpie)
    assert operations.select_pids() is None
    assert operations.select_pids(exe=str(nonpie.binary)) == sorted([patient.pid, other.pid])
    assert operations.select_pids(pids=[patient.pid, other.pid], name="^nonpie$") == sorted([patient.pid, other.pid])
    assert operations.select_pids(pid=patient.pid, name="no-such-name") == []

    results = operations.patch_processes(str(nonpie.patch_of(nonpie.binary)))
    assert sorted(r.pid for r in results) == sorted([patient.pid, other.pid])
    assert all(r.ok for r in results)
    patient.wait_for(lambda line: line.startswith("nonpie PATCHED"))
    result = ctl("unpatch", "-p", "all", build_id_of(nonpie.binary))
    assert result.returncode == 0, result.stderr
    other.wait_for(lambda line: line.startswith("nonpie UNPATCHED"))


def test_info_without_store(libdemo, start):
    patient = start(libdemo)
    result = ctl("info", "-p", str(patient.pid), "-s", "")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^libc.so.6 buildid=[0-9a-f]{40}$", result.stdout, re.M)
    default = ctl("info", "-p", str(patient.pid))          # the default store may not exist
    assert default.returncode == 0 and "libdemo.so buildid=" in default.stdout, default.stderr
    assert ctl("info", "-p", str(_dead_pid())).returncode == 1


@pytest.mark.parametrize("command", ["patch-user", "unpatch-user", "info-user"])
def test_aliases(command):
    assert ctl(command, "--help").returncode == 0
