"""A small patient with a real patch, and what the security tests read from it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apply"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "process"))

from apply_helpers import Built, Patient  # noqa: E402
from waiting import eventually  # noqa: E402

ANSWER_SOURCE = r"""#include <stdio.h>
#include <unistd.h>

__attribute__((noinline, noipa)) int answer(void)
{
	return 1;
}

int main(void)
{
	for (;;) {
		printf("answer=%d\n", answer());
		fflush(stdout);
		usleep(10000);
	}
	return 0;
}
"""
ANSWER_FIX = (("return 1;", "return 2;"),)


def answers(patient: Patient, value: int) -> bool:
    """The patient prints ``answer=value`` after this call (polled)."""
    mark = len(patient.lines)
    return eventually(lambda: f"answer={value}" in patient.lines[mark:], timeout=20)


def flat_store(answer: Built, where: Path) -> Path:
    """A root-owned 0755 copy of the patch and its SHA256SUMS (as libcare-patch-make wrote them)."""
    store = where / "store"
    shutil.copytree(answer.patches_dir, store)
    os.chmod(store, 0o755)
    return store


def audit_lines(path: Path) -> list[dict]:
    """The records of the audit log at ``path`` (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
