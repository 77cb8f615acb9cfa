"""Fixtures of the security tests: the answer program built with its patch, one patient per test.

The apply tests' helpers (real builds with libcare-patch-make, patients) and the polling
helper are shared from their folders.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apply"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "process"))

import pytest  # noqa: E402
from apply_helpers import Built, Patient, single_program_project  # noqa: E402
from security_helpers import ANSWER_FIX, ANSWER_SOURCE  # noqa: E402


@pytest.fixture(scope="session")
def answer(tmp_path_factory) -> Built:
    return single_program_project(tmp_path_factory, "answer", ANSWER_SOURCE, ANSWER_FIX)


@pytest.fixture
def patient(answer):
    started = Patient([str(answer.binary)])
    started.wait_for(lambda line: line == "answer=1", timeout=30, after=0)
    yield started
    started.stop()
