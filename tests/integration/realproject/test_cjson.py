"""A real CMake project, its real fix, built and applied live.

cJSON 1.7.15 from Debian 12's source package, with Debian's backport of the
CVE-2025-57052 fix (``decode_array_index_from_pointer`` read any character after a
digit as a digit) taken out (``tests/realproject/cjson/prepare.sh``);
``libcare-patch-make --build-system cmake`` builds the fix as a live patch for
``libcjson_utils.so`` (``build_patch.sh``); a program using the pre-fix library looks up
the JSON pointer ``/1:`` (item 20 before the fix, nothing after) while the patch is
applied and removed.

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

CJSON = RealProject(
    package="cjson",
    scripts=ROOT / "tests" / "realproject" / "cjson",
    cache=Path(os.environ.get("LIBCARE_CJSON_CACHE", ROOT / ".cache" / "cjson")),
    lock_variable="LIBCARE_CJSON_LOCKED",
    output=ROOT / "tests" / "output" / "cjson",
)
INSTALL = CJSON.cache / "work" / "lpmake" / "usr" / "local"
LIBRARY = INSTALL / "lib" / "libcjson_utils.so.1.7.15"


@pytest.fixture(scope="module")
def built():
    with CJSON.locked():
        CJSON.prepare(timeout=600)
        run = CJSON.run(["bash", str(CJSON.scripts / "build_patch.sh")], timeout=900)
        CJSON.record("build_patch.out", run.stdout)
        CJSON.record("build_patch.err", run.stderr)
        yield run


def test_build_patch_for_the_library(built):
    """The CMake project is built through the wrappers; one patch, for libcjson_utils, replacing the fixed function."""
    assert built.returncode == 0, f"build_patch.sh failed:\n{built.stdout[-2000:]}\n{built.stderr[-6000:]}"
    bench = [json.loads(line) for line in built.stdout.splitlines() if '"build_overhead_cjson"' in line]
    assert len(bench) == 1, built.stdout
    assert bench[0]["value"] > 0 and bench[0]["baseline"] > 0
    assert "stage configure: cmake configure" in built.stderr
    assert "replaces decode_array_index_from_pointer" in built.stderr
    patches = sorted((CJSON.cache / "work" / "patchroot").glob("*.kpatch"))
    assert [p.name for p in patches] == [build_id_of(LIBRARY) + ".kpatch"]


def test_fix_applied_live(built, tmp_path):
    """The pre-fix library answers ``/1:`` with item 20; patched, with nothing; unpatched, item 20 again."""
    if built.returncode != 0:
        pytest.fail("no patch to apply: build_patch.sh failed (see test_build_patch_for_the_library)")
    program = tmp_path / "lookup"
    subprocess.run(["gcc", "-O2", "-o", str(program), str(CJSON.scripts / "lookup.c"),
                    f"-I{INSTALL / 'include' / 'cjson'}", f"-L{INSTALL / 'lib'}", f"-Wl,-rpath,{INSTALL / 'lib'}",
                    "-lcjson_utils", "-lcjson"], check=True)
    patient = Patient([str(program)])
    try:
        patient.wait_for(lambda line: "/1:=2000 /3=300" in line, timeout=10, after=0)
        applied = ctl("patch", "-p", str(patient.pid), str(CJSON.cache / "work" / "patchroot"))
        assert applied.returncode == 0, applied.stderr
        patient.wait_for(lambda line: line.endswith("/1:=none /3=300"), timeout=10)
        removed = ctl("unpatch", "-p", str(patient.pid))
        assert removed.returncode == 0, removed.stderr
        patient.wait_for(lambda line: line.endswith("/1:=2000 /3=300"), timeout=10)
        assert patient.alive()
    finally:
        patient.stop()
