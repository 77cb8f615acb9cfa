"""The three stops of a patch (prepare with one thread held, switch with every thread
stopped, clean up with one thread held) when another run acts between them."""

from __future__ import annotations

import pytest
from apply_helpers import map_count

from plugins.module_utils.careengine.apply import engine
from plugins.module_utils.careengine.errors import ProcessError
from plugins.module_utils.careengine.process import StoppedProcess
from plugins.module_utils.careengine.process.tracer import StoppedThread
from plugins.module_utils.careengine.storage import PatchSource


def plans_for(pid: int, store) -> tuple[engine.Patient, list[engine.ObjectPlan]]:
    patient = engine.read_patient(pid)
    matches = engine.match_patches(patient, PatchSource(str(store), verify=False), None)
    plans = [engine._plan_or_result(patient, mapped, patch, []) for mapped, patch in matches]
    assert plans and all(isinstance(plan, engine.ObjectPlan) for plan in plans), plans
    return patient, plans


def test_a_prepared_mapping_removed_before_the_switch_gets_no_jumps(libdemo, start):
    """Another run takes the prepared mappings (no jumps yet) for leftovers and removes
    them between the stops: the switch refuses, writes nothing, unmaps nothing more."""
    patient = start(libdemo)
    maps_before = map_count(patient.pid)
    state, plans = plans_for(patient.pid, libdemo.patches_dir)
    journal = engine._prepare_patches(patient.pid, state, plans, 5.0)
    assert map_count(patient.pid) > maps_before and journal.mappings
    assert state.thread_ns > 0
    removed = engine.unpatch_process(patient.pid)           # the other run
    assert [o.action for o in removed.objects] == ["removed", "removed"], removed
    assert map_count(patient.pid) == maps_before
    with pytest.raises(ProcessError, match="removed before the switch"):
        engine._switch_stop(StoppedProcess(patient.pid), state, plans, 5.0, journal)
    assert not journal.mappings and not journal.writes
    assert map_count(patient.pid) == maps_before
    patient.wait_for(lambda line: line.startswith("demo UNPATCHED"))
    patient.wait_for(lambda line: line.startswith("libdemo UNPATCHED"))


def test_a_mapping_functions_jump_to_is_never_unmapped(libdemo, start):
    """The clean-up step unmaps a mapping only while no function jumps to it."""
    patient = start(libdemo)
    result = engine.patch_process(patient.pid, PatchSource(str(libdemo.patches_dir), verify=False))
    assert [o.action for o in result.objects] == ["applied", "applied"], result
    assert result.thread_us is not None and result.thread_us > 0
    applied = list(engine.read_patient(patient.pid).applied.values())
    with StoppedThread(patient.pid) as worker:
        for patch in applied:
            with pytest.raises(ProcessError, match="jump to the level-0 patch"):
                engine.check_unreferenced(worker, patch)
    removed = engine.unpatch_process(patient.pid)
    assert [o.action for o in removed.objects] == ["removed", "removed"], removed
    patient.wait_for(lambda line: line.startswith("libdemo UNPATCHED"))
