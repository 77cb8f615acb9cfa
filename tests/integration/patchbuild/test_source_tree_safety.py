"""libcare-patch-make never leaves the user's sources damaged: a build that wipes every
directory of the tree, a failing patched build, a bad patch, SIGINT at each stage and a
run killed outright. Real make, real gcc, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "process"))
from waiting import eventually  # noqa: E402

from plugins.module_utils.careengine.patchbuild import sourcetree  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "projects" / "hostile"
PATCH_MAKE = str(ROOT / "bin" / "libcare-patch-make")
OURS = ("lpmake", ".lpmaketmp", "patchroot")


@pytest.fixture
def hostile(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(sourcetree.STATE_ENV, str(tmp_path / "state"))
    return Path(shutil.copytree(FIXTURE, tmp_path / "hostile"))


def _snapshot(project: Path) -> dict[str, tuple[bytes, int]]:
    """Every source file of the tree: content and mode (build outputs and our dirs left out)."""
    found = {}
    for path in project.rglob("*"):
        relative = path.relative_to(project)
        if relative.parts[0] in OURS or path.suffix in (".o",) or path.name.startswith(".kpatch_") \
                or path.name == "hostile":
            continue
        if path.is_file():
            found[relative.as_posix()] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
        elif path.is_dir():
            found[relative.as_posix() + "/"] = (b"", 0)
    return found


def _patch_make(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PATCH_MAKE, *args], cwd=project, capture_output=True, text=True, check=False,
                          env=dict(os.environ, **(env or {})), timeout=300)


def test_build_that_wipes_every_directory_leaves_the_tree_intact(hostile):
    before = _snapshot(hostile)
    result = _patch_make(hostile, "-m", "WIPE_DIRS=1", "fix.patch")
    # The project's own build removed lpmake/ and .lpmaketmp/: a clean error, no traceback...
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "no installed builds" in result.stderr
    # ...and the sources exactly as they were (the originals were kept outside the tree).
    assert _snapshot(hostile) == before
    assert "PATCHED" not in (hostile / "hostile.c").read_text().replace("UNPATCHED", "")


def test_output_dirs_outside_the_tree_survive_a_wiping_build(hostile, tmp_path):
    before = _snapshot(hostile)
    outside = {"LPMAKE_ORIGINAL_DIR": str(tmp_path / "out" / "original"),
               "LPMAKE_PATCHED_DIR": str(tmp_path / "out" / "patched"),
               "LPMAKE_PATCHROOT": str(tmp_path / "out" / "patchroot")}
    result = _patch_make(hostile, "-m", "WIPE_DIRS=1", "fix.patch", env=outside)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out" / "patchroot").glob("*.kpatch"))) == 1
    assert (tmp_path / "out" / "original" / "usr" / "local" / "bin" / "hostile").is_file()
    assert (tmp_path / "out" / "patched" / "usr" / "local" / "bin" / "hostile").is_file()
    assert not (hostile / "patchroot").exists()
    assert _snapshot(hostile) == before


def test_make_clean_that_wipes_every_directory(hostile):
    (hostile / "stale-dir").mkdir()
    result = _patch_make(hostile, "--clean", "fix.patch")
    assert result.returncode == 0, result.stderr
    assert not (hostile / "stale-dir").exists()            # the project's own clean ran
    assert len(list((hostile / "patchroot").glob("*.kpatch"))) == 1
    assert "stage original: make clean" in result.stderr


def test_failing_patched_build_restores_byte_for_byte(hostile):
    (hostile / "broken.patch").write_text(
        "--- a/hostile.c\n+++ b/hostile.c\n@@ -8,3 +8,3 @@\n {\n"
        "-\tprintf(\"hostile UNPATCHED %d\\n\", counter);\n"
        "+\tprintf(\"hostile UNPATCHED %d\\n\", counter) no_such_token;\n \tfflush(stdout);\n"
        "--- /dev/null\n+++ b/newdir/deeper/created.txt\n@@ -0,0 +1 @@\n+made by the patch\n")
    before = _snapshot(hostile)
    result = _patch_make(hostile, "broken.patch")
    assert result.returncode == 1
    assert "no_such_token" in result.stderr and "reverting the patches" in result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(hostile) == before
    assert not (hostile / "hostile.c.orig").exists() and not (hostile / "hostile.c.rej").exists()
    assert not (hostile / "newdir").exists()               # the directories the patch created are gone


def test_bad_patch_is_refused_before_anything_is_built(hostile):
    (hostile / "stale.patch").write_text("--- a/hostile.c\n+++ b/hostile.c\n@@ -1,1 +1,1 @@\n-no such line\n+x\n")
    before = _snapshot(hostile)
    result = _patch_make(hostile, "fix.patch", "stale.patch")
    assert result.returncode == 1 and "stale.patch does not apply" in result.stderr
    assert "stage original" not in result.stderr            # refused before the original build
    assert not (hostile / "hostile.o").exists()
    missing = _patch_make(hostile, "no-such.patch")
    assert missing.returncode == 1 and "no-such.patch does not exist" in missing.stderr
    assert "stage original" not in missing.stderr
    assert _snapshot(hostile) == before


def test_second_patch_checked_against_the_first(hostile):
    # The second patch only applies on top of the first: the scratch check applies them in order.
    (hostile / "second.patch").write_text(
        "--- a/hostile.c\n+++ b/hostile.c\n@@ -8,3 +8,3 @@\n {\n"
        "-\tprintf(\"hostile PATCHED %d\\n\", counter * 10);\n"
        "+\tprintf(\"hostile PATCHED %d\\n\", counter * 20);\n \tfflush(stdout);\n")
    before = _snapshot(hostile)
    result = _patch_make(hostile, "fix.patch", "second.patch")
    assert result.returncode == 0, result.stderr
    assert _snapshot(hostile) == before


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# (the progress line that says the stage started, the build step held while we interrupt)
STAGES = {
    "original build": ("stage original: make\n", "original-all"),
    "original install": ("stage original: make install", "original-install"),
    "applying": ("applying ", "patched-all"),
    "patched build": ("stage patched: make\n", "patched-all"),
    "patched install": ("stage patched: make install", "patched-install"),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigint_at_each_stage_restores_the_tree(hostile, tmp_path, stage):
    marker, hold = STAGES[stage]
    pid_file = tmp_path / "held.pid"
    before = _snapshot(hostile)
    process = subprocess.Popen([PATCH_MAKE, "fix.patch"], cwd=hostile, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, LPM_HOLD=hold, LPM_HOLD_PID=str(pid_file)))
    seen = ""
    while marker not in seen:
        line = process.stderr.readline()
        assert line, f"libcare-patch-make ended before {marker!r}: {seen}"
        seen += line
    if stage == "applying":
        assert eventually(lambda: "PATCHED" in (hostile / "hostile.c").read_text().replace("UNPATCHED", ""),
                          timeout=60)
    else:
        assert eventually(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=60)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, seen + rest
    assert "Traceback" not in rest
    assert "interrupted" in rest
    assert _snapshot(hostile) == before
    if pid_file.exists():
        held = int(pid_file.read_text())
        assert eventually(lambda: not _pid_alive(held), timeout=30), "the build's processes were left running"


def test_killed_run_is_restored_by_the_next(hostile, tmp_path):
    pid_file = tmp_path / "held.pid"
    before = _snapshot(hostile)
    process = subprocess.Popen([PATCH_MAKE, "fix.patch"], cwd=hostile, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, LPM_HOLD="patched-all", LPM_HOLD_PID=str(pid_file)),
                               start_new_session=True)
    assert eventually(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=120)
    process.kill()                                          # no chance to restore anything
    process.wait(timeout=30)
    os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)   # and the build it left behind
    assert "PATCHED" in (hostile / "hostile.c").read_text().replace("UNPATCHED", "")   # left patched
    result = _patch_make(hostile, "fix.patch")
    assert result.returncode == 0, result.stderr
    assert "a previous run was killed while it was patched" in result.stderr
    assert _snapshot(hostile) == before


def test_quiet_prints_only_the_result(hostile):
    result = _patch_make(hostile, "--quiet", "fix.patch")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "replaces report" in result.stdout
    loud = _patch_make(hostile, "fix.patch")
    assert "1 unit compiled, 1 diffed (1 changed)" in loud.stderr     # plain progress lines in a log
    assert "\r" not in loud.stderr


def test_two_runs_on_one_tree_do_not_mix(hostile, tmp_path):
    pid_file = tmp_path / "held.pid"
    first = subprocess.Popen([PATCH_MAKE, "fix.patch"], cwd=hostile, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, LPM_HOLD="patched-all", LPM_HOLD_PID=str(pid_file)))
    try:
        assert eventually(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=120)
        second = _patch_make(hostile, "fix.patch")
        assert second.returncode == 1 and "another libcare-patch-make run is using" in second.stderr
        assert "PATCHED" in (hostile / "hostile.c").read_text().replace("UNPATCHED", "")  # first run untouched
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130
        first.stderr.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_during_the_patched_build_restore_the_tree(hostile, tmp_path, signum):
    pid_file = tmp_path / "held.pid"
    before = _snapshot(hostile)
    process = subprocess.Popen([PATCH_MAKE, "fix.patch"], cwd=hostile, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, LPM_HOLD="patched-all", LPM_HOLD_PID=str(pid_file)))
    assert eventually(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=120)
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, rest
    assert "Traceback" not in rest
    assert _snapshot(hostile) == before
    held = int(pid_file.read_text())
    assert eventually(lambda: not _pid_alive(held), timeout=30), "the build's processes were left running"
