"""The CFI unwind on the real stack of a stopped process."""

from __future__ import annotations

from plugins.module_utils.careengine.apply import engine
from plugins.module_utils.careengine.apply.object_files import ObjectFile
from plugins.module_utils.careengine.apply.safety import (
    GuardedRange,
    ThreadState,
    find_busy_threads,
    make_rule_finder,
    stack_ranges,
    walk_frames,
)
from plugins.module_utils.careengine.process import StoppedProcess, read_ranges


def _function_range(built, patient_pid: int, name: str) -> GuardedRange:
    patient = engine.read_patient(patient_pid)
    mapped = next(o for o in patient.objects if o.path == str(built.binary))
    with open(built.binary, "rb") as stream:
        symbol = ObjectFile(str(built.binary), stream).lookup_local(name)
    return GuardedRange(mapped.load_bias + symbol.vaddr, symbol.size, name)


def test_unwind_from_libc_sleep_to_main(nonpie, start):
    patient_process = start(nonpie)
    main = _function_range(nonpie, patient_process.pid, "main")
    patient = engine.read_patient(patient_process.pid)
    for mapped in patient.objects:
        patient.file_of(mapped)
    rule_at = make_rule_finder(patient.objects, patient.files)
    with StoppedProcess(patient_process.pid) as stopped:
        regs = engine._registers(stopped, patient_process.pid)
        thread = ThreadState(patient_process.pid, regs)
        (base, size), = stack_ranges([thread], patient.mappings)
        stack, = read_ranges(patient_process.pid, [(base, size)])
        frames, complete = walk_frames(thread, stack, base, rule_at)
        busy = find_busy_threads(patient_process.pid, [thread], patient.mappings, [main], rule_at)
    assert complete, [hex(f.pc) for f in frames]
    assert any(main.holds_return_address(f.pc) for f in frames[1:])
    assert len(frames) >= 4                  # clock_nanosleep, usleep/nanosleep, main, libc start, _start
    assert [(b.function, b.how) for b in busy] == [("main", "returns into")]
    patient_process.wait_for(lambda line: line.startswith("nonpie UNPATCHED"))
