"""A fix that brings new variables (an initialised static, a zeroed static local): the patch
carries them in .kpatch.data and the patched code keeps updating them in the patient.
W^X: the patch's code is mapped read + execute, its data on pages of their own read + write,
and no page of the patient is both writable and executable."""

from __future__ import annotations

import re

import pytest
from apply_helpers import Built, build_id_of, single_program_project

from plugins.module_utils.careengine.apply import engine, operations
from plugins.module_utils.careengine.process import read_maps

MAIN = r"""#include <stdio.h>
#include <unistd.h>

static int total;

__attribute__((noinline)) void step(int amount)
{
	total += amount;
	printf("counter UNPATCHED total=%d\n", total);
}

int main(void)
{
	for (;;) {
		step(1);
		fflush(stdout);
		usleep(5000);
	}
}
"""
FIX = (
    ("static int total;\n", "static int total;\nstatic long patched_calls = 100;\n"),
    ('\ttotal += amount;\n\tprintf("counter UNPATCHED total=%d\\n", total);',
     '\tstatic int odd_totals;\n\n\ttotal += amount;\n\tpatched_calls++;\n\tif (total % 2)\n\t\todd_totals++;\n'
     '\tprintf("counter PATCHED total=%d calls=%ld odd=%d\\n", total, patched_calls, odd_totals);'),
)


@pytest.fixture(scope="module")
def counter_project(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "counter", MAIN, FIX)


def test_new_variables_live_in_the_patch_and_stay_writable(counter_project, start):
    patient = start(counter_project)
    obj = only_object(operations.patch_processes(str(counter_project.patch_of(counter_project.binary)), [patient.pid]))
    assert obj.action == "applied", obj.reason
    first = patient.wait_for(lambda line: line.startswith("counter PATCHED"))
    later = patient.wait_for(lambda line: line.startswith("counter PATCHED"), after=patient.lines.index(first) + 5)
    values = [dict(re.findall(r"(\w+)=(\d+)", line)) for line in (first, later)]
    steps = int(values[1]["total"]) - int(values[0]["total"])
    assert steps > 0
    assert int(values[0]["calls"]) >= 101                                    # initialised to 100 by the patch
    assert int(values[1]["calls"]) - int(values[0]["calls"]) == steps       # and written by the new code
    assert 0 < int(values[1]["odd"]) - int(values[0]["odd"]) <= steps
    applied = engine.read_patient(patient.pid).applied[build_id_of(counter_project.binary)]
    maps = read_maps(patient.pid)
    code = next(m for m in maps if m.start == applied.mapping.start)
    data = next(m for m in maps if m.start == code.end)
    assert (code.perms, data.perms) == ("r-xp", "rw-p")
    assert data.size == applied.data_size > 0
    assert not [m for m in maps if m.writable and m.executable]
    assert only_object(operations.unpatch_processes([patient.pid])).action == "removed"
    patient.wait_for(lambda line: line.startswith("counter UNPATCHED"))


def only_object(results):
    (result,) = results
    (obj,) = result.objects
    return obj
