"""The result types: object actions are an enum whose JSON and text are the plain strings."""

import json
import pickle

import pytest

from plugins.module_utils.careengine.results import (
    ACTIONS,
    ObjectAction,
    ObjectResult,
    ProcessResult,
    summarize_results,
)


def result(action, **extra) -> ObjectResult:
    return ObjectResult(path="/usr/lib/libdemo.so", build_id="ab12", action=action, **extra)


def test_actions_are_the_strings_the_json_and_modules_document():
    assert ACTIONS == ("applied", "skipped", "removed", "failed")
    assert [action.value for action in ObjectAction] == list(ACTIONS)


@pytest.mark.parametrize("action", list(ObjectAction))
def test_json_output_holds_the_plain_string(action):
    data = result(action, applied_level=1).to_json()
    assert type(data["action"]) is str and data["action"] == action.value
    assert json.loads(json.dumps(data))["action"] == action.value
    assert f"{action}" == str(action) == action.value


def test_a_plain_string_becomes_the_enum_and_an_unknown_one_is_refused():
    assert result("removed").action is ObjectAction.REMOVED
    with pytest.raises(ValueError):
        result("patched")


def test_summary_counts_by_plain_string_and_a_failed_process_counts_once():
    processes = [
        ProcessResult(pid=1, comm="a", objects=(result(ObjectAction.APPLIED), result("skipped"))),
        ProcessResult(pid=2, comm="b", error="gone"),
        ProcessResult(pid=3, comm="c", objects=(result(ObjectAction.FAILED),)),
    ]
    counts = summarize_results(processes)
    assert counts == {"applied": 1, "skipped": 1, "removed": 0, "failed": 2}
    assert all(type(key) is str for key in counts)
    assert [p.ok for p in processes] == [True, False, False]


def test_a_result_survives_the_fleet_workers_pickle():
    original = result(ObjectAction.APPLIED, applied_level=2, functions=("f",))
    copy = pickle.loads(pickle.dumps(original, protocol=pickle.HIGHEST_PROTOCOL))
    assert copy == original and copy.action is ObjectAction.APPLIED
