"""A real project, its real fix, built and applied live.

redis 7.0.15 from Debian 12's source package, with Debian's backport of the
CVE-2025-67733 fix ("Strip CRLF from error and simple string replies") taken out
(``tests/realproject/prepare.sh``); ``libcare-patch-make`` builds the fix as a live
patch (``build_patch.sh``); the pre-fix server runs under client load while the patch
is applied and removed (``live_patch.py``). See ``tests/realproject/README.md``.

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

REDIS = RealProject(
    package="redis",
    scripts=ROOT / "tests" / "realproject",
    cache=Path(os.environ.get("LIBCARE_REALPROJECT_CACHE", ROOT / ".cache" / "realproject")),
    lock_variable="LIBCARE_REALPROJECT_LOCKED",
    output=ROOT / "tests" / "output" / "realproject",
)
SCRIPTS, CACHE = REDIS.scripts, REDIS.cache


def _json_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def _record(name: str, run: subprocess.CompletedProcess) -> None:
    REDIS.record(f"{name}.out", run.stdout)
    REDIS.record(f"{name}.err", run.stderr)


@pytest.fixture(scope="module")
def cache_lock():
    with REDIS.locked():
        yield


@pytest.fixture(scope="module")
def prepared(cache_lock) -> None:
    REDIS.prepare(timeout=600)


@pytest.fixture(scope="module")
def built(prepared) -> subprocess.CompletedProcess:
    run = REDIS.run(["bash", str(SCRIPTS / "build_patch.sh")], timeout=900)
    _record("build_patch", run)
    return run


def test_build_patch_for_the_server(built):
    """libcare-patch-make builds the fix; the patch is named by redis-server's build-id."""
    assert built.returncode == 0, f"build_patch.sh failed:\n{built.stdout[-2000:]}\n{built.stderr[-6000:]}"
    bench = [r for r in _json_lines(built.stdout) if r.get("bench") == "build_overhead"]
    assert len(bench) == 1, built.stdout
    figures = bench[0]
    assert figures["unit"] == "s"
    assert figures["value"] > 0 and figures["baseline"] > 0
    assert figures["ratio"] == pytest.approx(figures["value"] / figures["baseline"], abs=0.01)


def test_fix_applied_live_under_load(built):
    """Zero failed requests while the fix goes in and out; the fixed answer only while patched."""
    if built.returncode != 0:
        pytest.fail("no patch to apply: build_patch.sh failed (see test_build_patch_for_the_server)")
    run = REDIS.run([sys.executable, str(SCRIPTS / "live_patch.py"), "--seconds", "60"], timeout=300)
    _record("live_patch", run)
    records = _json_lines(run.stdout)
    result = [r for r in records if r.get("step") == "result"]
    assert run.returncode == 0 and result and result[0]["ok"], (
        f"live_patch.py failed: {result}\n{run.stderr[-6000:]}")
    load = [r for r in records if r.get("bench") == "realproject_load"]
    assert load and load[0]["value"] > 0 and load[0]["failed"] == 0


def test_io_threads_refused_cleanly_or_patched(built):
    """With I/O threads, the patch either goes in (if it leaves IOThreadMain alone) or is
    refused cleanly, naming the busy thread and function: no failed request either way."""
    if built.returncode != 0:
        pytest.fail("no patch to apply: build_patch.sh failed (see test_build_patch_for_the_server)")
    run = REDIS.run([sys.executable, str(SCRIPTS / "live_patch.py"), "--io-threads", "2", "--seconds", "60"],
               timeout=300)
    _record("live_patch_io_threads", run)
    result = [r for r in _json_lines(run.stdout) if r.get("step") == "result"]
    assert run.returncode == 0 and result and result[0]["ok"], (
        f"live_patch.py --io-threads 2 failed: {result}\n{run.stderr[-6000:]}")


def test_prepared_tree_is_the_pre_fix_version(prepared):
    """The prepared tree lacks the fix and the fix applies to it (-p1)."""
    pristine, fix = CACHE / "pristine", CACHE / "fix.patch"
    assert "addReplyStatusSafe" not in (pristine / "src" / "networking.c").read_text()
    assert "+void addReplyStatusSafe" in fix.read_text()
    check = subprocess.run(["patch", "-p1", "--dry-run", "--batch", "-s", "-i", str(fix)], cwd=pristine,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
