"""Kill libcare-ctl (SIGKILL, from the fault-injection switch) before and after every named
step of patch, unpatch and level replacement, and at every instant of a remote syscall or
call; then: the patient lives, behaves wholly as before or after (function by function
while the jumps are being written), has no signal pending, is not traced, keeps its AVX
registers, signal mask, blocked read() and nanosleep(); ``info`` tells the true state;
the next patch or unpatch finishes the job and unpatch gives back the exact original bytes.
Also the patient killed at a step: a clear failure, never "applied". And fleet mode.
"""

from __future__ import annotations

import os
import signal

import pytest
from crash_helpers import BEHAVIOUR, FUNCTIONS, ROUND, CrashPatient, ctl, eventually

from plugins.module_utils.careengine import faults
from plugins.module_utils.careengine.apply import engine
from plugins.module_utils.careengine.process import find_applied_patches, read_maps
from plugins.module_utils.careengine.storage import PatchSource

KILLED = (-signal.SIGKILL, 128 + signal.SIGKILL)

# (operation, level before, level after): the patient's levels around the killed command.
OPERATIONS = {"patch": (0, 1), "unpatch": (1, 0), "replace": (1, 2)}
# Steps in the order the engine runs them (faults.STEPS).
PATCH_STEPS = ("mmap", "write-image", "mprotect", "resolve-ifunc", "stop", "safety-check", "jump", "jump:2",
               "resume")
UNPATCH_STEPS = ("stop", "safety-check", "restore-bytes", "restore-bytes:2", "resume", "unmap")
REPLACE_STEPS = ("mmap", "write-image", "mprotect", "resolve-ifunc", "stop", "safety-check", "jump",
                 "restore-bytes", "resume", "unmap-old")
# Instants inside remote syscalls/calls, with the occurrence (patch: mmap, mprotect; call: the resolver).
INSTANTS = {
    "patch": ("borrow", "borrow:2", "syscall-entry", "syscall-exit", "syscall-exit:2", "give-back",
              "give-back:3", "call-return"),
    "unpatch": ("borrow", "syscall-entry", "syscall-exit", "give-back"),
    "replace": ("borrow", "syscall-entry", "syscall-exit", "give-back", "call-return", "syscall-entry:3"),
}
STEPS = {"patch": PATCH_STEPS, "unpatch": UNPATCH_STEPS, "replace": REPLACE_STEPS}


def _cases():
    for operation, steps in STEPS.items():
        for step in steps:
            for when in ("before", "after"):
                yield pytest.param(operation, f"{when}:{step}", id=f"{operation}-{when}:{step}")
        for instant in INSTANTS[operation]:
            yield pytest.param(operation, f"at:{instant}", id=f"{operation}-at:{instant}")


def test_every_step_of_the_engine_is_injected():
    named = {step.split(":")[0] for steps in STEPS.values() for step in steps}
    assert named == set(faults.STEPS)
    assert {i.split(":")[0] for instants in INSTANTS.values() for i in instants} == set(faults.INSTANTS)


def command(operation: str, store, pid: str) -> list[str]:
    if operation == "unpatch":
        return ["unpatch", "-p", pid]
    level = "1" if operation == "patch" else "2"
    return ["patch", "-p", pid, "--level", level, "--no-verify", str(store)]


def set_level(patient: CrashPatient, store, level: int) -> None:
    """Bring the patient to ``level`` in this process (the engine libcare-ctl runs; faster
    than a command on a loaded machine): patch, or unpatch for level 0."""
    if level:
        result = engine.patch_process(patient.pid, PatchSource(str(store), verify=False), level=level)
        assert [o.action for o in result.objects] in (["applied"], ["skipped"]), result
        assert result.objects[0].applied_level == level, result
    else:
        result = engine.unpatch_process(patient.pid)
        assert all(o.action == "removed" for o in result.objects), result
    # A round computed (or read by our reader thread) before the change can still come in:
    # wait for the first round of the new behaviour; check_healthy then sees it hold.
    value, label = BEHAVIOUR[level]
    patient.wait_for(lambda line: (match := ROUND.match(line)) is not None
                     and int(match[2]) == value and match[3] == label)


def proc_status(pid: int, tid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/task/{tid}/status") as stream:
        return dict(line.split(":\t", 1) for line in stream.read().splitlines() if ":\t" in line)


def threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


def signal_masks(pid: int) -> dict[int, str]:
    """Each thread's blocked-signal mask (the AVX thread blocks SIGUSR2, the others nothing)."""
    return {tid: proc_status(pid, tid)["SigBlk"].strip() for tid in threads(pid)}


def check_healthy(patient: CrashPatient, levels: tuple[int, int], masks: dict[int, str]) -> tuple[int, str]:
    """Everything a killed tool must leave intact; the (value, label) the patient shows."""
    assert patient.alive()
    for tid in threads(patient.pid):
        status = proc_status(patient.pid, tid)
        assert status["TracerPid"].strip() == "0", f"thread {tid} still traced"
        assert int(status["SigPnd"], 16) == 0, f"thread {tid}: signal pending {status['SigPnd']}"
        assert int(status["ShdPnd"], 16) == 0, f"shared signal pending {status['ShdPnd']}"
    # A thread released by a dead tracer first finishes our syscall, then rt_sigreturn
    # restores its mask: when it next gets a CPU (later on a loaded machine).
    assert eventually(lambda: signal_masks(patient.pid) == masks), (signal_masks(patient.pid), masks)
    allowed_values = {BEHAVIOUR[level][0] for level in levels}
    allowed_labels = {BEHAVIOUR[level][1] for level in levels}
    for line in patient.rounds(3):
        assert int(line[2]) in allowed_values and line[3] in allowed_labels, line.group(0)
        assert line[4] == "0" and line[5] == "0", f"wrong values seen by a busy or the AVX thread: {line.group(0)}"
    first = patient.rounds(1)[0]

    def all_progressed(text: str) -> bool:    # AVX, busy and sleeping threads all run on
        line = ROUND.match(text)
        return bool(line) and int(line[6]) > int(first[6]) and int(line[7]) > int(first[7]) \
            and int(line[8]) >= int(first[8]) + 2

    patient.wait_for(all_progressed)
    patient.echo("ping")
    final = patient.rounds(1)[0]
    return int(final[2]), final[3]


def info_of(patient: CrashPatient, store) -> tuple[int, str]:
    """(level in force, interrupted runs) as ``info`` reports them for the patient's binary."""
    report = engine.info_process(patient.pid, PatchSource(str(store), verify=False))
    shown = next(o for o in report.objects if o.path.endswith("/crash_patient"))
    return shown.applied_level or 0, shown.interrupted


def check_info_tells_the_truth(patient, store, shown: tuple[int, str], levels: tuple[int, int]) -> None:
    level, interrupted = info_of(patient, store)
    matching = [candidate for candidate in levels if BEHAVIOUR[candidate] == shown]
    if matching:
        assert level == matching[0], f"behaves as level {matching[0]}, info says {level} ({interrupted})"
    else:                       # killed between two jumps: function by function
        assert interrupted and level == 0, (level, interrupted)


def check_original_code(patient: CrashPatient, crash_build) -> None:
    maps = read_maps(patient.pid)
    assert not find_applied_patches(patient.pid, maps), "a patch mapping is left"
    base = min(m.start - m.offset for m in maps if m.path == str(crash_build.binary))
    with open(f"/proc/{patient.pid}/mem", "rb") as mem:
        for name in FUNCTIONS:
            mem.seek(base + crash_build.function_vaddr[name])
            assert mem.read(16) == crash_build.original_code[name], f"{name} is not its original code"


@pytest.mark.parametrize(("operation", "fault"), list(_cases()))
def test_tool_killed(operation, fault, crash_build, start_patient):
    before, after = OPERATIONS[operation]
    patient = start_patient()
    masks = signal_masks(patient.pid)
    set_level(patient, crash_build.store, before)

    killed = ctl(*command(operation, crash_build.store, str(patient.pid)), fault=fault)
    assert killed.returncode in KILLED, f"not killed at {fault}: {killed.returncode} {killed.stdout}{killed.stderr}"

    shown = check_healthy(patient, (before, after), masks)
    check_info_tells_the_truth(patient, crash_build.store, shown, (before, after))

    set_level(patient, crash_build.store, after)              # the next patch or unpatch finishes the job
    assert check_healthy(patient, (after,), masks) == BEHAVIOUR[after]
    assert info_of(patient, crash_build.store) == (after, "")
    if after:
        set_level(patient, crash_build.store, 0)
        assert check_healthy(patient, (0,), masks) == BEHAVIOUR[0]
    check_original_code(patient, crash_build)


def test_info_command_shows_an_interrupted_run(crash_build, start_patient):
    """The state ``info`` prints after the tool was killed between the two jumps."""
    patient = start_patient()
    killed = ctl(*command("patch", crash_build.store, str(patient.pid)), fault="after:jump")
    assert killed.returncode in KILLED, killed.stdout + killed.stderr
    result = ctl("info", "-p", str(patient.pid), "-s", str(crash_build.store))
    line = next(line for line in result.stdout.splitlines() if line.startswith("crash_patient "))
    assert "interrupted=level1:1/2" in line and "patchlvl=" not in line, line
    finished = ctl(*command("patch", crash_build.store, str(patient.pid)))
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "interrupted=" not in ctl("info", "-p", str(patient.pid), "-s", str(crash_build.store)).stdout



def test_a_prepared_mapping_without_jumps_is_reported_and_finished(crash_build, start_patient):
    """Killed between the one-thread preparation and the all-threads stop: the patch mapping
    is complete but nothing jumps to it; info says so, the original code runs, and the next
    patch replaces it (the next unpatch would remove it)."""
    patient = start_patient()
    killed = ctl(*command("patch", crash_build.store, str(patient.pid)), fault="before:stop")
    assert killed.returncode in KILLED, killed.stdout + killed.stderr
    assert len(find_applied_patches(patient.pid, read_maps(patient.pid))) == 1
    result = ctl("info", "-p", str(patient.pid), "-s", str(crash_build.store))
    line = next(line for line in result.stdout.splitlines() if line.startswith("crash_patient "))
    assert "interrupted=level1:0/2" in line and "patchlvl=" not in line, line
    finished = ctl(*command("patch", crash_build.store, str(patient.pid)))
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert len(find_applied_patches(patient.pid, read_maps(patient.pid))) == 1
    assert info_of(patient, crash_build.store) == (1, "")
    set_level(patient, crash_build.store, 0)
    check_original_code(patient, crash_build)

# The patient killed right after every step of each operation, and at the first instant of
# each kind in a remote syscall or call.
PATIENT_KILLS = {
    operation: tuple(f"after:{step}" for step in STEPS[operation])
    + tuple(f"at:{instant}" for instant in INSTANTS[operation] if ":" not in instant)
    for operation in STEPS
}


@pytest.mark.parametrize(("operation", "fault"),
                         [pytest.param(op, f, id=f"{op}-{f}") for op, faults_ in PATIENT_KILLS.items()
                          for f in faults_])
def test_patient_killed(operation, fault, crash_build, start_patient):
    before, _ = OPERATIONS[operation]
    patient = start_patient()
    set_level(patient, crash_build.store, before)
    victim = fault + (":1:patient" if fault.count(":") == 1 else ":patient")
    result = ctl(*command(operation, crash_build.store, str(patient.pid)), fault=victim)
    output = result.stdout + result.stderr
    assert patient.process.wait(timeout=10) == -signal.SIGKILL, "the switch did not kill the patient"
    assert result.returncode != 0, output
    assert "applied" not in output.replace("not applied", ""), output
    doing = "unpatching" if operation == "unpatch" else "patching"
    assert f"process {patient.pid} exited during {doing}; nothing was left in it" in output, output


def tools_running(store) -> list[int]:
    """libcare-ctl processes (a killed run's orphaned fleet workers) working on ``store``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as stream:
                    argv = stream.read().split(b"\0")
            except OSError:
                continue
            if str(store).encode() in argv and any(b"ctl" in arg for arg in argv):
                found.append(int(name))
    return found


# In fleet mode the parent patches the first process itself (warm-up), then forks workers
# that inherit its counts: a second occurrence is reached in a worker, which kills the
# parent, then itself; the other workers die on their broken pipes or finish their process.
FLEET_FAULTS = ("before:jump", "after:mmap:2", "at:syscall-exit:4", "after:jump:3")


@pytest.mark.parametrize("fault", FLEET_FAULTS)
def test_fleet_killed(fault, crash_build, start_patient):
    patients = [start_patient() for _ in range(4)]
    masks = [signal_masks(p.pid) for p in patients]
    killed = ctl("patch", "-p", "all", "--level", "1", "--no-verify", str(crash_build.store), fault=fault)
    assert killed.returncode in KILLED, f"not killed at {fault}: {killed.returncode} {killed.stdout}{killed.stderr}"
    assert eventually(lambda: not tools_running(crash_build.store), timeout=30), tools_running(crash_build.store)
    for patient, mask in zip(patients, masks, strict=True):
        shown = check_healthy(patient, (0, 1), mask)
        check_info_tells_the_truth(patient, crash_build.store, shown, (0, 1))
    finished = ctl("patch", "-p", "all", "--level", "1", "--no-verify", str(crash_build.store))
    assert finished.returncode == 0, finished.stdout + finished.stderr
    for patient, mask in zip(patients, masks, strict=True):
        assert check_healthy(patient, (1,), mask) == BEHAVIOUR[1]
        assert info_of(patient, crash_build.store) == (1, "")
        set_level(patient, crash_build.store, 0)
        check_original_code(patient, crash_build)
