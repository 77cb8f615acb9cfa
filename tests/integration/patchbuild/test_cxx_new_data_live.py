"""New C++ data in a live patch (fixture ``cxxdata``): a patched function that gains a
zero-initialised function-local static, a guarded static set by its first call, a 32-byte
aligned buffer, new string literals and std::to_string (new to the unit, with its
read-only COMDAT digit table) is patched live; each patch brings its own zeroed copies, so the guard
runs again after an unpatch and a new patch; the process exits cleanly afterwards. Data
the patch cannot bring is refused by libcare-patch-make naming the object, the tree
restored."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "apply"))
from apply_helpers import FIXTURES, Patient, ctl, make_diff  # noqa: E402

PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
PATCHED_RE = re.compile(r"^cxxdata PATCHED (\d+) calls=(\d+) since=(\d+) last=(\d*) rounds=(\d+)$")
UNPATCHED_RE = re.compile(r"^cxxdata UNPATCHED (\d+) rounds=(\d+)$")
DIGITS = "_ZZNSt8__detail18__to_chars_10_implIjEEvPcjT_E8__digits"
GREETING = 'std::string text = std::string("UNPATCHED ") + number;'


def _project(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / "cxxdata", tmp_path / "cxxdata"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    project = _project(tmp_path_factory.mktemp("cxxdata"))
    result = subprocess.run([PATCH_MAKE, "fix.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "replaces greeting[abi:cxx11](int)" in result.stdout
    # std::to_string is new to the unit: its digit table (read-only COMDAT data) is the patch's own
    assert DIGITS not in (project / ".kpatch_greet.original.s").read_text()
    assert re.search(rf"\.kpatch\.data[^\n]*\n(?:[^\n]*\n){{0,8}}{DIGITS}:", (project / ".kpatch_greet.s").read_text())
    return project


def _patched_lines(patient: Patient, start: int, count: int) -> list[tuple[int, int, int, str]]:
    """(round, calls, since, last) of ``count`` patched lines printed after line ``start``."""
    patient.wait_for(lambda _line: sum(1 for line in patient.lines[start:] if PATCHED_RE.match(line)) >= count,
                     timeout=20, after=start)
    found = [PATCHED_RE.match(line) for line in patient.lines[start:]]
    return [(int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)) for m in found if m][:count]


def _assert_fresh_statics(lines: list[tuple[int, int, int, str]]) -> None:
    """The first patched call set ``since`` to its round; ``calls`` counts from 1; the
    64-byte ``last`` starts empty (zeroed), then holds the round before."""
    first_round = lines[0][0]
    rounds = list(range(first_round, first_round + len(lines)))
    assert [number for number, _, _, _ in lines] == rounds, lines
    assert [calls for _, calls, _, _ in lines] == list(range(1, len(lines) + 1)), lines
    assert {since for _, _, since, _ in lines} == {first_round}, lines
    assert [last for _, _, _, last in lines] == [""] + [str(number) for number in rounds[:-1]], lines


def test_new_function_local_statics_and_literals_are_patched_live(built):
    patient = Patient([str(built / "lpmake" / "usr" / "local" / "bin" / "cxxdata")])
    try:
        patient.wait_for(lambda line: UNPATCHED_RE.match(line) is not None, timeout=10, after=0)
        applied = ctl("patch", "-p", str(patient.pid), str(built / "patchroot"))
        assert applied.returncode == 0, applied.stderr
        _assert_fresh_statics(_patched_lines(patient, 0, 5))

        removed = ctl("unpatch", "-p", str(patient.pid))
        assert removed.returncode == 0, removed.stderr
        patient.wait_for(lambda line: UNPATCHED_RE.match(line) is not None, timeout=10)

        # A new patch maps new data: zero again, so the guard runs again at its first call.
        seen = len(patient.lines)
        again = ctl("patch", "-p", str(patient.pid), str(built / "patchroot"))
        assert again.returncode == 0, again.stderr
        second = _patched_lines(patient, seen, 4)
        _assert_fresh_statics(second)
        assert second[0][0] > 5

        removed = ctl("unpatch", "-p", str(patient.pid))
        assert removed.returncode == 0, removed.stderr
        patient.wait_for(lambda line: UNPATCHED_RE.match(line) is not None, timeout=10)
        # Exit handlers run over nothing the unpatch took away.
        patient.process.send_signal(signal.SIGTERM)
        assert patient.process.wait(timeout=10) == 0, patient.lines[-3:]
    finally:
        patient.stop()


@pytest.mark.parametrize("old, new, refusal", [
    (GREETING, 'static const std::string prefix = "PATCHED ";\n\tstd::string text = prefix + std::to_string(round);',
     r"greet\.cc: greeting\[abi:cxx11\]\(int\)::prefix has a destructor registered at exit \(__cxa_atexit\)"),
    ("static Tally *tally;", 'static Tally *tally;\nstd::string motto = "patched";',
     r"greet\.cc: motto\[abi:cxx11\] has a dynamic initialiser: it would run in the unit's start-up code"),
])
def test_data_the_patch_cannot_bring_is_refused_by_name(tmp_path, old, new, refusal):
    project = _project(tmp_path)
    make_diff(project, "greet.cc", ((old, new),), "data.patch")
    before = {path.name: path.read_bytes() for path in project.iterdir() if path.is_file()}
    result = subprocess.run([PATCH_MAKE, "data.patch"], cwd=project, capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stdout
    assert re.search(refusal, result.stderr), result.stderr
    assert "reverting the patches" in result.stderr
    assert {name: (project / name).read_bytes() for name in before} == before
    assert not list(project.glob("patchroot/*.kpatch"))
