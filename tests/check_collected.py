"""Fail when a test file under tests/unit or tests/integration is not collected by pytest.

A test that is not collected does not exist: pytest silently skips folders that match its
``norecursedirs`` (``build``, ``dist``, dot-folders ...) and files it cannot import in some
configurations. This script asks pytest which files it collects and compares them with every
``test_*.py`` / ``*_test.py`` on disk.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOTS = ("tests/unit", "tests/integration")


def files_on_disk(repo: Path) -> set[str]:
    """Every test file below the test roots, as paths relative to the repository."""
    found: set[str] = set()
    for root in ROOTS:
        for path in (repo / root).rglob("*.py"):
            if path.name.startswith("test_") or path.name.endswith("_test.py"):
                found.add(path.relative_to(repo).as_posix())
    return found


def files_collected(repo: Path) -> set[str]:
    """The files pytest collects at least one test from."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ROOTS],
        cwd=repo, capture_output=True, text=True, check=False,
    )
    if run.returncode not in (0, 5):
        sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
        raise SystemExit(f"check_collected: pytest --collect-only failed with status {run.returncode}")
    return {line.split("::", 1)[0] for line in run.stdout.splitlines() if "::" in line}


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    missing = sorted(files_on_disk(repo) - files_collected(repo))
    for path in missing:
        print(f"check_collected: {path} is on disk but pytest collects no test from it")
    if missing:
        return 1
    print(f"check_collected: every one of {len(files_on_disk(repo))} test files is collected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
