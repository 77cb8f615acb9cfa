"""The crash-safety helpers and fixtures: a real multi-threaded patient and its real patches (two levels).

The patient is ``crash_patient.c``; libcare-patch-make builds it and two cumulative fixes:
level 1 changes both behaviour() (through strlen, an IFUNC: its resolver runs in the
patient) and label(); level 2 changes behaviour() only, so a replacement moves one
function from level 1 to level 2 and gives the other its original code back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apply"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "process"))
from apply_helpers import CTL, Patient, build_id_of, make_diff, patch_make, single_program_project  # noqa: E402
from waiting import eventually  # noqa: E402, F401 - for the tests

from plugins.module_utils.careengine import patchfile  # noqa: E402
from plugins.module_utils.careengine.storage import PatchStore  # noqa: E402

SOURCE = (Path(__file__).parent / "crash_patient.c").read_text()
NAME = "crash_patient"
LEVEL1_FIX = (("return x + 1 + extra;", 'const char *volatile text = "ab";\n\n\treturn x + (int)strlen(text) + extra;'),
              ('return "old";', 'return "new";'))
LEVEL2_FIX = (("return x + 1 + extra;", 'const char *volatile text = "abc";\n\n\treturn x + (int)strlen(text) + extra;'),)
# What each level makes the patient print: (behaviour(1), label()).
BEHAVIOUR = {0: (2, "old"), 1: (3, "new"), 2: (4, "old")}
FUNCTIONS = ("behaviour", "label")
ROUND = re.compile(r"round=(\d+) value=(\d+) label=(\w+) bad=(\d+) avxbad=(\d+) avx=(\d+) busy=(\d+) naps=(\d+)")


@dataclass(frozen=True)
class CrashBuild:
    """The patient's binary, its store (levels 1 and 2) and facts about the original code."""

    binary: Path
    store: Path
    build_id: str
    original_code: dict[str, bytes]      # function -> its first bytes in the file
    function_vaddr: dict[str, int]


def _code_of(binary: Path) -> tuple[dict[str, int], dict[str, bytes]]:
    with open(binary, "rb") as stream:
        elf = ELFFile(stream)
        symbols = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()
                   if s.name in FUNCTIONS}
        code = {}
        for name, vaddr in symbols.items():
            segment = next(seg for seg in elf.iter_segments()
                           if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"])
            stream.seek(vaddr - segment["p_vaddr"] + segment["p_offset"])
            code[name] = stream.read(16)
    return symbols, code


@pytest.fixture(scope="session")
def crash_build(tmp_path_factory) -> CrashBuild:
    built = single_program_project(tmp_path_factory, NAME, SOURCE, LEVEL1_FIX)
    make_diff(built.root, f"{NAME}.c", LEVEL2_FIX, "level2.patch")
    build_id = build_id_of(built.binary)
    level2 = patch_make(built.root, "level2.patch")[1][build_id]
    store = tmp_path_factory.mktemp("crashstore")
    PatchStore(str(store)).install(patchfile.load_patch(str(built.patches[build_id])), 1)
    PatchStore(str(store)).install(patchfile.load_patch(str(level2)), 2)
    symbols, code = _code_of(built.binary)
    return CrashBuild(built.binary, store, build_id, code, symbols)


class CrashPatient(Patient):
    """A running crash_patient: its output lines, thread ids, and a pipe to its reader thread."""

    def __init__(self, binary: Path) -> None:
        super().__init__([str(binary)], stdin=subprocess.PIPE)
        self.tids = {role: int(self.wait_for(lambda line, r=role: line.startswith(r + " "), after=0).split()[1])
                     for role in ("avx", "busy", "reader", "sleeper")}
        self.wait_for(lambda line: line.startswith("round="), after=0)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10.0, after: int | None = None) -> str:
        return super().wait_for(predicate, timeout, after)

    def rounds(self, count: int, timeout: float = 10.0) -> list[re.Match]:
        """The next ``count`` status lines, parsed."""
        start = len(self.lines)
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in map(ROUND.match, self.lines[start:]) if m]
            if len(found) >= count:
                return found[:count]
            if self.process.poll() is not None:
                raise AssertionError(f"patient exited with {self.process.returncode}: {self.lines[-5:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} status lines within {timeout}s: {self.lines[-5:]}")
            time.sleep(0.002)

    def echo(self, text: str) -> None:
        """The reader thread, blocked in read(2) all along, reads ``text`` and prints it back."""
        start = len(self.lines)
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        self.wait_for(lambda line: line == f"read {text}", after=start)


@pytest.fixture
def start_patient(crash_build):
    started: list[CrashPatient] = []

    def _start() -> CrashPatient:
        patient = CrashPatient(crash_build.binary)
        started.append(patient)
        return patient

    yield _start
    for patient in started:
        patient.stop()


def ctl(*args: str, fault: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """libcare-ctl with ``args``; ``fault``: the LIBCARE_FAULT_INJECT value."""
    env = dict(os.environ)
    env.pop("LIBCARE_FAULT_INJECT", None)
    if fault:
        env["LIBCARE_FAULT_INJECT"] = fault
    return subprocess.run([CTL, *args], capture_output=True, text=True, check=False, timeout=timeout, env=env)
