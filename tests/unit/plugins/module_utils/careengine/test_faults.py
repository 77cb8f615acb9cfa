"""The fault-injection switch: its syntax, and that it is off unless the variable is set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.module_utils.careengine import faults

ROOT = Path(__file__).resolve().parents[5]


@pytest.mark.parametrize(("text", "expected"), [
    ("before:mmap", faults.FaultSpec("before", "mmap", 1, "tool")),
    ("after:jump:2", faults.FaultSpec("after", "jump", 2, "tool")),
    ("at:syscall-exit:3:patient", faults.FaultSpec("at", "syscall-exit", 3, "patient")),
    ("after:resume::patient", faults.FaultSpec("after", "resume", 1, "patient")),
])
def test_parse(text, expected):
    assert faults.parse(text) == expected


@pytest.mark.parametrize("text", ["mmap", "before:nothing", "at:mmap", "before:borrow", "during:mmap",
                                  "after:jump:0", "after:jump:1:everyone", "a:b:1:tool:x"])
def test_parse_refuses_unknown_points(text):
    with pytest.raises(ValueError, match="LIBCARE_FAULT_INJECT"):
        faults.parse(text)


def run_steps(fault: str | None) -> subprocess.CompletedProcess:
    """A child that passes through steps mmap and jump (twice) and says where it got."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from plugins.module_utils.careengine import faults\n"
            "with faults.step('mmap'):\n    print('in mmap', flush=True)\n"
            "for n in (1, 2):\n    with faults.step('jump'):\n        print('jump', n, flush=True)\n"
            "print('end', flush=True)\n")
    env = {key: value for key, value in os.environ.items() if key != faults.ENVIRONMENT_VARIABLE}
    if fault:
        env[faults.ENVIRONMENT_VARIABLE] = fault
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)


@pytest.mark.parametrize(("fault", "printed"), [
    (None, ["in mmap", "jump 1", "jump 2", "end"]),
    ("before:mmap", []),
    ("after:mmap", ["in mmap"]),
    ("before:jump:2", ["in mmap", "jump 1"]),
    ("after:jump:2", ["in mmap", "jump 1", "jump 2"]),
])
def test_the_tool_kills_itself_exactly_there(fault, printed):
    result = run_steps(fault)
    assert result.stdout.splitlines() == printed
    assert result.returncode == (0 if fault is None else -9)


def test_steps_and_instants_are_distinct_names():
    assert not set(faults.STEPS) & set(faults.INSTANTS)
    assert len(set(faults.STEPS)) == len(faults.STEPS)
