"""A real C++ project, its real fix, built and applied live.

TinyXML 2.6.2 from Debian 12's source package, with Debian's CVE-2023-34194 fix taken
out (``tests/realproject/tinyxml/prepare.sh``); ``libcare-patch-make --build-cmd
--install-cmd`` builds the fix as a live patch for ``libtinyxml.so.2.6.2``
(``build_patch.sh``): it replaces ``TiXmlDeclaration::Parse``, a C++ function with
cleanups, so its unwind records and exception table go along and are registered in the
patient's unwinder. A program using the pre-fix library aborts on ``<?xml `` (a
declaration ending after whitespace); patched live, the same process parses it, while it
keeps throwing and catching exceptions; unpatched, the old code is back.

Skipped only when the sources cannot be fetched (prepare.sh exit status 77).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from realproject_harness import ROOT, RealProject

sys.path.insert(0, str(ROOT / "tests" / "integration" / "apply"))
from apply_helpers import Patient, build_id_of, ctl  # noqa: E402

TINYXML = RealProject(
    package="tinyxml",
    scripts=ROOT / "tests" / "realproject" / "tinyxml",
    cache=Path(os.environ.get("LIBCARE_TINYXML_CACHE", ROOT / ".cache" / "tinyxml")),
    lock_variable="LIBCARE_TINYXML_LOCKED",
    output=ROOT / "tests" / "output" / "tinyxml",
)
INSTALL = TINYXML.cache / "work" / "lpmake" / "usr"
LIBRARY = INSTALL / "lib" / "libtinyxml.so.2.6.2"
ROUND = "plain=config caught crafted="


@pytest.fixture(scope="module")
def built():
    with TINYXML.locked():
        TINYXML.prepare(timeout=600)
        run = TINYXML.run(["bash", str(TINYXML.scripts / "build_patch.sh")], timeout=900)
        TINYXML.record("build_patch.out", run.stdout)
        TINYXML.record("build_patch.err", run.stderr)
        yield run


@pytest.fixture(scope="module")
def program(built, tmp_path_factory) -> Path:
    if built.returncode != 0:
        pytest.fail("no patch to apply: build_patch.sh failed (see test_build_patch_for_the_library)")
    binary = tmp_path_factory.mktemp("tinyxml") / "parse"
    (INSTALL / "lib" / "libtinyxml.so").unlink(missing_ok=True)
    (INSTALL / "lib" / "libtinyxml.so").symlink_to(LIBRARY.name)
    subprocess.run(["g++", "-O2", "-DTIXML_USE_STL", "-o", str(binary), str(TINYXML.scripts / "parse.cpp"),
                    f"-I{INSTALL / 'include'}", f"-L{INSTALL / 'lib'}", f"-Wl,-rpath,{INSTALL / 'lib'}",
                    "-ltinyxml"], check=True)
    return binary


def test_build_patch_for_the_library(built):
    """Built through the wrappers with Debian's build lines; one patch, for libtinyxml, replacing the fixed function."""
    assert built.returncode == 0, f"build_patch.sh failed:\n{built.stdout[-2000:]}\n{built.stderr[-6000:]}"
    bench = [json.loads(line) for line in built.stdout.splitlines() if '"build_overhead_tinyxml"' in line]
    assert len(bench) == 1, built.stdout
    assert bench[0]["value"] > 0 and bench[0]["baseline"] > 0
    assert "replaces TiXmlDeclaration::Parse(char const*, TiXmlParsingData*, TiXmlEncoding)" in built.stderr
    patches = sorted((TINYXML.cache / "work" / "patchroot").glob("*.kpatch"))
    assert [p.name for p in patches] == [build_id_of(LIBRARY) + ".kpatch"]


def test_the_pre_fix_library_aborts_on_the_crafted_declaration(program, tmp_path):
    trigger = tmp_path / "trigger"
    trigger.touch()
    run = subprocess.run([str(program), str(trigger)], capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == -6, (run.returncode, run.stdout[-500:], run.stderr[-500:])     # SIGABRT: assert(0)
    assert "Assertion" in run.stderr


def test_fix_applied_live(program, tmp_path):
    """Patched, the live process parses the crafted declaration instead of aborting;
    exceptions are thrown and caught every round throughout; unpatched, the old code is back."""
    trigger = tmp_path / "trigger"
    patient = Patient([str(program), str(trigger)])
    try:
        patient.wait_for(lambda line: line.endswith(ROUND + "skipped"), timeout=10, after=0)
        applied = ctl("patch", "-p", str(patient.pid), str(TINYXML.cache / "work" / "patchroot"))
        assert applied.returncode == 0, applied.stderr
        trigger.touch()
        seen = len(patient.lines)
        patient.wait_for(lambda line: line.endswith(ROUND + "parsed"), timeout=10, after=seen)
        trigger.unlink()
        patient.wait_for(lambda line: line.endswith(ROUND + "skipped"), timeout=10)
        removed = ctl("unpatch", "-p", str(patient.pid))
        assert removed.returncode == 0, removed.stderr
        patient.wait_for(lambda line: line.endswith(ROUND + "skipped"), timeout=10)
        assert patient.alive()
        assert all(line.startswith("round=") and ROUND in line for line in patient.lines)
    finally:
        patient.stop()
